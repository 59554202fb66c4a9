#!/usr/bin/env bash
# 1 rank vs 2 ranks (mpirun) on nanoGPT's baby config, for each optimizer: the weights after
# 50 steps (max relative difference), and per-rank optimizer step time and state memory
# (from summary.json). Prints the Markdown table of docs/BENCHMARKS.md's MPI section.
#   scripts/mpi-scaling.sh [build-dir] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
steps=${2:-50}
pion=$PWD/$build/pion
work=$(mktemp -d /tmp/pion-mpi-scaling.XXXXXX)
data=${PION_DATA:-$PWD/../shared/data/tinyshakespeare.txt}
# nanoGPT's baby config (docs/RESULTS.md), one thread per rank, no evaluation.
common="--data $data --tokenizer char --n_layer 4 --n_head 4 --d_model 128 --seq_len 64
  --batch_size 12 --max_iters $steps --warmup_iters 10 --schedule cosine --min_lr_ratio 0.1
  --grad_clip 1 --beta1 0.9 --beta2 0.99 --weight_decay 0.1 --dropout 0 --lr 0.001
  --eval_interval 0 --log_interval 1000 --threads 1"
declare -A extra=([adamw]="" [muon]="--matrix_lr 0.02" [pion]="--init spectral --matrix_lr 0.002")
mpirun_=(mpirun --allow-run-as-root --oversubscribe -x OMP_NUM_THREADS=1)
echo "| optimizer | ranks | max rel. weight diff vs 1 rank | optimizer step, wall ms (per rank) | optimizer step, CPU ms (per rank) | optimizer state MiB (per rank) | comm. wall ms/step (per rank) |"
echo "|---|---|---|---|---|---|---|"
for opt in adamw muon pion; do
  OMP_NUM_THREADS=1 "$pion" train $common --optimizer $opt ${extra[$opt]} --out_dir $work/$opt-1 > $work/$opt-1.log 2>&1
  "${mpirun_[@]}" -np 2 "$pion" train $common --optimizer $opt ${extra[$opt]} --out_dir $work/$opt-2 > $work/$opt-2.log 2>&1
  rel=$(/usr/bin/python3 scripts/compare_checkpoints.py $work/$opt-2/checkpoint.safetensors $work/$opt-1/checkpoint.safetensors | awk '{print $4}')
  for n in 1 2; do
    /usr/bin/python3 - "$work/$opt-$n/summary.json" "$opt" "$n" "$rel" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
f = lambda xs, k=1.0: " / ".join(f"{x * k:.2f}" for x in xs)
rel = "—" if sys.argv[3] == "1" else sys.argv[4]
comm = "—" if sys.argv[3] == "1" else f(s["communication_ms_per_rank"])
print(f"| {sys.argv[2]} | {sys.argv[3]} | {rel} | {f(s['optimizer_step_ms_per_rank'])} | "
      f"{f(s['optimizer_step_cpu_ms_per_rank'])} | "
      f"{f(s['optimizer_state_bytes_per_rank'], 1 / 2**20)} | {comm} |")
PY
  done
done
echo "(runs in $work)"
