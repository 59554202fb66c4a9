#!/usr/bin/env bash
# RL demo: the main job's three pretrained checkpoints (AdamW, Muon, Pion) -> a short SFT on
# 1-2 digit addition and subtraction that leaves greedy accuracy well below 100% -> GRPO
# (`pion rl`) with the same optimizer, two seeds each. Writes <out>/REPORT.md (held-out exact
# match before SFT, after SFT and after RL; mean and both seeds) and <out>/reward.png (reward
# per step, and held-out exact match at each eval).
#
#   scripts/rl-demo.sh [--main-job DIR] [--out DIR] [--sft-iters N] [--rl-iters N]
#                      [--seeds "1 2"] [--jobs N] [--build-dir DIR]
#
# Defaults: main job runs/main-job (run scripts/main-job.sh first), out <main-job>/rl-demo,
# 400 SFT steps (AdamW: ~28% held-out exact match), 300 RL steps of 64 prompts x 8 completions,
# one PPO epoch, lr scale 0.025 of the main job's (AdamW 5e-5), seeds 1 and 2, two pipelines at a
# time with one thread each. Both stages use --seq_len 12 (the tasks are at most 10 tokens; the
# model's context stays). The RL settings come from the single-seed AdamW runs in
# docs/RESULTS.md: 16 prompts per step or more than one PPO epoch made greedy accuracy dip first;
# 64 prompts at 5e-5 rose slowly (+2.5 points at step 100-200, +6 at step 300).
set -euo pipefail
cd "$(dirname "$0")/.."

main_job=runs/main-job
out=""
sft_iters=400
rl_iters=300
seeds="1 2"
jobs=2
build_dir=build
while [[ $# -gt 0 ]]; do
  case "$1" in
    --main-job) main_job="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --sft-iters) sft_iters="$2"; shift 2 ;;
    --rl-iters) rl_iters="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "rl-demo.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-$main_job/rl-demo}
pion="$build_dir/pion"
python=/usr/bin/python3  # Debian's, with python3-matplotlib
[[ -x "$pion" ]] || { echo "rl-demo.sh: $pion not found; run scripts/main-job.sh first" >&2; exit 1; }
for opt in adamw muon pion; do
  [[ -f "$main_job/$opt/checkpoint.safetensors" ]] ||
    { echo "rl-demo.sh: $main_job/$opt/checkpoint.safetensors missing; run scripts/main-job.sh first" >&2; exit 1; }
done
mkdir -p "$out"

# One task list with two answer keys: the same prompts in the same order, so SFT and RL hold
# out the same last 10% (val_fraction 0.1) and every accuracy below is on the same 200 prompts.
n=4000
"$pion" make-task arithmetic --out "$out/sft.jsonl" --n $n --seed 1 --max_digits 2 --ops +- >/dev/null
"$pion" make-task arithmetic --out "$out/rl.jsonl" --n $n --seed 1 --max_digits 2 --ops +- \
  --answer_key answer >/dev/null
sed -n "$((n - n / 10 + 1)),$((n - n / 10 + 400))p" "$out/sft.jsonl" > "$out/held-out.jsonl"

# Learning rates: each optimizer's pretraining rates (scripts/main-job.sh: AdamW 2e-3, Muon
# 0.02 and Pion 0.005 on the hidden matrices, AdamW 2e-3 on the rest) times 0.5 for SFT and
# times 0.015 for RL (a policy-gradient step is noisy: Adam-type normalisation turns noise into
# full-size steps, so RL wants a far smaller rate than pretraining).
lrs() {  # optimizer scale -> flags
  local opt=$1 s=$2
  local base; base=$("$python" -c "print('%.3g' % (2e-3 * $s))")
  case $opt in
    adamw) echo "--lr $base" ;;
    muon) echo "--lr $base --matrix_lr $("$python" -c "print('%.3g' % (0.02 * $s))")" ;;
    pion) echo "--lr $base --matrix_lr $("$python" -c "print('%.3g' % (0.005 * $s))")" ;;
  esac
}
common=(--seq_len 12 --val_fraction 0.1 --eval_examples 400 --threads 1 --checkpoint_minutes 0)

pipeline() {  # opt seed
  local opt=$1 seed=$2 dir="$out/$1-seed$2"
  rm -rf "$dir"
  mkdir -p "$dir"
  # shellcheck disable=SC2046
  "$pion" finetune --from "$main_job/$opt/checkpoint.safetensors" --tasks "$out/sft.jsonl" \
    --out_dir "$dir/sft" --seed "$seed" --max_iters "$sft_iters" --batch_size 32 \
    --warmup_iters 20 --eval_interval "$sft_iters" --log_interval 200 $(lrs "$opt" 0.5) \
    "${common[@]}" > "$dir/sft.log" 2>&1
  # shellcheck disable=SC2046
  "$pion" rl --from "$dir/sft/checkpoint.safetensors" --tasks "$out/rl.jsonl" \
    --out_dir "$dir/rl" --seed "$seed" --max_iters "$rl_iters" --rl_prompts_per_step 64 \
    --rl_group_size 8 --rl_max_new_tokens 4 --ppo_epochs 1 --warmup_iters 20 \
    --eval_interval 50 --log_interval 50 $(lrs "$opt" 0.025) "${common[@]}" > "$dir/rl.log" 2>&1
  echo "   $opt seed $seed: $(grep -h 'exact match' "$dir/sft.log" | tail -1 | sed 's/^done: //')"
  echo "   $opt seed $seed: $(grep -h '^done' "$dir/rl.log" | sed 's/^done: //')"
}

echo "== exact match of the pretrained checkpoints (before SFT)"
for opt in adamw muon pion; do
  "$pion" eval --checkpoint "$main_job/$opt/checkpoint.safetensors" --tasks "$out/held-out.jsonl" \
    --max_examples 400 --batches 1 > "$out/$opt-before.log" 2>&1
  grep -h "exact match" "$out/$opt-before.log" | tail -1 | sed "s/^/   $opt: /"
done

echo "== SFT ($sft_iters steps) then GRPO ($rl_iters steps), $jobs at a time"
start=$(date +%s)
running=0
for seed in $seeds; do
  for opt in adamw muon pion; do
    pipeline "$opt" "$seed" &
    running=$((running + 1))
    if [[ $running -ge $jobs ]]; then wait -n; running=$((running - 1)); fi
  done
done
wait
echo "   $(( $(date +%s) - start )) s"

echo "== report"
"$python" scripts/rl_report.py "$out" $seeds
