#!/usr/bin/env bash
# scripts/rl-demo.sh's argument and input checks (the demo itself takes ~25 minutes): an
# unknown argument exits 2; a missing pion binary or main-job checkpoint exits 1 with a line
# saying what to run first; --help prints the usage. A stub `pion` stands in for the binary.
# Usage: tests/scripts/test_rl_demo.sh SOURCE_DIR (ctest: ScriptRlDemo).
source "$(dirname "$0")/lib.sh" "${1:-}"
mkdir -p "$tmp/bin" "$tmp/job/adamw" "$tmp/job/muon"
printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/pion"
chmod +x "$tmp/bin/pion"
: >"$tmp/job/adamw/checkpoint.safetensors"
: >"$tmp/job/muon/checkpoint.safetensors"
demo() { bash "$src/scripts/rl-demo.sh" "$@" >"$tmp/log" 2>&1; }

demo --frobnicate
rc=$?
[[ $rc -eq 2 ]] && grep -q "unknown argument '--frobnicate'" "$tmp/log" && ok "unknown argument: exit 2" ||
  fail "unknown argument gave exit $rc: $(cat "$tmp/log")"
demo --help
rc=$?
[[ $rc -eq 0 ]] && grep -q "rl-demo.sh \[--main-job DIR\]" "$tmp/log" && ok "--help" ||
  fail "--help gave exit $rc: $(cat "$tmp/log")"
demo --build-dir "$tmp/nothing" --main-job "$tmp/job" --out "$tmp/out"
rc=$?
[[ $rc -eq 1 ]] && grep -q "pion not found; run scripts/main-job.sh first" "$tmp/log" &&
  ok "no binary: exit 1 with what to run" || fail "no binary gave exit $rc: $(cat "$tmp/log")"
demo --build-dir "$tmp/bin" --main-job "$tmp/job" --out "$tmp/out"
rc=$?
[[ $rc -eq 1 ]] && grep -q "pion/checkpoint.safetensors missing; run scripts/main-job.sh first" "$tmp/log" &&
  ok "a missing checkpoint (pion): exit 1 naming it" || fail "missing checkpoint gave exit $rc: $(cat "$tmp/log")"
[[ ! -e "$tmp/out" ]] && ok "nothing written on refusal" || fail "the output folder was created"

finish test_rl_demo
