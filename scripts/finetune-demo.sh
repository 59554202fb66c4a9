#!/usr/bin/env bash
# Finetuning demo: take the three checkpoints of the main job (AdamW, Muon and Pion, each
# pretrained on the built-in corpus), finetune each with its own optimizer on a generated
# addition task ("63+32=" -> "95"), and print the held-out exact-match accuracy of greedy
# answers before and after, as a Markdown table.
#
#   scripts/finetune-demo.sh [--main-job DIR] [--iters N] [--n N] [--threads N] [--build-dir DIR]
#
# Defaults: main job runs/main-job (run scripts/main-job.sh first), 1500 finetuning steps,
# 6000 examples of 1-2 digit addition (the last 10% held out), all cores. About 5 minutes
# on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

main_job=runs/main-job
iters=1500
examples=6000
threads=0
build_dir=build
while [[ $# -gt 0 ]]; do
  case "$1" in
    --main-job) main_job="$2"; shift 2 ;;
    --iters) iters="$2"; shift 2 ;;
    --n) examples="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "finetune-demo.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
pion="$build_dir/pion"
[[ -x "$pion" ]] || { echo "finetune-demo.sh: $pion not found; run scripts/main-job.sh first" >&2; exit 1; }
python=/usr/bin/python3
out="$main_job/finetune"
mkdir -p "$out"
tasks="$out/addition.jsonl"
"$pion" make-task arithmetic --out "$tasks" --n "$examples" --seed 7 --min_digits 1 --max_digits 2 >/dev/null
# The held-out examples are the last 10% of the file (finetune's val_fraction); the "before"
# accuracy is measured on exactly those.
held_out="$out/held-out.jsonl"
tail -n $((examples / 10)) "$tasks" > "$held_out"

accuracy() {  # eval output -> the exact-match fraction
  sed -n 's/.*exact match \([0-9.]*\)%.*/\1/p' | tail -1
}
rows=()
for opt in adamw muon pion; do
  ckpt="$main_job/$opt/checkpoint.safetensors"
  [[ -f "$ckpt" ]] || { echo "finetune-demo.sh: $ckpt missing; run scripts/main-job.sh first" >&2; exit 1; }
  echo "== $opt: accuracy before finetuning"
  eval_log=$("$pion" eval --checkpoint "$ckpt" --tasks "$held_out" --max_examples 200 --batches 1)
  echo "$eval_log"
  before=$(accuracy <<<"$eval_log")
  echo "== $opt: finetuning $iters steps"
  rm -rf "${out:?}/$opt"
  "$pion" finetune --from "$ckpt" --tasks "$tasks" --max_iters "$iters" --warmup_iters 30 \
    --eval_interval 500 --log_interval 250 --threads "$threads" --eval_examples 200 --out_dir "$out/$opt"
  after=$("$python" -c 'import json,sys; print("%.1f" % (100 * json.load(open(sys.argv[1]))["exact_match"]))' "$out/$opt/summary.json")
  loss=$("$python" -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["best_val_loss"])' "$out/$opt/summary.json")
  rows+=("| $opt | ${before:-?}% | $after% | $loss |")
done

{
  echo "| optimizer (pretraining and finetuning) | exact match before | exact match after $iters steps | best held-out response loss |"
  echo "|---|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Task: $examples examples of 1-2 digit addition (\`pion make-task arithmetic --seed 7\`), the last"
  echo "10% held out; greedy answers on 200 held-out prompts; loss on response tokens only."
} | tee "$out/RESULTS.md"
