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
# pkg-config and the loader are pointed there. Where the libraries are installed, no
# .gpu-deps/ is needed. Build directory: build-gpu (Release, PION_CUDA=ON, no benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."

deps_dir=.gpu-deps
packages=(libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libgfortran5
  liblapacke-dev liblapacke libtmglib3 libcli11-dev nlohmann-json3-dev libgtest-dev
  pkgconf-bin libpkgconf3)

if [[ "${1:-}" == "--fetch-deps" ]]; then
  mkdir -p "$deps_dir"
  grep -qxF "/$deps_dir/" .git/info/exclude 2>/dev/null || echo "/$deps_dir/" >>.git/info/exclude
  (cd "$deps_dir" && apt-get download "${packages[@]}")
  ls -l "$deps_dir"
  exit 0
fi

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
nvcc --version | tail -n 1 || /usr/local/cuda/bin/nvcc --version | tail -n 1

cmake_extra=()
if compgen -G "$deps_dir/*.deb" >/dev/null; then
  prefix=/tmp/pion-deps
  mkdir -p "$prefix"
  for f in "$deps_dir"/*.deb; do dpkg -x "$f" "$prefix"; done
  lib="$prefix/usr/lib/x86_64-linux-gnu"
  export CMAKE_PREFIX_PATH="$prefix/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  # openblas.pc names absolute /usr paths: the sysroot prefix maps them into $prefix.
  export PKG_CONFIG_PATH="$lib/openblas-pthread/pkgconfig:$lib/pkgconfig:$prefix/usr/share/pkgconfig"
  export PKG_CONFIG_SYSROOT_DIR="$prefix"
  # liblapacke needs libblas.so.3 / liblapack.so.3 (OpenBLAS's, normally chosen by Debian's
  # alternatives) at link and run time.
  export LD_LIBRARY_PATH="$lib:$lib/openblas-pthread${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CPATH="$prefix/usr/include${CPATH:+:$CPATH}"
  command -v pkg-config >/dev/null || cmake_extra+=("-DPKG_CONFIG_EXECUTABLE=$prefix/usr/bin/pkgconf")
  echo "== using the Debian packages in $deps_dir (unpacked under $prefix)"
fi

echo "== build"
start=$(date +%s)
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DPION_CUDA=ON -DPION_BUILD_BENCH=OFF \
  -DPION_MPI=OFF "${cmake_extra[@]}"
cmake --build build-gpu -j"$(nproc)" --target pion test_cuda_optim test_cuda_layers
echo "build took $(($(date +%s) - start)) s"

echo "== tests"
# -V keeps each test's printed measurements (parity errors, spectrum drift) in the log.
status=0
(cd build-gpu && ctest -R Cuda --output-on-failure -V) >build-gpu/ctest-cuda.log 2>&1 || status=$?
if [[ $status -ne 0 ]]; then cat build-gpu/ctest-cuda.log; fi
grep -E "vs cpu|drift after|SKIPPED|Skipped|Failed|tests passed" build-gpu/ctest-cuda.log || true
nvidia-smi --query-gpu=name,utilization.gpu,memory.used,temperature.gpu --format=csv
exit "$status"
