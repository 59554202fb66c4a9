#!/usr/bin/env bash
# scripts/emu-count.sh's arguments, without the emulator: a fake build-emu/pion records the
# arguments of each run. Checks: --attention reaches every run (materialized by default,
# flash when asked), a bad --attention or an unknown argument exits 2 naming it before any
# run, --help shows the usage with --attention, a failed run stops the script (exit 1).
# Usage: tests/scripts/test_emu_count.sh SOURCE_DIR (ctest: ScriptEmuCount).
source "$(dirname "$0")/lib.sh" "${1:-}"

repo=$tmp/repo
mkdir -p "$repo/scripts" "$repo/build-emu"
cp "$src/scripts/emu-count.sh" "$src/scripts/emu_count_report.py" "$repo/scripts/"
# The fake pion appends its arguments to runs.log and fails (no EMU_COUNT JSON is written), so
# the script stops after the first run: enough to see what that run was given.
cat >"$repo/build-emu/pion" <<'X'
#!/bin/sh
echo "$*" >>"$(dirname "$0")/runs.log"
echo "fake pion: no emulator here"
exit 1
X
chmod +x "$repo/build-emu/pion"
runs=$repo/build-emu/runs.log

count() { (cd "$repo" && bash scripts/emu-count.sh --no-build --optimizers muon --out "$tmp/out" "$@") \
  >"$tmp/stdout" 2>"$tmp/stderr"; }

count
rc=$?
[[ $rc -eq 1 ]] && ok "a failed run exits 1" || fail "a failed run: exit $rc, expected 1"
grep -q -- "--attention materialized" "$runs" 2>/dev/null && ok "materialized by default" ||
  fail "default run: $(cat "$runs" 2>/dev/null)"
grep -q "muon L1 B1 S128 failed" "$tmp/stderr" && ok "the failed run is named" ||
  fail "no failure line: $(cat "$tmp/stderr")"

rm -f "$runs"
count --attention flash
grep -q -- "--attention flash" "$runs" 2>/dev/null && ok "--attention flash reaches the run" ||
  fail "flash run: $(cat "$runs" 2>/dev/null)"

rm -f "$runs"
for bad in "--attention flsh" "--attention" "--layers 3"; do
  # shellcheck disable=SC2086
  count $bad
  rc=$?
  if [[ $rc -eq 2 && ! -e $runs ]] && grep -q -- "${bad%% *}\|unknown argument" "$tmp/stderr"; then
    ok "'$bad' exits 2 before any run: $(head -1 "$tmp/stderr")"
  else
    fail "'$bad': exit $rc, runs: $(cat "$runs" 2>/dev/null), stderr: $(cat "$tmp/stderr")"
  fi
done

(cd "$repo" && bash scripts/emu-count.sh --help) >"$tmp/help" 2>&1
rc=$?
[[ $rc -eq 0 ]] && grep -q -- "--attention materialized|flash" "$tmp/help" && ! grep -q "^set -e" "$tmp/help" &&
  ok "--help shows the usage" || fail "--help: exit $rc: $(cat "$tmp/help")"

finish test_emu_count
