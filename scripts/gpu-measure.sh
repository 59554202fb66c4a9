#!/usr/bin/env bash
# Every GPU measurement in one device call, after scripts/gpu-check.sh: gpu-bench.sh (the
# optimizer step against PyTorch; it builds build-gpu/pion first when that is missing, e.g.
# when the device machine was handed back between calls and came back bare) and then
# gpu-train.sh (training tokens/s against PyTorch, the baby runs on the GPU). One call keeps
# the build: the device tool's machine goes back after ~30 s idle, taking build-gpu with it.
#
#   run(command="scripts/gpu-measure.sh", carry=[".gpu-deps"], timeout_s=600)
#
# Extra arguments go to gpu-train.sh (e.g. --iters 1000 to shorten the baby runs). Results
# under $OUT/optim and $OUT/train (else build-gpu/measure/...).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build-gpu/measure}
status=0
build_flag=()
[[ -x build-gpu/pion ]] && build_flag=(--no-build)
scripts/gpu-bench.sh "${build_flag[@]}" --out "$out/optim" || status=1
scripts/gpu-train.sh --out "$out/train" "$@" || status=1
exit "$status"
