#!/usr/bin/env bash
# Builds the CUDA emulator build (tools/cuda-emu, into build-emu/) and runs the emulator's
# self-test and the project's CUDA test programs on the CPU, printing each test's result.
#
#   tools/cuda-emu/run.sh            self-test + the in-process CUDA test programs
#   tools/cuda-emu/run.sh --all      ... + test_cuda_train and test_bench_cli (drive the
#                                    emulated `pion` binary; a few minutes more)
#   tools/cuda-emu/run.sh --asan     the same programs built with AddressSanitizer on the
#                                    emulated back end (kernels' out-of-bounds accesses)
#   tools/cuda-emu/run.sh --orders   run each program under forward, reverse and random thread
#                                    and block order (a missing barrier changes results)
# Environment: EMU_ORDER=forward|reverse|random, EMU_SEED, EMU_POISON=0|1 (NaN bytes in fresh
# cudaMalloc memory, default 1), EMU_STRICT=1 (abort at the first emulator warning),
# EMU_TRACE=1 (print every launch), EMU_COUNT=<path.json> (count launches, bytes, flops: see
# README.md), JOBS (default 2).
# A development aid for sessions without a GPU, not a substitute for scripts/gpu-check.sh.
# Exit status (scripts/test.sh relies on it): 0 when everything built, the self-test passed
# and every test program exited 0 with at least one test passed and no emulator warning
# (a warning is something that would be wrong or undefined on a GPU); 1 otherwise, with a
# last line naming what failed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$ROOT/build-emu
JOBS=${JOBS:-2}
ALL=0 ASAN=0 ORDERS=0
for a in "$@"; do
  case $a in
    --all) ALL=1 ;;
    --asan) ASAN=1 ;;
    --orders) ORDERS=1 ;;
    *) echo "usage: $0 [--all] [--asan] [--orders]" >&2; exit 2 ;;
  esac
done

TESTS=(test_cuda_device test_cuda_layers test_cuda_optim test_cuda_flash_attention test_cuda_llama
  test_cuda_generate)
[ $ALL = 1 ] && TESTS+=(test_cuda_train test_bench_cli)
SUFFIX=""
[ $ASAN = 1 ] && SUFFIX=_asan
TARGETS=(emu_selftest)
for t in "${TESTS[@]}"; do TARGETS+=("$t$SUFFIX"); done
[ $ALL = 1 ] && TARGETS+=(pion)

mkdir -p "$BUILD"
cmake -S "$ROOT/tools/cuda-emu" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$BUILD/configure.log" 2>&1 ||
  { cat "$BUILD/configure.log"; exit 1; }
if ! cmake --build "$BUILD" -j"$JOBS" --target "${TARGETS[@]}" >"$BUILD/build.log" 2>&1; then
  grep -E "error|Error" "$BUILD/build.log" | head -40
  echo "cuda-emu: build failed (full log: $BUILD/build.log)"
  exit 1
fi

status=0
failed=()
echo "== emu_selftest"
"$BUILD/emu_selftest" 2>/dev/null | sed 's/^/   /' || { status=1; failed+=(emu_selftest); }

orders=("${EMU_ORDER:-forward}")
[ $ORDERS = 1 ] && orders=(forward reverse random)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
for order in "${orders[@]}"; do
  for t in "${TESTS[@]}"; do
    exe="$BUILD/$t$SUFFIX"
    log="$BUILD/$t$SUFFIX.$order.log"
    echo "== $t$SUFFIX (EMU_ORDER=$order)"
    start=$(date +%s)
    (cd "$BUILD" && EMU_ORDER=$order "$exe") >"$log" 2>&1
    rc=$?
    grep -E '^\[ +(OK|FAILED|SKIPPED) +\] [A-Za-z]' "$log" | sort -u -k4,4 | sed 's/^/   /'
    grep -E '^\[cuda-emu\] (WARNING|FATAL)|ERROR: AddressSanitizer' "$log" | sort -u | sed 's/^/   /'
    echo "   exit $rc, $(( $(date +%s) - start )) s (log: $log)"
    passed=$(grep -cE '^\[ +OK +\] [A-Za-z]' "$log")
    warnings=$(grep -cE '^\[cuda-emu\] WARNING' "$log")
    if [ $rc != 0 ] || [ "$passed" = 0 ] || [ "$warnings" != 0 ]; then
      [ "$passed" = 0 ] && echo "   no test passed (all skipped, or none ran)"
      [ "$warnings" != 0 ] && echo "   $warnings emulator warning(s): see above"
      status=1
      failed+=("$t$SUFFIX ($order)")
    fi
  done
done
# A broken CUDA set-up must fail the GPU tests, not skip them: test_cuda_layers under a faked
# cudaGetDeviceCount error (the emulator's EMU_FAKE_DEVICE_ERROR). cudaErrorUnknown (999) and
# a driver too old (cudaErrorInsufficientDriver, 35, with driver 12.4) must fail every test
# with CUDA's message; cudaErrorNoDevice (100) must skip them all.
fake_check() {  # fake_check ERROR DRIVER_VERSION WANT(fail|skip) TEXT
  local log="$BUILD/test_cuda_layers$SUFFIX.fake$1.log" ok=1
  (cd "$BUILD" && EMU_FAKE_DEVICE_ERROR=$1 EMU_FAKE_DRIVER_VERSION=$2 \
    "$BUILD/test_cuda_layers$SUFFIX") >"$log" 2>&1
  local rc=$? passed skipped
  passed=$(grep -cE '^\[ +OK +\] [A-Za-z]' "$log")
  skipped=$(grep -cE '^\[ +SKIPPED +\] [A-Za-z]' "$log")
  if [ "$3" = fail ]; then
    [ $rc != 0 ] && [ "$passed" = 0 ] && [ "$skipped" = 0 ] && grep -qF "$4" "$log" || ok=0
  else
    [ $rc = 0 ] && [ "$passed" = 0 ] && [ "$skipped" != 0 ] || ok=0
  fi
  echo "   EMU_FAKE_DEVICE_ERROR=$1: exit $rc, $passed passed, $skipped skipped: $([ $ok = 1 ] &&
    echo "$3 as it must" || echo "WRONG, expected $3 (log: $log)")"
  if [ $ok != 1 ]; then status=1; failed+=("fake device error $1"); fi
}
echo "== test_cuda_layers$SUFFIX under faked cudaGetDeviceCount errors"
fake_check 999 13000 fail "cudaGetDeviceCount failed: cudaErrorUnknown"
fake_check 35 12040 fail "supports CUDA up to 12.4"
fake_check 100 13000 skip ""

if [ $status = 0 ]; then
  echo "cuda-emu: all passed"
else
  echo "cuda-emu: FAILED: ${failed[*]}"
fi
exit $status
