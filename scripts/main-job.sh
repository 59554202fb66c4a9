#!/usr/bin/env bash
# The main job: build pion, then train the same small LLaMA-style model on the built-in corpus
# (the Debian `fortunes` text, char tokenizer) with AdamW, Muon and Pion, one after the other,
# and write a report (table + PNG plots of val loss against step and wall time, and of each
# Pion matrix's spectrum before and after) to <out>/report/REPORT.md.
#
#   scripts/main-job.sh [--out DIR] [--iters N] [--threads N] [--build-dir DIR]
#
# Defaults: out runs/main-job, 1200 iterations per optimizer, all cores. About 6-8 minutes
# on 2 cores (build included). Re-running reuses the build and the tokenized corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

out=runs/main-job
iters=1200
threads=0
build_dir=build
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --iters) iters="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "main-job.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
python=/usr/bin/python3  # Debian's, with python3-matplotlib for the plots

echo "== building pion (Release) in $build_dir"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target pion >/dev/null
pion="$build_dir/pion"

# One model and schedule for all three; each optimizer keeps the learning rate it is known to
# work with at this size (AdamW 2e-3; Muon 0.02 on the hidden matrices; Pion 0.005 with the
# spectral init the spec recommends, since Pion can never change the spectrum it starts with).
# The embeddings, LM head and norms use AdamW at `lr` in every run.
common=(--data "$out/data" --tokenizer char --n_layer 4 --n_head 4 --d_model 128 --seq_len 64
        --batch_size 16 --max_iters "$iters" --warmup_iters 100 --schedule cosine
        --min_lr_ratio 0.1 --grad_clip 1 --beta1 0.9 --beta2 0.99 --weight_decay 0.1
        --lr 2e-3 --eval_interval 100 --eval_iters 50 --log_interval 100 --threads "$threads")

mkdir -p "$out"
if [[ ! -f "$out/data/train.bin" ]]; then
  echo "== tokenizing the built-in corpus into $out/data"
  "$pion" prepare --input fortunes --tokenizer char --out "$out/data"
fi
run() {
  local name=$1; shift
  echo "== training $name"
  # A rerun starts each run afresh, so its metrics never mix with an older run's.
  rm -rf "${out:?}/$name"
  "$pion" train "${common[@]}" "$@" --out_dir "$out/$name"
}
run adamw --optimizer adamw
run muon --optimizer muon --matrix_lr 0.02
run pion --optimizer pion --matrix_lr 0.005 --init spectral

echo "== report"
"$python" scripts/report.py "$out/report" "$out/adamw" "$out/muon" "$out/pion"
