#!/usr/bin/env bash
# The GPU optimizer-step benchmark, pion vs PyTorch, side by side in one run on a machine with
# an NVIDIA GPU: builds the `pion` target in build-gpu as gpu-check.sh does (little to do when
# gpu-check.sh already built it), runs `pion bench optim --device cuda` and then
# `bench/torch_optim.py --device cuda` over the same 84 GPT-2-small matrices, and prints
# pion's table and one table of ratios (bench/compare_optim.py). Through the device tool,
# from the repository root:
#
#   scripts/gpu-check.sh --fetch-deps      # here first (Debian 12, network), once
#   run(command="scripts/gpu-bench.sh", carry=[".gpu-deps"], timeout_s=600)
#
#   scripts/gpu-bench.sh [--layers N] [--steps N] [--warmup N] [--drift_steps N]
#                        [--out DIR] [--python PY] [--no-build]
#
# Defaults: 12 layers, 20 timed steps after 3 warm-up steps, drift after 1000 steps, results
# in $OUT when the device tool sets it (else build-gpu/bench-optim): pion.json, pion.md,
# torch.json, table.md, build.log. The Python is the first of --python, $PYTHON, python3,
# /usr/bin/python3 that imports torch with CUDA. About 2-4 minutes of build on 16 cores plus
# about 2 minutes of benchmark (most of it Pion's 2 x 1000 drift steps and their SVDs).
set -euo pipefail
cd "$(dirname "$0")/.."
command_line="scripts/gpu-bench.sh${*:+ $*}"
start=$(date +%s)

layers=12
steps=20
warmup=3
drift_steps=1000
out_dir="${OUT:-}"
python="${PYTHON:-}"
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) layers="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --drift_steps) drift_steps="$2"; shift 2 ;;
    --out) out_dir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu-bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
out_dir=${out_dir:-build-gpu/bench-optim}
mkdir -p "$out_dir"

source scripts/gpu-env.sh

echo "# pion bench optim: GPU optimizer step, pion vs PyTorch"
echo
echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
  --format=csv,noheader 2>/dev/null | head -n 1 || echo '? (nvidia-smi failed)')"
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git status --porcelain \
  -- src include cuda bench 2>/dev/null | grep -q . && echo ' (+ uncommitted changes)')"
echo "- host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo

# The PyTorch to compare with: it must see the GPU.
pick_python() {
  local p
  for p in "$python" python3 /usr/bin/python3; do
    [[ -n "$p" ]] || continue
    if LD_LIBRARY_PATH="$pion_gpu_orig_ld_library_path" "$p" -c \
      'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  return 1
}
if ! torch_python=$(pick_python); then
  echo "gpu-bench.sh: no Python here imports torch with CUDA (tried ${python:+$python, }python3, /usr/bin/python3); the PyTorch side will be missing" >&2
  torch_python=""
fi

pion_gpu_use_deps
if [[ $build -eq 1 ]]; then
  echo "== build (log: $out_dir/build.log)"
  build_start=$(date +%s)
  if ! { pion_gpu_configure && cmake --build "$pion_gpu_build_dir" -j"$(nproc)" --target pion; } \
    >"$out_dir/build.log" 2>&1; then
    tail -n 60 "$out_dir/build.log"
    echo "gpu-bench.sh: the build failed (full log: $out_dir/build.log)" >&2
    exit 1
  fi
  echo "build took $(($(date +%s) - build_start)) s"
  echo
fi
pion_bin="$pion_gpu_build_dir/pion"
[[ -x "$pion_bin" ]] || { echo "gpu-bench.sh: $pion_bin is missing (run without --no-build)" >&2; exit 1; }

status=0
echo "== pion ($pion_bin bench optim --device cuda)"
"$pion_bin" bench optim --device cuda --layers "$layers" --steps "$steps" --warmup "$warmup" \
  --drift_steps "$drift_steps" --json "$out_dir/pion.json" | tee "$out_dir/pion.md" || status=1
echo

if [[ -n "$torch_python" ]]; then
  echo "== PyTorch ($torch_python bench/torch_optim.py --device cuda)"
  # Without Debian's libraries in front of PyTorch's own (gpu-env.sh put them on the path).
  if [[ -n "$pion_gpu_orig_ld_library_path" ]]; then
    torch_env=(env "LD_LIBRARY_PATH=$pion_gpu_orig_ld_library_path")
  else
    torch_env=(env -u LD_LIBRARY_PATH)
  fi
  "${torch_env[@]}" "$torch_python" bench/torch_optim.py --device cuda --layers "$layers" \
    --steps "$steps" --warmup "$warmup" --json "$out_dir/torch.json" || status=1
  echo
else
  status=1
fi

if [[ -f "$out_dir/pion.json" && -f "$out_dir/torch.json" ]]; then
  "${torch_python:-python3}" bench/compare_optim.py "$out_dir/pion.json" "$out_dir/torch.json" \
    --command "$command_line" | tee "$out_dir/table.md" || status=1
else
  echo "gpu-bench.sh: no comparison: $out_dir/pion.json or $out_dir/torch.json is missing" >&2
  status=1
fi
echo
nvidia-smi --query-gpu=name,utilization.gpu,memory.used,temperature.gpu,clocks.sm --format=csv \
  2>/dev/null || true
echo "gpu-bench.sh: $(($(date +%s) - start)) s in all; results in $out_dir"
exit "$status"
