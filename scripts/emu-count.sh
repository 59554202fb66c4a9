#!/usr/bin/env bash
# Per-step launch count, bytes and flops of GPU training, counted by the CUDA emulator
# (tools/cuda-emu, EMU_COUNT) from the kernels and cuBLAS calls one training step actually
# runs, with the H100 time they imply (scripts/emu_count_report.py states the model).
#
#   scripts/emu-count.sh [--out DIR] [--optimizers adamw,muon,pion] [--seq N] [--seq2 N]
#                        [--batch2 N] [--attention materialized|flash] [--no-build] [--keep]
#                        [--no-check]
#
# Builds the emulated `pion` (build-emu/, like tools/cuda-emu/run.sh --all), then for each run
# calls `pion bench train --device cuda --preset gpt2-small` (d_model 768, 12 heads, vocab
# 50304, materialized attention, as the earlier counts in docs/BENCHMARKS.md; --attention
# flash counts the bf16 tensor-core flash attention, what `auto` now picks with bf16 GEMMs) with
# --warmup 2 --steps 1 --profile_step 3 under EMU_COUNT, so exactly one steady-state step is
# counted: step 3, the first replay of the optimizer's CUDA graph (step 1 runs eagerly, step
# 2 captures). Runs: every optimizer at 1 and 2 layers, batch 1 x seq --seq (default 128);
# AdamW also at 1 and 2 layers at batch x seq = --batch2 (2) x --seq, 1 x --seq2 (256) and
# 1 x (2 --seq2), which fit the extrapolation to 12 layers x batch 16 x seq 1024, and at
# --batch2 x --seq2 (1 and 2 layers) and (--batch2 + 1) x --seq (1 layer), which check it.
# 15 runs, about an hour on two shared cores (--no-check: the 12 the fit needs, without the
# three that check it). Prints Markdown tables (emu_count_report.py)
# and keeps every JSON and log in --out (default build-emu/emu-count/); --keep reuses a JSON
# already there instead of running it again.
set -euo pipefail
cd "$(dirname "$0")/.."
command_line="scripts/emu-count.sh${*:+ $*}"

out=build-emu/emu-count
optimizers=adamw,muon,pion
seq=128
seq2=256
batch2=2
build=1
keep=0
check=1
attention=materialized
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out|--optimizers|--seq|--seq2|--batch2|--attention)
      [[ $# -ge 2 ]] || { echo "emu-count.sh: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --optimizers) optimizers="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --seq2) seq2="$2"; shift 2 ;;
    --batch2) batch2="$2"; shift 2 ;;
    --attention) attention="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --keep) keep=1; shift ;;
    --no-check) check=0; shift ;;
    -h|--help) sed -n '/^set -e/q;2,$p' "$0"; exit 0 ;;
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
case "$attention" in
  materialized|flash) ;;
  *) echo "emu-count.sh: --attention must be materialized or flash, got '$attention'" >&2; exit 2 ;;
esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
pion=$PWD/build-emu/pion

# run OPTIMIZER LAYERS BATCH SEQ
run() {
  local json="$out/count-$1-L$2-B$3-S$4.json" log="$out/count-$1-L$2-B$3-S$4.log"
  local start=$SECONDS
  if [ $keep = 1 ] && [ -s "$json" ]; then
    echo "  $1 ${2} layer(s) batch $3 x seq $4: kept $json" >&2
    return
  fi
  if ! EMU_COUNT="$json" "$pion" bench train --device cuda --preset gpt2-small \
      --optimizers "$1" --layers "$2" --batch "$3" --seq_len "$4" --attention "$attention" \
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
    run adamw "$layers" 1 $((2 * seq2))
    if [ $check = 1 ]; then run adamw "$layers" "$batch2" "$seq2"; fi
  done
  if [ $check = 1 ]; then run adamw 1 $((batch2 + 1)) "$seq"; fi
fi

echo "## CUDA work per training step, counted by the emulator (EMU_COUNT)"
echo
echo "$(date -u +%Y-%m-%d), checkout $(git describe --always --dirty 2>/dev/null || echo '?'), counted" \
  "on $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')) by" \
  "tools/cuda-emu; command: \`$command_line\`$([ $keep = 1 ] &&
    echo " (--keep: some counts may come from earlier runs, see the dates of $out/*.json)")"
echo
python3 scripts/emu_count_report.py "$out"
