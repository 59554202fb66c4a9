#!/usr/bin/env bash
# scripts/gpu-all.sh without a GPU: runs in a temporary copy of the repository layout whose
# gpu-check.sh, gpu-bench.sh, gpu-generate.sh and gpu-train.sh are stubs that log their
# arguments and exit with the status FAIL_<stage> asks for. Checks: the stages run in order
# (check, optim, generate, train) with the size flags forwarded; a failing stage does not stop
# the later ones and the exit status is 1; summary.txt names every stage's status; --only;
# --dry-run; bad arguments exit 2.
# Usage: tests/scripts/test_gpu_all.sh SOURCE_DIR (ctest: ScriptGpuAll).
source "$(dirname "$0")/lib.sh" "${1:-}"

repo=$tmp/repo
mkdir -p "$repo/scripts"
cp "$src/scripts/gpu-all.sh" "$repo/scripts/"
for stage in check bench generate train; do
  cat >"$repo/scripts/gpu-$stage.sh" <<X
#!/usr/bin/env bash
echo "gpu-$stage.sh \$*" >>"$tmp/calls"
var=FAIL_$stage
exit "\${!var:-0}"
X
  chmod +x "$repo/scripts/gpu-$stage.sh"
done
run() { (cd "$repo" && bash scripts/gpu-all.sh "$@") >"$tmp/out" 2>&1; }

: >"$tmp/calls"
run --out "$tmp/o1" --optim-steps 3 --drift-steps 7 --train-steps 4 --iters 50 --no-compile
rc=$?
[[ $rc -eq 0 ]] && ok "all stages pass: exit 0" || fail "exit $rc with every stage passing: $(cat "$tmp/out")"
expected="gpu-check.sh --out $tmp/o1/check
gpu-bench.sh --steps 3 --drift_steps 7 --out $tmp/o1/optim
gpu-generate.sh --out $tmp/o1/generate
gpu-train.sh --steps 4 --iters 50 --no-compile --out $tmp/o1/train"
[[ "$(cat "$tmp/calls")" == "$expected" ]] && ok "stages in order, sizes forwarded" ||
  fail "calls were: $(cat "$tmp/calls")"
grep -q "== check: exit 0" "$tmp/o1/summary.txt" && grep -q "== train: exit 0" "$tmp/o1/summary.txt" &&
  grep -q "gpu-all: ok" "$tmp/o1/summary.txt" && ok "summary.txt" ||
  fail "summary.txt: $(cat "$tmp/o1/summary.txt")"

: >"$tmp/calls"
FAIL_check=1 run --out "$tmp/o2"
rc=$?
[[ $rc -eq 1 ]] && ok "a failed check: exit 1" || fail "a failed check gave exit $rc"
[[ $(wc -l <"$tmp/calls") -eq 4 ]] && ok "the measurements still ran after a failed check" ||
  fail "calls after a failed check: $(cat "$tmp/calls")"
grep -q "== check: exit 1" "$tmp/o2/summary.txt" && grep -q "gpu-all: FAILED" "$tmp/o2/summary.txt" &&
  ok "summary names the failure" || fail "summary.txt: $(cat "$tmp/o2/summary.txt")"

: >"$tmp/calls"
run --out "$tmp/o3" --only optim,train
[[ "$(cut -d' ' -f1 "$tmp/calls" | tr '\n' ' ')" == "gpu-bench.sh gpu-train.sh " ]] &&
  ok "--only optim,train" || fail "--only optim,train ran: $(cat "$tmp/calls")"
grep -q -- "--no-build" "$tmp/calls" && fail "--no-build without a build-gpu/pion" ||
  ok "optim builds when nothing is built"

: >"$tmp/calls"
run --dry-run --out "$tmp/o4"
[[ ! -s "$tmp/calls" ]] && grep -q "^check: scripts/gpu-check.sh" "$tmp/out" &&
  ok "--dry-run prints the stages and runs none" || fail "--dry-run: $(cat "$tmp/out") / $(cat "$tmp/calls")"

for bad in "--only check,quality" "--optim-steps 0" "--iters x" "--out" "--frobnicate"; do
  # shellcheck disable=SC2086
  run $bad
  rc=$?
  [[ $rc -eq 2 ]] && ok "'$bad' exits 2" || fail "'$bad' gave exit $rc: $(cat "$tmp/out")"
done

finish test_gpu_all
