#!/usr/bin/env bash
# Per-step launch count, bytes and flops of GPU training, counted by the CUDA emulator
# (tools/cuda-emu, EMU_COUNT) from the kernels and cuBLAS calls one training step actually
# runs, with the H100 time they imply (scripts/emu_count_report.py states the model).
#
#   scripts/emu-count.sh [--out DIR] [--optimizers adamw,muon,pion] [--seq N] [--seq2 N]
#                        [--batch2 N] [--no-build]
#
# Builds the emulated `pion` (build-emu/, like tools/cuda-emu/run.sh --all), then for each run
# calls `pion bench train --device cuda --preset gpt2-small` (d_model 768, 12 heads, vocab
# 50304, materialized attention: what `auto` picks for GPT-2 small on an 80 GB GPU) with
# --warmup 2 --steps 1 --profile_step 3 under EMU_COUNT, so exactly one steady-state step is
# counted: step 3, the first replay of the optimizer's CUDA graph (step 1 runs eagerly, step
# 2 captures). Runs: every optimizer at 1 and 2 layers, batch 1 x seq --seq (default 128);
# AdamW also at batch --batch2 (2) x seq --seq and batch 1 x seq --seq2 (256), which fit the
# extrapolation to 12 layers x batch 16 x seq 1024, and at batch 2 x seq --seq2 as a check of
# it. Prints Markdown tables (emu_count_report.py) and keeps every JSON in --out (default
# build-emu/emu-count/).
set -euo pipefail
cd "$(dirname "$0")/.."
command_line="scripts/emu-count.sh${*:+ $*}"

out=build-emu/emu-count
optimizers=adamw,muon,pion
seq=128
seq2=256
batch2=2
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --optimizers) optimizers="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --seq2) seq2="$2"; shift 2 ;;
    --batch2) batch2="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "emu-count.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ $build = 1 ]; then
  mkdir -p build-emu
  cmake -S tools/cuda-emu -B build-emu -DCMAKE_BUILD_TYPE=RelWithDebInfo >build-emu/configure.log 2>&1 ||
    { cat build-emu/configure.log; exit 1; }
  cmake --build build-emu -j"${JOBS:-2}" --target pion >build-emu/build.log 2>&1 ||
    { grep -E "error|Error" build-emu/build.log | head -40; echo "emu-count.sh: build failed"; exit 1; }
fi
mkdir -p "$out"
pion=$PWD/build-emu/pion

# run OPTIMIZER LAYERS BATCH SEQ
run() {
  local json="$out/count-$1-L$2-B$3-S$4.json" log="$out/count-$1-L$2-B$3-S$4.log"
  local start=$SECONDS
  if ! EMU_COUNT="$PWD/$json" "$pion" bench train --device cuda --preset gpt2-small \
      --optimizers "$1" --layers "$2" --batch "$3" --seq_len "$4" --attention materialized \
      --warmup 2 --steps 1 --profile_step 3 >"$log" 2>&1; then
    tail -20 "$log"
    echo "emu-count.sh: $1 L$2 B$3 S$4 failed (log: $log)" >&2
    exit 1
  fi
  if grep -q '^\[cuda-emu\] WARNING' "$log"; then
    grep '^\[cuda-emu\] WARNING' "$log" | sort -u >&2
    echo "emu-count.sh: emulator warnings in $log" >&2
    exit 1
  fi
  echo "  $1 ${2} layer(s) batch $3 x seq $4: $((SECONDS - start)) s" >&2
}

echo "emu-count.sh: counting one step per run into $out" >&2
for o in ${optimizers//,/ }; do
  for layers in 1 2; do run "$o" "$layers" 1 "$seq"; done
done
if [[ ",$optimizers," == *,adamw,* ]]; then
  for layers in 1 2; do
    run adamw "$layers" "$batch2" "$seq"
    run adamw "$layers" 1 "$seq2"
  done
  run adamw 1 "$batch2" "$seq2"
fi

echo "## CUDA work per training step, counted by the emulator (EMU_COUNT)"
echo
echo "$(date -u +%Y-%m-%d), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), counted on" \
  "$(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')) by" \
  "tools/cuda-emu; command: \`$command_line\`"
echo
python3 scripts/emu_count_report.py "$out"
