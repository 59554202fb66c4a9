#!/usr/bin/env bash
# The test suite, as CI runs it: a Release build with every test, the CUDA tests on the CPU
# emulator (tools/cuda-emu), then an ASan+UBSan build of the same tests. Tests that need the
# GPU skip with a message when none is present; the emulator runs the in-process ones anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$jobs}
# Four builds (Release, emulator, ASan, fuzz) take most of the time: ccache (Debian) reuses
# what an earlier run on this machine compiled. Paths are rewritten relative to the checkout,
# so another clone of the repository hits the same cache. PION_NO_CCACHE=1 turns it off.
if command -v ccache > /dev/null && [ -z "${PION_NO_CCACHE:-}" ]; then
  export CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache
  export CMAKE_CUDA_COMPILER_LAUNCHER=ccache CCACHE_BASEDIR=$(pwd) CCACHE_NOHASHDIR=1
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure -j"$jobs")

# The CUDA back end's tests on the CPU (tools/cuda-emu/README.md): self-test + the four
# in-process Cuda* programs (indexing, cuBLAS arguments, barriers, capture rules; not GPU
# rounding or speed). Its own build in build-emu/; a failed test or build fails this script.
JOBS=$jobs bash tools/cuda-emu/run.sh

# Sanitizers: CUDA off (nvcc objects are not instrumented), benchmarks off.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPION_SANITIZE=ON -DPION_CUDA=OFF \
  -DPION_BUILD_BENCH=OFF
cmake --build build-asan -j"$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 PION_SANITIZED=1 ctest --output-on-failure -j"$jobs")

# Fuzzing: the libFuzzer targets (fuzz/, clang + ASan + UBSan) for 30 s each on their seed
# corpus; any crash, leak, timeout or out-of-memory fails the suite (scripts/fuzz.sh).
scripts/fuzz.sh "${PION_FUZZ_SECONDS:-30}"
