#!/usr/bin/env bash
# Training throughput: `pion train` against PyTorch CPU (bench/torch_train.py) training the
# same model with the same config on the same token shard, side by side in one run, the two
# sides interleaved (pion, torch, pion, torch, ...) so machine load hits both alike.
# Prints a Markdown table with hardware, date, versions and the command.
#
#   scripts/bench-train.sh [--steps N] [--reps N] [--threads N] [--build-dir DIR]
#                          [--baseline PION_BINARY] [--configs baby,mid]
#
# --baseline compares two pion builds instead (before/after a change): the baseline binary
# takes PyTorch's place in the interleaving, for every optimizer, and the table gives this
# build's tokens/s over the baseline's.
#
# Defaults: 150 steps per measurement, 2 repetitions (the best of each side is reported, the
# least disturbed by other load), threads = nproc, build dir build-bench. Data:
# ../shared/data/tinyshakespeare.txt (char tokenizer). Configs: nanoGPT's baby config and its
# shakespeare-char size (6 layers, d_model 384, seq_len 256) at batch 8.
set -euo pipefail
cd "$(dirname "$0")/.."
command_line="scripts/bench-train.sh${*:+ $*}"

steps=150
reps=2
threads=$(nproc)
build_dir=build-bench
baseline=
configs=baby,mid
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    --baseline) baseline="$2"; shift 2 ;;
    --configs) configs="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench-train.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
python=/usr/bin/python3  # Debian's: it has torch (the pyenv python3 on PATH may not)
text=../shared/data/tinyshakespeare.txt
[[ -f "$text" ]] || { echo "bench-train.sh: $text not found (../shared must sit beside the checkout)" >&2; exit 1; }
"$python" -c 'import torch' 2>/dev/null ||
  { echo "bench-train.sh: $python cannot import torch; install python3-torch" >&2; exit 1; }

export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DPION_CUDA=OFF -DPION_BUILD_TESTS=OFF >/dev/null
fi
cmake --build "$build_dir" -j"$(nproc)" --target pion >/dev/null
pion="$build_dir/pion"
work="$build_dir/bench-train"
mkdir -p "$work"
[[ -f "$work/data/train.bin" ]] || "$pion" prepare --input "$text" --tokenizer char --out "$work/data" >/dev/null

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start_time=$(date +%s)
declare -A best
rows=()
train_tokens_per_sec() {  # binary, optimizer, pion flags...
  local binary=$1 optimizer=$2; shift 2
  rm -rf "$work/run"
  "$binary" train --data "$work/data" --optimizer "$optimizer" --max_iters "$steps" --warmup_iters 10 \
    --eval_interval 0 --log_interval 1000000 --threads "$threads" "$@" --out_dir "$work/run" >/dev/null
  "$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens_per_sec"])' "$work/run/summary.json"
}
keep_best() {  # key, value
  local v=$2
  [[ -z "${best[$1]:-}" ]] || v=$("$python" -c "print(max($v, ${best[$1]}))")
  best[$1]=$v
}
measure() {  # name, optimizer, json config (model + batch), pion flags...
  local name=$1 optimizer=$2 cfg=$3; shift 3
  local key="$name/$optimizer"
  for ((r = 0; r < reps; r++)); do
    keep_best "$key/pion" "$(train_tokens_per_sec "$pion" "$optimizer" "$@")"
    if [[ -n "$baseline" ]]; then
      keep_best "$key/baseline" "$(train_tokens_per_sec "$baseline" "$optimizer" "$@")"
    elif [[ "$optimizer" == adamw ]]; then
      local t
      t=$("$python" bench/torch_train.py --data "$work/data" --config "$cfg" --steps "$steps" --threads "$threads" |
        "$python" -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_sec"])')
      [[ -z "${best[$key/torch]:-}" ]] || t=$("$python" -c "print(max($t, ${best[$key/torch]}))")
      best[$key/torch]=$t
    fi
  done
}

baby_flags=(--n_layer 4 --n_head 4 --d_model 128 --seq_len 64 --batch_size 12)
baby_cfg='{"n_layer": 4, "n_head": 4, "d_model": 128, "seq_len": 64, "batch_size": 12, "lr": 0.001}'
mid_flags=(--n_layer 6 --n_head 6 --d_model 384 --seq_len 256 --batch_size 8)
mid_cfg='{"n_layer": 6, "n_head": 6, "d_model": 384, "seq_len": 256, "batch_size": 8, "lr": 0.001}'
IFS=, read -r -a config_names <<< "$configs"
for name in "${config_names[@]}"; do
  [[ "$name" == baby || "$name" == mid ]] ||
    { echo "bench-train.sh: --configs takes baby and/or mid, got '$name'" >&2; exit 2; }
done
for opt in adamw muon pion; do
  for name in "${config_names[@]}"; do
    flags_var="${name}_flags[@]" cfg_var="${name}_cfg"
    measure "$name" "$opt" "${!cfg_var}" "${!flags_var}"
  done
done

if [[ -n "$baseline" ]]; then
  echo "## Training throughput: this pion build vs a baseline build (one run, interleaved)"
  echo
  echo "| config | optimizer | baseline tok/s | this build tok/s | this / baseline |"
  echo "|---|---|---:|---:|---:|"
  for name in "${config_names[@]}"; do
    for opt in adamw muon pion; do
      echo "| $name | $opt | ${best[$name/$opt/baseline]} | ${best[$name/$opt/pion]} |" \
        "$("$python" -c "print(f'{${best[$name/$opt/pion]} / ${best[$name/$opt/baseline]}:.3f}')") |"
    done
  done
  echo
  echo "Best of $reps runs of $steps steps each, $threads threads, $(date -u +%Y-%m-%dT%H:%M:%SZ);" \
    "baseline: $baseline; this build: git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)." \
    "Load average before $load_before, after $(cut -d' ' -f1-3 /proc/loadavg)."
  exit 0
fi
fmt() { "$python" -c "print(f'{float(\"$1\"):,.0f}')"; }
ratio() { "$python" -c "print(f'{float(\"$1\") / float(\"$2\"):.2f}')"; }
echo "## Training throughput: pion train vs PyTorch CPU (one run, interleaved)"
echo
echo "| config | PyTorch AdamW tok/s | pion AdamW tok/s | pion / PyTorch | pion Muon tok/s | pion Pion tok/s | Pion / AdamW (pion) |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for name in "${config_names[@]}"; do
  echo "| $name | $(fmt "${best[$name/adamw/torch]}") | $(fmt "${best[$name/adamw/pion]}") |" \
       "$(ratio "${best[$name/adamw/pion]}" "${best[$name/adamw/torch]}") | $(fmt "${best[$name/muon/pion]}") |" \
       "$(fmt "${best[$name/pion/pion]}") | $(ratio "${best[$name/pion/pion]}" "${best[$name/adamw/pion]}") |"
done
cat <<EOF

baby: 4 layers, 4 heads, d_model 128, seq_len 64, batch 12 (nanoGPT's baby config, LLaMA
variant). mid: 6 layers, 6 heads, d_model 384, seq_len 256, batch 8. Char tokenizer on
tinyshakespeare (vocab 65); fp32; $steps steps per measurement, best of $reps (tokens / time in
training steps, evals off). PyTorch runs AdamW only (its peer); Muon and Pion are pion's own
runs, shown as throughput relative to pion's AdamW.

| | |
|---|---|
| CPU | $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) logical CPUs, $threads threads used by both sides |
| date | $(date -u +%Y-%m-%dT%H:%M:%SZ) |
| load average (1/5/15 min) | before $load_before, after $(cut -d' ' -f1-3 /proc/loadavg) |
| wall time of the run | $(( $(date +%s) - start_time )) s |
| pion | git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(c++ --version | head -1), Release |
| PyTorch | $("$python" -c 'import torch; print(torch.__version__)') (Debian python3-torch), OMP_NUM_THREADS=$threads |
| command | \`$command_line\` |
EOF
