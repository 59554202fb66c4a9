#!/usr/bin/env bash
# Builds pion's libFuzzer targets (fuzz/, clang + ASan + UBSan) into build-fuzz/ and runs each
# for the given number of seconds (default 60) on a copy of its seed corpus
# (fuzz/corpus/<target>/ -> build-fuzz/corpus/<target>/, which keeps what the run finds).
# Prints one summary line per target and exits non-zero if any target crashed, leaked, timed
# out on an input, ran out of memory or did not run. Crashing inputs land in
# build-fuzz/artifacts/<target>/; reproduce one with  build-fuzz/fuzz_<target> <file>.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]     (targets: safetensors config finetune)
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(safetensors config finetune)
case $seconds in '' | *[!0-9]*) echo "fuzz.sh: seconds must be a whole number, got '$seconds'" >&2; exit 2 ;; esac

command -v clang++ > /dev/null || { echo "fuzz.sh: clang++ not found (apt-get install clang)" >&2; exit 2; }
mkdir -p build-fuzz
CC=clang CXX=clang++ cmake -S fuzz -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo > build-fuzz/configure.log 2>&1 ||
  { cat build-fuzz/configure.log >&2; exit 2; }
cmake --build build-fuzz -j"$(nproc)" > build-fuzz/build.log 2>&1 || { tail -50 build-fuzz/build.log >&2; exit 2; }

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
status=0
for t in "${targets[@]}"; do
  bin=build-fuzz/fuzz_$t
  [ -x "$bin" ] || { echo "fuzz.sh: no target '$t'" >&2; status=1; continue; }
  corpus=build-fuzz/corpus/$t
  artifacts=build-fuzz/artifacts/$t
  log=build-fuzz/fuzz_$t.log
  mkdir -p "$corpus" "$artifacts"
  cp -n fuzz/corpus/$t/* "$corpus"/
  dict=()
  case $t in
    safetensors) dict=(-dict=fuzz/safetensors.dict) ;;
    *) dict=(-dict=fuzz/json.dict) ;;
  esac
  "$bin" "$corpus" "${dict[@]}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=2048 -detect_leaks=1 -max_len=8192 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" > "$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<< "$last")
  ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<< "$last")
  files=$(find "$corpus" -type f | wc -l)
  if [ $rc -eq 0 ] && ! grep -q -E '^==[0-9]+==ERROR|runtime error:|^ERROR: libFuzzer' "$log"; then
    result=ok
  else
    status=1
    if grep -q 'ERROR: libFuzzer: timeout' "$log"; then result=TIMEOUT
    elif grep -q -E 'ERROR: libFuzzer: (out-of-memory|malloc)' "$log"; then result=OOM
    elif grep -q 'ERROR: LeakSanitizer' "$log"; then result=LEAK
    elif grep -q 'runtime error:' "$log"; then result=UNDEFINED-BEHAVIOUR
    elif grep -q -E 'ERROR: (AddressSanitizer|libFuzzer: deadly signal)' "$log"; then result=CRASH
    else result="FAILED (exit $rc)"; fi
    result="$result: $(ls -t "$artifacts" | head -1 | sed "s|^|$artifacts/|"); log $log"
  fi
  printf 'fuzz %-12s %ss  execs %s (%s/s)  cov %s  ft %s  corpus %s  %s\n' \
    "$t" "$seconds" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$files" "$result"
done
exit $status
