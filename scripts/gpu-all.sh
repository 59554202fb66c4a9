#!/usr/bin/env bash
# Everything a GPU session checks and measures, in ONE device call (the device tool lends a
# machine for minutes and takes it back, with its build, after ~30 s idle):
#
#   1. check   scripts/gpu-check.sh: build build-gpu (sm_90 only on Hopper), every CUDA test;
#   2. optim   scripts/gpu-bench.sh: the optimizer step against PyTorch (84 GPT-2-small matrices);
#   3. generate scripts/gpu-generate.sh: KV-cached generation on the GPU against the CPU;
#   4. train   scripts/gpu-train.sh: training tokens/s against PyTorch eager (torch.compile
#              last, skipped with --no-compile), then the baby-config quality runs.
#
# A failing stage does not stop the later ones (a failed test still leaves the measurements to
# read); the exit status is 1 if any stage failed. Every log and table goes under --out, with
# summary.txt giving each stage's status and wall time. From the repository root:
#
#   scripts/gpu-check.sh --fetch-deps            # here first, once (Debian 12, network)
#   run(command='scripts/gpu-all.sh --out "$OUT"', carry=[".gpu-deps"], timeout_s=600)
#
#   scripts/gpu-all.sh [--out DIR] [--only check,optim,generate,train] [--optim-steps N]
#                      [--optim-layers N] [--drift-steps N] [--train-steps N] [--iters N]
#                      [--no-compile] [--dry-run]
#
# Sizes (defaults: the scripts' own): --optim-steps / --optim-layers / --drift-steps go to
# gpu-bench.sh (--steps, --layers, --drift_steps), --train-steps and --iters to gpu-train.sh
# (--steps: timed training steps; --iters: the baby runs' length). --dry-run prints the stage
# commands without running them.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '18,20p' "$0" | sed 's/^# *//' >&2
  exit 2
}
out="${OUT:-build-gpu/all}"
only="check,optim,generate,train"
bench_args=()
train_args=()
compile=1
dry=0
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "gpu-all.sh: $1 needs a value" >&2; exit 2; }; }
count() {
  [[ "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]] ||
    { echo "gpu-all.sh: $1 needs a positive whole number, got '$2'" >&2; exit 2; }
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) need "$@"; out="$2"; shift 2 ;;
    --only) need "$@"; only="$2"; shift 2 ;;
    --optim-steps) need "$@"; count "$1" "$2"; bench_args+=(--steps "$2"); shift 2 ;;
    --optim-layers) need "$@"; count "$1" "$2"; bench_args+=(--layers "$2"); shift 2 ;;
    --drift-steps) need "$@"; count "$1" "$2"; bench_args+=(--drift_steps "$2"); shift 2 ;;
    --train-steps) need "$@"; count "$1" "$2"; train_args+=(--steps "$2"); shift 2 ;;
    --iters) need "$@"; count "$1" "$2"; train_args+=(--iters "$2"); shift 2 ;;
    --no-compile) compile=0; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-all.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
IFS=, read -r -a stages <<<"$only"
for s in "${stages[@]}"; do
  case "$s" in
    check|optim|generate|train) ;;
    *) echo "gpu-all.sh: --only takes check, optim, generate and train, got '$s'" >&2; exit 2 ;;
  esac
done
wants() { [[ ",$only," == *",$1,"* ]]; }
[[ $compile -eq 1 ]] || train_args+=(--no-compile)

mkdir -p "$out"
out=$(cd "$out" && pwd)
summary=$out/summary.txt
[[ $dry -eq 1 ]] || : >"$summary"
start=$(date +%s)
status=0
stage() {  # name, command...
  local name=$1
  shift
  if [[ $dry -eq 1 ]]; then
    echo "$name: $*"
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  echo "== $name: $*" | tee -a "$summary"
  "$@"
  rc=$?
  [[ $rc -eq 0 ]] || status=1
  echo "== $name: exit $rc, $(($(date +%s) - t0)) s (total $(($(date +%s) - start)) s)" |
    tee -a "$summary"
}

wants check && stage check scripts/gpu-check.sh --out "$out/check"
# gpu-bench.sh builds build-gpu/pion when the check stage did not (--only optim,train).
build_flag=()
[[ -x build-gpu/pion ]] && build_flag=(--no-build)
wants optim && stage optim scripts/gpu-bench.sh "${build_flag[@]}" "${bench_args[@]}" --out "$out/optim"
[[ -x build-gpu/pion ]] && build_flag=(--no-build)
wants generate && stage generate scripts/gpu-generate.sh "${build_flag[@]}" --out "$out/generate"
wants train && stage train scripts/gpu-train.sh "${train_args[@]}" --out "$out/train"
[[ $dry -eq 1 ]] || echo "== gpu-all: $( [[ $status -eq 0 ]] && echo ok || echo FAILED ), $(($(date +%s) - start)) s; logs under $out" | tee -a "$summary"
exit "$status"
