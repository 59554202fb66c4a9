#!/usr/bin/env bash
# Training on the GPU, for a machine with an NVIDIA GPU (after gpu-check.sh built build-gpu;
# --build builds the pion target first). Two measurements, each side by side in one run:
#
#  1. speed: `pion bench train --device cuda --preset gpt2-small` (AdamW, Muon, Pion through
#     the real trainer, random tokens; d_model 768, 12 layers, 12 heads, seq 1024, batch 16,
#     vocab 50304) against bench/torch_train_gpu.py (the same model in PyTorch: bf16 autocast,
#     SDPA flash attention, fused AdamW), eager, and with torch.compile at the very end
#     (after the quality runs; --no-compile skips it);
#  2. quality: nanoGPT's baby config on tinyshakespeare (docs/RESULTS.md) on the GPU for
#     AdamW, Muon and Pion, best val loss next to the CPU runs' recorded figures (target:
#     within 0.02).
#
# Through the device tool, from the repository root:
#   scripts/gpu-check.sh --fetch-deps     # here, once: packages + a copy of tinyshakespeare
#                                         # into .gpu-deps/ (ignored by git)
#   run(command="scripts/gpu-train.sh", carry=[".gpu-deps"], timeout_s=600)
#
#   scripts/gpu-train.sh [--build] [--only speed|quality] [--steps N] [--iters N]
#                        [--attention auto|flash|materialized|cudnn] [--out DIR] [--python PY]
#                        [--no-compile]
# Results in $OUT (else build-gpu/bench-train): pion-train.json, pion-train-<the other
# attention>.json (AdamW with materialized attention beside auto's flash, or flash beside
# --attention materialized), pion-train-cudnn.json (AdamW with cuDNN's fused attention),
# torch-eager.json, torch-compile.json, baby-*/ run directories
# (summary.json, metrics.jsonl), quality.md.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

build=0
only=""
steps=20
iters=2000
attention=auto
compile=1
out_dir="${OUT:-}"
python="${PYTHON:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) build=1; shift ;;
    --only) only="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --iters) iters="$2"; shift 2 ;;
    --attention) attention="$2"; shift 2 ;;
    --out) out_dir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --no-compile) compile=0; shift ;;
    -h|--help) sed -n '/^set -e/q;2,$p' "$0"; exit 0 ;;
    *) echo "gpu-train.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$attention" in
  auto|flash|materialized|cudnn) ;;
  *) echo "gpu-train.sh: --attention must be auto, flash, materialized or cudnn, got '$attention'" >&2
     exit 2 ;;
esac
case "$only" in
  ""|speed|quality) ;;
  *) echo "gpu-train.sh: --only must be speed or quality, got '$only'" >&2; exit 2 ;;
esac
out_dir=${out_dir:-build-gpu/bench-train}
mkdir -p "$out_dir"
source scripts/gpu-env.sh

echo "# pion on the GPU: training"
echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  2>/dev/null | head -n 1 || echo '?')"
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo

pion_gpu_use_deps
if [[ $build -eq 1 ]]; then
  pion_gpu_configure >"$out_dir/build.log" 2>&1
  cmake --build "$pion_gpu_build_dir" -j"$(nproc)" --target pion >>"$out_dir/build.log" 2>&1 ||
    { tail -n 40 "$out_dir/build.log"; exit 1; }
fi
pion_bin="$pion_gpu_build_dir/pion"
[[ -x "$pion_bin" ]] || { echo "gpu-train.sh: $pion_bin is missing (use --build)" >&2; exit 1; }
status=0

# pion's tokens/s against each PyTorch run measured so far (eager; torch.compile once run).
speed_table() {
  "$torch_python" - "$out_dir" <<'PY'
import json, os, sys
d = sys.argv[1]
pion = json.load(open(os.path.join(d, "pion-train.json")))
peers = {m: json.load(open(os.path.join(d, f"torch-{m}.json")))
         for m in ("eager", "compile") if os.path.exists(os.path.join(d, f"torch-{m}.json"))}
print(f"\n| pion optimizer | pion tok/s | vs PyTorch eager | vs torch.compile |")
print("|---|---:|---:|---:|")
for r in pion["results"]:
    cells = [f"{r['tokens_per_sec'] / peers[m]['tokens_per_sec']:.2f}x" if m in peers else "-"
             for m in ("eager", "compile")]
    print(f"| {r['optimizer']} | {r['tokens_per_sec']:.0f} | {cells[0]} | {cells[1]} |")
for m, p in peers.items():
    print(f"\nPyTorch {m}: {p['tokens_per_sec']:.0f} tok/s (AdamW, {p['torch']}, {p['gpu']})")
PY
}
torch_python=""

if [[ -z "$only" || "$only" == "speed" ]]; then
  echo "== speed: pion bench train (GPT-2-small-shaped LLaMA)"
  "$pion_bin" bench train --device cuda --preset gpt2-small --steps "$steps" --warmup 5 \
    --attention "$attention" --json "$out_dir/pion-train.json" | tail -n 8 || status=1
  # The other attention beside it, so one GPU run times both (auto is flash with bf16 GEMMs).
  other=materialized
  [[ "$attention" == materialized ]] && other=flash
  echo "== speed: AdamW with --attention $other instead"
  "$pion_bin" bench train --device cuda --preset gpt2-small --steps "$steps" --warmup 5 \
    --optimizers adamw --attention "$other" --json "$out_dir/pion-train-$other.json" |
    tail -n 4 || status=1
  # cuDNN's fused attention (opt-in, first timed here): a failure (no cuDNN in the build, no
  # engine for the graph) is reported, not counted against the stage.
  if [[ "$attention" != cudnn ]]; then
    echo "== speed: AdamW with --attention cudnn (cuDNN's fused attention)"
    "$pion_bin" bench train --device cuda --preset gpt2-small --steps "$steps" --warmup 5 \
      --optimizers adamw --attention cudnn --json "$out_dir/pion-train-cudnn.json" |
      tail -n 4 || echo "gpu-train: --attention cudnn FAILED (see above); not counted"
  fi
  for p in "$python" python3 /usr/bin/python3; do
    [[ -n "$p" ]] || continue
    if env LD_LIBRARY_PATH="$pion_gpu_orig_ld_library_path" "$p" -c \
      'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      torch_python=$p
      break
    fi
  done
  if [[ -n "$torch_python" ]]; then
    echo "== speed: PyTorch eager"
    env LD_LIBRARY_PATH="$pion_gpu_orig_ld_library_path" "$torch_python" \
      bench/torch_train_gpu.py --steps "$steps" --warmup 5 --json "$out_dir/torch-eager.json" ||
      status=1
    speed_table || status=1
  else
    echo "gpu-train.sh: no Python with CUDA torch here: no PyTorch peer" >&2
    status=1
  fi
fi

if [[ -z "$only" || "$only" == "quality" ]]; then
  text=.gpu-deps/tinyshakespeare.txt
  [[ -f "$text" ]] || text=../shared/data/tinyshakespeare.txt
  if [[ ! -f "$text" ]]; then
    echo "gpu-train.sh: no tinyshakespeare (run scripts/gpu-check.sh --fetch-deps here)" >&2
    exit 1
  fi
  echo "== quality: baby config on tinyshakespeare, $iters iters, on the GPU"
  baby=(--data "$text" --tokenizer char --n_layer 4 --n_head 4 --d_model 128 --seq_len 64
    --batch_size 12 --max_iters "$iters" --warmup_iters 100 --schedule cosine
    --min_lr_ratio 0.1 --grad_clip 1.0 --beta1 0.9 --beta2 0.99 --weight_decay 0.1
    --dropout 0.0 --lr 0.001 --eval_interval 250 --eval_iters 200 --log_interval 500
    --device cuda)
  # The CPU runs of docs/RESULTS.md (2026-11-22), same config and seed.
  declare -A cpu_best=([adamw]=1.6699 [muon]=1.5800 [pion]=1.6988)
  declare -A extra=([adamw]="" [muon]="--matrix_lr 0.02" [pion]="--init spectral --matrix_lr 0.002")
  {
    echo "| run | CPU best val (RESULTS.md) | GPU best val | difference | GPU tok/s |"
    echo "|---|---:|---:|---:|---:|"
  } >"$out_dir/quality.md"
  for opt in adamw muon pion; do
    run_dir="$out_dir/baby-$opt"
    rm -rf "$run_dir"
    # shellcheck disable=SC2086
    "$pion_bin" train "${baby[@]}" --optimizer "$opt" ${extra[$opt]} --out_dir "$run_dir" |
      tail -n 3 || { status=1; continue; }
    python3 - "$run_dir/summary.json" "$opt" "${cpu_best[$opt]}" >>"$out_dir/quality.md" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
cpu = float(sys.argv[3])
gpu = s["best_val_loss"]
print(f"| baby-{sys.argv[2]} | {cpu:.4f} | {gpu:.4f} | {gpu - cpu:+.4f} | {s['tokens_per_sec']:.0f} |")
PY
  done
  echo
  cat "$out_dir/quality.md"
fi

# torch.compile last: its compile takes minutes, so a short device slot loses only this peer.
if [[ $compile -eq 1 && -n "$torch_python" ]]; then
  echo "== speed: PyTorch torch.compile (last: optional, --no-compile skips it)"
  env LD_LIBRARY_PATH="$pion_gpu_orig_ld_library_path" "$torch_python" \
    bench/torch_train_gpu.py --steps "$steps" --warmup 5 --compile \
    --json "$out_dir/torch-compile.json" || status=1
  speed_table || status=1
fi
echo "gpu-train.sh: $(($(date +%s) - start)) s; results in $out_dir"
exit "$status"
