#!/usr/bin/env bash
# KV-cached generation on the GPU against the CPU, on a machine with an NVIDIA GPU: builds the
# `pion` target in build-gpu as gpu-check.sh does (nothing to do when it already built it) and
# runs `pion bench generate --device cuda` (pion/cuda/generate.h) on two model sizes: the baby
# model of docs/BENCHMARKS.md's CPU figures and a wider one, each with fp32 GEMMs (the token
# check against the CPU's uncached reference is then meaningful) and bf16. Through the device
# tool, from the repository root (scripts/gpu-all.sh runs it as its `generate` stage):
#
#   scripts/gpu-generate.sh [--out DIR] [--no-build]
#
# Results in --out (default $OUT, else build-gpu/bench-generate): one .md table and one .json
# per run, build.log. A few seconds per run after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out_dir="${OUT:-}"
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out_dir="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu-generate.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
out_dir=${out_dir:-build-gpu/bench-generate}
mkdir -p "$out_dir"

source scripts/gpu-env.sh
pion_gpu_use_deps
if [[ $build -eq 1 ]]; then
  echo "== build (log: $out_dir/build.log)"
  if ! { pion_gpu_configure && cmake --build "$pion_gpu_build_dir" -j"$(nproc)" --target pion; } \
    >"$out_dir/build.log" 2>&1; then
    tail -n 60 "$out_dir/build.log"
    echo "gpu-generate.sh: the build failed (full log: $out_dir/build.log)" >&2
    exit 1
  fi
fi
pion_bin="$pion_gpu_build_dir/pion"
[[ -x "$pion_bin" ]] || { echo "gpu-generate.sh: $pion_bin is missing (run without --no-build)" >&2; exit 1; }

status=0
run() {  # name, exact (1: fp32, tokens must equal the CPU's), pion bench generate flags...
  local name=$1 exact=$2
  shift 2
  echo "== $name: $pion_bin bench generate --device cuda $*"
  "$pion_bin" bench generate --device cuda "$@" --json "$out_dir/$name.json" |
    tee "$out_dir/$name.md" || status=1
  # A path whose tokens differ from the uncached CPU reference prints "NO": a failure with fp32
  # GEMMs; with bf16 ones, rounding may flip near-ties (reported, not failed).
  if [[ $exact -eq 1 ]] && grep -q '| NO |' "$out_dir/$name.md"; then status=1; fi
}
for precision in fp32 bf16; do
  exact=$([[ $precision == fp32 ]] && echo 1 || echo 0)
  run "baby-$precision" "$exact" --matmul_precision "$precision"
  run "wide-$precision" "$exact" --matmul_precision "$precision" --n_layer 6 --n_head 6 --d_model 384 \
    --seq_len 128 --vocab 8192 --sequences 32 --tokens 64 --max_prompt 96
done
echo "gpu-generate.sh: $(($(date +%s) - start)) s in all; results in $out_dir"
exit "$status"
