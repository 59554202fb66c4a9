#!/usr/bin/env bash
# Builds pion with the CUDA back end and runs the GPU tests (ctest -R Cuda): the one command
# for a machine with an NVIDIA GPU, e.g. through the device tool from the repository root:
#
#   scripts/gpu-check.sh --fetch-deps      # here first (Debian 12, network): see below
#   run(command="scripts/gpu-check.sh", carry=[".gpu-deps"])
#
# The device image has nvcc, CMake and a C++ compiler but not pion's C++ libraries
# (OpenBLAS, LAPACKE, nlohmann-json, CLI11, GoogleTest) and no network. --fetch-deps
# downloads those Debian 12 packages into .gpu-deps/ (ignored by git through
# .git/info/exclude); on the GPU machine they are unpacked under /tmp/pion-deps and CMake,
# pkg-config and the loader are pointed there (scripts/gpu-env.sh). Where the libraries are
# installed, no .gpu-deps/ is needed. Build directory: build-gpu (Release, PION_CUDA=ON, no
# benchmarks). The optimizer benchmark on the GPU is scripts/gpu-bench.sh; training speed
# and the CPU-vs-GPU baby runs are scripts/gpu-train.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# The dependency set-up and the build-gpu configuration are shared with gpu-bench.sh.
source scripts/gpu-env.sh

if [[ "${1:-}" == "--fetch-deps" ]]; then
  pion_gpu_fetch_deps
  exit 0
fi

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
nvcc --version | tail -n 1 || /usr/local/cuda/bin/nvcc --version | tail -n 1

pion_gpu_use_deps

echo "== build"
start=$(date +%s)
pion_gpu_configure
cmake --build build-gpu -j"$(nproc)" --target pion test_cuda_optim test_cuda_layers \
  test_cuda_flash_attention test_cuda_llama test_cuda_train test_cuda_optim_trace
echo "build took $(($(date +%s) - start)) s"

echo "== tests"
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
(cd build-gpu && ctest -R Cuda --output-on-failure -V) >build-gpu/ctest-cuda.log 2>&1 || status=$?
if [[ $status -ne 0 ]]; then cat build-gpu/ctest-cuda.log; fi
grep -E "vs cpu|drift after|worst|SKIPPED|Skipped|Failed|tests passed" build-gpu/ctest-cuda.log || true
nvidia-smi --query-gpu=name,utilization.gpu,memory.used,temperature.gpu --format=csv
exit "$status"
