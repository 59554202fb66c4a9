#!/usr/bin/env bash
# scripts/gpu-train.sh's argument checks, without a GPU: a bad --attention or --only value and
# an unknown argument exit 2 naming it before anything runs (no output folder is made);
# --help prints the usage.
# Usage: tests/scripts/test_gpu_train.sh SOURCE_DIR (ctest: ScriptGpuTrain).
source "$(dirname "$0")/lib.sh" "${1:-}"

for bad in "--attention flsh" "--only sped" "--frobnicate"; do
  # shellcheck disable=SC2086
  (cd "$src" && OUT="$tmp/out" bash scripts/gpu-train.sh $bad) >"$tmp/stdout" 2>"$tmp/stderr"
  rc=$?
  if [[ $rc -eq 2 && ! -e $tmp/out ]] && grep -q -- "${bad##* }" "$tmp/stderr"; then
    ok "'$bad' exits 2: $(head -1 "$tmp/stderr")"
  else
    fail "'$bad': exit $rc, stderr: $(cat "$tmp/stderr")"
  fi
done
(cd "$src" && bash scripts/gpu-train.sh --help) >"$tmp/help" 2>&1
rc=$?
[[ $rc -eq 0 ]] && grep -q -- "--attention auto|flash|materialized|cudnn" "$tmp/help" &&
  ! grep -q "^set -e" "$tmp/help" && ok "--help prints the usage" ||
  fail "--help: exit $rc: $(cat "$tmp/help")"

finish test_gpu_train
