#!/usr/bin/env bash
# Builds pion with the CUDA back end and runs the GPU tests (ctest -R Cuda): the one command
# for a machine with an NVIDIA GPU, e.g. through the device tool from the repository root:
#
#   scripts/gpu-check.sh --fetch-deps      # here first (Debian 12, network): see below
#   run(command='scripts/gpu-check.sh --out "$OUT"', carry=[".gpu-deps"])
#
#   --out DIR      where the logs go (default gpu-out/, ignored by git): gpu.txt (nvidia-smi,
#                  nvcc), configure.log and build.log, ctest-cuda.log (ctest -V, whole),
#                  tests/<test>.log (each test's own output, whole) and summary.txt. With the
#                  device tool, --out "$OUT" brings them all back, so a failure can be read
#                  whole; the console gets only the summary.
#   --fetch-deps   see below; nothing else is done.
#
# Exit status 0 only when `nvidia-smi -L` lists a GPU, the build and every CUDA test passed,
# and no CUDA test skipped (except the no-GPU error-path tests, which say "this machine has a
# GPU"): a skip there means the tests did not see the GPU (pion::cuda::device_count() reports
# every CUDA error other than "no device" as an error, so such a skip is itself a defect).
#
# The device image has nvcc, CMake and a C++ compiler but not pion's C++ libraries
# (OpenBLAS, LAPACKE, nlohmann-json, CLI11, GoogleTest) and no network. --fetch-deps
# downloads those Debian 12 packages into .gpu-deps/ (ignored by git: .gitignore); on the GPU
# machine they are unpacked under /tmp/pion-deps and CMake, pkg-config and the loader are
# pointed there (scripts/gpu-env.sh). Where the libraries are installed, no .gpu-deps/ is
# needed. Build directory: build-gpu (Release, PION_CUDA=ON, no benchmarks; CUDA code for
# the GPU that is present only, see CMakeLists.txt). The optimizer benchmark on the GPU is
# scripts/gpu-bench.sh; training speed and the CPU-vs-GPU baby runs are scripts/gpu-train.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# The dependency set-up and the build-gpu configuration are shared with gpu-bench.sh.
source scripts/gpu-env.sh

out=gpu-out
while [[ $# -gt 0 ]]; do
  case $1 in
    --fetch-deps) pion_gpu_fetch_deps; exit 0 ;;
    --out) [[ $# -ge 2 && -n "$2" ]] || { echo "gpu-check.sh: --out needs a folder" >&2; exit 2; }
      out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    *) echo "usage: scripts/gpu-check.sh [--out DIR] | --fetch-deps" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/tests"
summary=$out/summary.txt
: >"$summary"
say() { echo "$@" | tee -a "$summary"; }

say "== GPU (logs: $out)"
{
  nvidia-smi -L || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader ||
    true
  nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version || true
} >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt" | tee -a "$summary"
gpu_listed=0
pion_gpu_listed && gpu_listed=1

pion_gpu_use_deps

say "== build (log: $out/build.log)"
start=$(date +%s)
if ! pion_gpu_configure >"$out/configure.log" 2>&1; then
  tail -n 40 "$out/configure.log"
  say "gpu-check: FAILED: configure (whole log: $out/configure.log)"
  exit 1
fi
grep -E "^-- pion:" "$out/configure.log" | tee -a "$summary" || true
if ! cmake --build build-gpu -j"$(nproc)" --target pion test_cuda_device test_cuda_optim \
  test_cuda_layers test_cuda_flash_attention test_cuda_llama test_cuda_train \
  test_cuda_optim_trace >"$out/build.log" 2>&1; then
  grep -E "error|Error" "$out/build.log" | head -n 40 || true
  say "gpu-check: FAILED: build (whole log: $out/build.log)"
  exit 1
fi
say "build took $(($(date +%s) - start)) s"

say "== tests (ctest -R Cuda -V: $out/ctest-cuda.log; one log per test under $out/tests/)"
# The fp64 references (trace_check.py) need numpy: use the first Python that has it.
for py in "${PION_PYTHON:-}" python3 /usr/bin/python3; do
  if [[ -n "$py" ]] && env LD_LIBRARY_PATH="$pion_gpu_orig_ld_library_path" "$py" -c 'import numpy' \
    2>/dev/null; then
    export PION_PYTHON="$py"
    break
  fi
done
# -V keeps each test's printed measurements (parity errors, spectrum drift) in the log.
status=0
(cd build-gpu && ctest -R Cuda --output-on-failure -V) >"$out/ctest-cuda.log" 2>&1 || status=$?
pion_gpu_split_ctest_log "$out/ctest-cuda.log" "$out/tests"
grep -E "vs cpu|drift after|worst|SKIPPED|Skipped|Failed|tests passed" "$out/ctest-cuda.log" |
  tee -a "$summary" || true
nvidia-smi --query-gpu=name,utilization.gpu,memory.used,temperature.gpu --format=csv 2>&1 |
  tee -a "$summary" || true

if [[ $status -ne 0 ]]; then
  say "gpu-check: FAILED: ctest exit $status (whole logs: $out/ctest-cuda.log, $out/tests/)"
  exit "$status"
fi
if [[ $gpu_listed == 1 ]]; then
  skipped=$(pion_gpu_unexpected_skips "$out/tests")
  if [[ -n "$skipped" ]]; then
    say "gpu-check: FAILED: nvidia-smi lists a GPU but these CUDA tests skipped:"
    printf '%s\n' "$skipped" | sed 's/^/  /' | tee -a "$summary"
    say "(their logs: $out/tests/<name>.log)"
    exit 1
  fi
else
  say "gpu-check: FAILED: \`nvidia-smi -L\` lists no GPU, so the CUDA tests ran on nothing" \
    "(they skip without a device); run this on a machine with an NVIDIA GPU"
  exit 1
fi
say "gpu-check: passed"
