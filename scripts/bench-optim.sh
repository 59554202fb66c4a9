#!/usr/bin/env bash
# Side-by-side benchmark of one optimizer step on one GPT-2-small-shaped layer: pion (C++,
# bench/bench_optim.cpp) and PyTorch CPU (bench/torch_optim.py) doing the same math, in one
# run, with the same thread count and the same OpenBLAS, plus the sgemm rate that sets the
# GEMM roofline. Prints a Markdown table with hardware, date, versions and the command.
#
#   scripts/bench-optim.sh [--reps N] [--threads N] [--build-dir DIR] [--out DIR]
#
# Defaults: 5 repetitions (median reported, after 2 warm-up steps), threads = nproc,
# build dir build-bench (configured Release without tests if missing), results in
# <build dir>/bench-optim/{pion.json,torch.json,table.md}. About 3 minutes on an idle
# 2-core machine; timings are only meaningful when the machine is otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."
command_line="scripts/bench-optim.sh${*:+ $*}"

reps=5
threads=$(nproc)
build_dir=build-bench
out_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --reps) reps="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    --out) out_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "bench-optim.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
out_dir=${out_dir:-$build_dir/bench-optim}
python=/usr/bin/python3  # Debian's: it has torch 1.13 (the pyenv python3 on PATH does not)

if ! "$python" -c 'import torch' 2>/dev/null; then
  echo "bench-optim.sh: $python cannot import torch; install python3-torch (scripts/install-deps.sh)" >&2
  exit 1
fi
# Debian's torch uses whatever libblas.so.3 update-alternatives selects; the reference BLAS
# would make the PyTorch side ~20x slower and the comparison meaningless.
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo unknown)
if [[ "$blas" != *openblas* ]]; then
  echo "bench-optim.sh: libblas.so.3 resolves to $blas, not OpenBLAS; install libopenblas0-pthread" >&2
  exit 1
fi

# Both sides: the same threads for OpenMP (pion's loops, PyTorch's intra-op pool) and OpenBLAS.
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads

if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DPION_CUDA=OFF -DPION_BUILD_TESTS=OFF \
    >/dev/null
fi
build_type=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build_dir/CMakeCache.txt")
if [[ "$build_type" != Release ]]; then
  echo "bench-optim.sh: $build_dir is a '$build_type' build; use a Release build dir (--build-dir)" >&2
  exit 1
fi
cmake --build "$build_dir" -j"$(nproc)" --target bench_optim >/dev/null

mkdir -p "$out_dir"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start=$(date +%s)
echo "pion (C++) ..." >&2
"$build_dir/bench/bench_optim" --reps="$reps" --benchmark_out="$out_dir/pion.json" \
  --benchmark_out_format=json >&2
echo "PyTorch ..." >&2
"$python" bench/torch_optim.py --threads "$threads" --reps "$reps" --json "$out_dir/torch.json"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
elapsed=$(($(date +%s) - start))

"$python" - "$out_dir" "$command_line" "$threads" "$load_before" "$load_after" "$elapsed" \
  "$blas" <<'EOF' | tee "$out_dir/table.md"
import json, os, statistics, subprocess, sys
out_dir, command, threads, load_before, load_after, elapsed, blas = sys.argv[1:]
pion = json.load(open(os.path.join(out_dir, "pion.json")))
torch = json.load(open(os.path.join(out_dir, "torch.json")))

def cpp(prefix):
    """(median ms, [ms per repetition]) of a bench_optim benchmark."""
    runs = [b for b in pion["benchmarks"] if b["run_name"].startswith(prefix + "/")]
    scale = {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}
    reps = [b["real_time"] * scale[b["time_unit"]] for b in runs if b["run_type"] == "iteration"]
    return statistics.median(reps), reps  # what Google Benchmark's median aggregate reports

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"

sgemm_ms, _ = cpp("sgemm/2048x2048x2048")
sgemm_gflops = 2 * 2048**3 / (sgemm_ms * 1e-3) / 1e9
ctx = pion["context"]
roofline_ms = {"pion_taylor2": float(ctx["pion_step_flops"]) / (sgemm_gflops * 1e9) * 1e3,
               "muon": float(ctx["muon_step_flops"]) / (sgemm_gflops * 1e9) * 1e3}

def spread(reps):
    return f"{min(reps):.0f}–{max(reps):.0f}" if min(reps) >= 10 else f"{min(reps):.1f}–{max(reps):.1f}"

rows = [  # label, pion benchmark, torch benchmark
    ("Pion taylor2 vs torch naive formula", "pion_taylor2", "pion_taylor2_naive"),
    ("Pion taylor2 vs torch 7-GEMM expansion", "pion_taylor2", "pion_taylor2_7gemm"),
    ("Pion cayley", "pion_cayley", "pion_cayley"),
    ("Pion exp", "pion_exp", "pion_exp"),
    ("Muon (NS5, fp32)", "muon", "muon"),
    ("AdamW", "adamw", "adamw"),
]
print("## Optimizer step: pion C++ vs PyTorch CPU (one run, side by side)\n")
print("| optimizer | pion ms | torch ms | torch/pion ratio | % of GEMM roofline (pion) "
      "| % of GEMM roofline (torch) | pion min–max ms | torch min–max ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for label, p, t in rows:
    p_ms, p_reps = cpp("step/" + p)
    t_ms, t_reps = torch["steps_ms"][t], torch["reps_ms"][t]
    roof = roofline_ms.get(p)
    p_roof = f"{100 * roof / p_ms:.0f}%" if roof else "—"
    t_roof = f"{100 * roof / t_ms:.0f}%" if roof else "—"
    print(f"| {label} | {p_ms:.1f} | {t_ms:.1f} | {t_ms / p_ms:.2f} | {p_roof} | {t_roof} "
          f"| {spread(p_reps)} | {spread(t_reps)} |")

flops = float(ctx["pion_step_flops"])
print(f"""
Layer: 4 x (768 x 768), 2 x (2048 x 768), 1 x (768 x 2048) fp32 matrices (d_out x d_in),
random N(0, 0.02^2) weights and N(0, 1e-6) gradients. Times are the median wall time of one
step over {len(cpp('step/adamw')[1])} repetitions after 2 warm-up steps.
sgemm 2048^3 in the same run: {sgemm_gflops:.1f} GFLOP/s through pion::gemm, \
{torch['sgemm_2048_gflops']:.1f} GFLOP/s through torch.mm.
GEMM roofline: Pion taylor2 {flops / 1e9:.1f} GFLOP per step (sum of 8 m n^2 + 6 m^2 n) -> \
{roofline_ms['pion_taylor2']:.0f} ms; Muon {float(ctx['muon_step_flops']) / 1e9:.1f} GFLOP \
(5 x (4 r^2 c + 2 r^3), r <= c) -> {roofline_ms['muon']:.0f} ms. \
% of roofline = roofline time / measured time. Cayley, exp and AdamW have no row value (their \
cost is not the taylor2 GEMM count; AdamW is memory-bound).
""")
lscpu = sh("lscpu")
model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
print("| | |\n|---|---|")
print(f"| CPU | {model}, {os.cpu_count()} logical CPUs, {threads} threads used by both sides |")
print(f"| date | {sh('date -u +%Y-%m-%dT%H:%M:%SZ')} |")
print(f"| load average (1/5/15 min) | before {load_before}, after {load_after} |")
print(f"| wall time of the run | {elapsed} s |")
print(f"| pion | git {sh('git rev-parse --short HEAD')}{' (+ uncommitted changes)' if sh('git status --porcelain -- src include bench') else ''}, "
      f"{sh('c++ --version | head -1')}, Release |")
print(f"| PyTorch | {torch['torch_version']} (Debian python3-torch), set_num_threads({torch['threads']}), "
      f"OMP_NUM_THREADS={torch['omp_num_threads']} |")
openblas_version = sh("dpkg-query -W -f='${Version}' libopenblas0-pthread")
benchmark_version = sh("dpkg-query -W -f='${Version}' libbenchmark-dev")
print(f"| BLAS | {blas} (OpenBLAS {openblas_version}), "
      f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '')} |")
print(f"| Google Benchmark | {benchmark_version} |")
print(f"| command | `{command}` |")
EOF
