#!/usr/bin/env python3
"""Markdown tables from the EMU_COUNT JSON files of scripts/emu-count.sh.

    emu_count_report.py DIR

DIR holds count-<optimizer>-L<layers>-B<batch>-S<seq>.json, each the counts of one
steady-state training step (tools/cuda-emu/README.md, "Counting"). Prints, per optimizer:
the measured step at the base shape, the per-layer figures (2 layers minus 1), the top 10
kernels by bytes, and the step extrapolated to GPT-2 small (12 layers, batch 16, seq 1024).

The H100 time a step implies (a model, not a measurement):
    sum over kernel launches of bytes / HBM bandwidth
  + sum over GEMM calls of max(bytes / bandwidth, flops / peak of the call's math)
  + sum over copies and memsets of bytes / bandwidth (device side) or / host link
  + 4 us per kernel launch, GEMM call, copy and memset.
The 4 us stays on the operations a CUDA graph replays: the model charges the gap between
dependent kernels on the device, which a graph shortens but does not remove, not the host's
cost of queuing them; "host submissions" counts what the host queued itself (kernel launches,
cuBLAS calls, async copies, memsets, event records outside a graph), with the graph launches
beside it.
"""
import glob
import json
import os
import re
import sys

# H100 SXM5 (80 GB HBM3) data-sheet figures, dense (no sparsity).
HBM_BYTES_PER_S = 3.35e12
PEAK_FLOPS = {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}
HOST_LINK_BYTES_PER_S = 50e9  # PCIe Gen5 x16, what a large copy reaches (64 GB/s nominal)
LAUNCH_S = 4e-6
GPT2 = {"L": 12, "B": 16, "S": 1024}
CLASSES = ("bf16", "tf32", "fp32")


def load(directory):
    runs = {}
    for path in sorted(glob.glob(os.path.join(directory, "count-*.json"))):
        m = re.match(r"count-(\w+)-L(\d+)-B(\d+)-S(\d+)\.json$", os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            runs[(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))] = json.load(f)
    return runs


def summary(j):
    """The scalar figures of one step (all additive, so they can be differenced and fitted)."""
    s = {
        "launches": 0.0, "kernel_read": 0.0, "kernel_written": 0.0, "gemm_calls": 0.0,
        "copy_calls": 0.0, "copy_device_bytes": 0.0, "copy_host_bytes": 0.0,
        "gemm_time": 0.0,
        # stream operations the host queued itself (graph replays excluded), graph launches
        "host_submissions": float(j["totals"].get("host_submissions", 0)),
        "graph_launches": float(j["totals"].get("graph_launches", 0)),
    }
    for c in CLASSES:
        s["gemm_flops_" + c] = 0.0
        s["gemm_bytes_" + c] = 0.0
    for name, k in j["kernels"].items():
        s["launches"] += k["launches"]
        s["kernel_read"] += k["bytes_read"]
        s["kernel_written"] += k["bytes_written"]
        s["launches:" + name] = float(k["launches"])  # per kernel, for the top 10 extrapolated
        s["bytes:" + name] = float(k["bytes_read"] + k["bytes_written"])
    for g in j["gemms"].values():
        calls = g["calls"]
        nbytes = g["bytes_read"] + g["bytes_written"]
        s["gemm_calls"] += calls
        s["gemm_flops_" + g["math"]] += g["flops"]
        s["gemm_bytes_" + g["math"]] += nbytes
        # every call of one key has the same shape: per call max(memory, compute)
        s["gemm_time"] += calls * max(nbytes / calls / HBM_BYTES_PER_S,
                                      g["flops"] / calls / PEAK_FLOPS[g["math"]])
    for name, x in j["copies"].items():
        s["copy_calls"] += x["calls"]
        if name.startswith("cudaMemset") or name.endswith("DtoD"):
            # a memset writes its bytes; a device-to-device copy reads and writes them
            s["copy_device_bytes"] += x["bytes"] * (2 if name.endswith("DtoD") else 1)
        else:
            s["copy_host_bytes"] += x["bytes"]
    return s


def gemm_flops(s):
    return sum(s["gemm_flops_" + c] for c in CLASSES)


def gemm_bytes(s):
    return sum(s["gemm_bytes_" + c] for c in CLASSES)


def times(s, per_call_gemm=True):
    """(kernel bytes time, GEMM time, copies time, launch overhead) in seconds."""
    kernels = (s["kernel_read"] + s["kernel_written"]) / HBM_BYTES_PER_S
    if per_call_gemm:
        gemm = s["gemm_time"]
    else:  # extrapolated figures have no per-call shapes: max per math class of the totals
        gemm = sum(max(s["gemm_bytes_" + c] / HBM_BYTES_PER_S, s["gemm_flops_" + c] / PEAK_FLOPS[c])
                   for c in CLASSES)
    copies = s["copy_device_bytes"] / HBM_BYTES_PER_S + s["copy_host_bytes"] / HOST_LINK_BYTES_PER_S
    overhead = LAUNCH_S * (s["launches"] + s["gemm_calls"] + s["copy_calls"])
    return kernels, gemm, copies, overhead


def combine(a, b, fa=1.0, fb=1.0):
    return {k: fa * a.get(k, 0.0) + fb * b.get(k, 0.0) for k in a.keys() | b.keys()}


def top_kernels(s, title):
    """The 10 kernels moving the most bytes in the (possibly extrapolated) figures s."""
    names = sorted((k[6:] for k in s if k.startswith("bytes:")), key=lambda n: -s["bytes:" + n])
    total = sum(s["bytes:" + n] for n in names)
    print(f"{title} (of {total / 1e9:.3f} GB moved by kernels):\n")
    print("| kernel | launches | bytes R+W (GB) | at 3.35 TB/s (ms) | share |\n"
          "|---|---:|---:|---:|---:|")
    for n in names[:10]:
        b = s["bytes:" + n]
        print(f"| `{n}` | {s['launches:' + n]:.0f} | {b / 1e9:.3f} | {1e3 * b / HBM_BYTES_PER_S:.3f} | "
              f"{100 * b / total:.1f}% |")
    print()


def solve(rows, rhs):
    """Gaussian elimination for a square system."""
    n = len(rows)
    m = [list(r) + [v] for r, v in zip(rows, rhs)]
    for i in range(n):
        p = max(range(i, n), key=lambda r: abs(m[r][i]))
        m[i], m[p] = m[p], m[i]
        for r in range(n):
            if r != i:
                f = m[r][i] / m[i][i]
                m[r] = [x - f * y for x, y in zip(m[r], m[i])]
    return [m[i][n] / m[i][i] for i in range(n)]


def gb(x):
    return f"{x / 1e9:.3f}"


def row(label, s, per_call_gemm=True):
    k, g, c, o = times(s, per_call_gemm)
    total = k + g + c + o
    return (f"| {label} | {s['launches']:.0f} | {s['gemm_calls']:.0f} | {s['copy_calls']:.0f} | "
            f"{s['host_submissions']:.0f} ({s['graph_launches']:.0f}) | "
            f"{gb(s['kernel_read'] + s['kernel_written'])} | {gb(gemm_bytes(s))} | "
            f"{gemm_flops(s) / 1e12:.4f} | {1e3 * k:.3f} | {1e3 * g:.3f} | {1e3 * c:.3f} | "
            f"{1e3 * o:.3f} | "
            f"{1e3 * total:.3f} |")


HEADER = ("| {what} | kernel launches | GEMM calls | copies + memsets | host submissions "
          "(graph launches) | kernel bytes R+W (GB) | "
          "GEMM bytes (GB) | GEMM TFLOP | kernels at 3.35 TB/s (ms) | GEMMs (ms) | "
          "copies + memsets (ms) | 4 us each (ms) | implied H100 (ms) |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main():
    runs = load(sys.argv[1])
    if not runs:
        sys.exit(f"emu_count_report: no count-*.json in {sys.argv[1]}")
    optimizers = [o for o in ("adamw", "muon", "pion") if any(k[0] == o for k in runs)]
    shapes = sorted({(k[2], k[3]) for k in runs}, key=lambda bs: (bs[0] * bs[1], bs[1]))
    base = shapes[0]  # the smallest batch x seq: the one every optimizer was run at
    sums = {k: summary(j) for k, j in runs.items()}
    every = set().union(*(s.keys() for s in sums.values()))
    for s in sums.values():  # a kernel one run did not launch: 0 there
        for q in every:
            s.setdefault(q, 0.0)

    print(f"Measured: one steady-state step (the 3rd), batch {base[0]} x seq {base[1]}, "
          "d_model 768, 12 heads, vocab 50304.\n")
    print(HEADER.format(what="step"))
    for o in optimizers:
        for L in (1, 2):
            if (o, L) + base in sums:
                print(row(f"{o}, {L} layer{'s' if L > 1 else ''}", sums[(o, L) + base]))
    print()
    print("Per layer (2 layers minus 1; the optimizer's part included):\n")
    print(HEADER.format(what="per layer"))
    per_layer = {}
    for o in optimizers:
        if (o, 1) + base in sums and (o, 2) + base in sums:
            per_layer[o] = combine(sums[(o, 2) + base], sums[(o, 1) + base], 1.0, -1.0)
            print(row(o, per_layer[o]))
    print()

    for o in optimizers:
        if (o, 2) + base in sums:
            top_kernels(sums[(o, 2) + base],
                        f"Top 10 kernels by bytes, {o}, 2 layers, batch {base[0]} x seq {base[1]}, measured")

    # Extrapolation. X(L, B, S) = F(B, S) + L * D(B, S), each of F and D = c0 + c1 B + c2 B S +
    # c3 B S^2 (per parameter; per sequence: the attention GEMMs are one call per sequence; per
    # token; per token x context: the attention scores), fitted exactly to AdamW run with 1 and
    # 2 layers at batch 1 and three seq lengths (the S dependence) and at one batch > 1 (the
    # per-sequence part); the other optimizers differ from AdamW by a per-parameter amount
    # only (their step does not see the tokens), taken at the base shape. AdamW runs at other
    # shapes check the fit.
    both = [bs for bs in shapes if all(("adamw", L) + bs in sums for L in (1, 2))]
    seqs = sorted(s for b, s in both if b == 1)[:3]
    wider = [bs for bs in both if bs[0] > 1]
    if "adamw" not in optimizers or len(seqs) < 3 or not wider:
        print("(no extrapolation: it needs AdamW at 1 and 2 layers at batch 1 x three seq "
              "lengths and at one batch > 1)")
        return
    fit_shapes = [(1, s) for s in seqs] + wider[:1]
    design = [(1.0, b, b * s, b * s * s) for b, s in fit_shapes]
    keys = sorted(every)

    def fit(values):
        return solve(design, values)

    def at(coef, b, s):
        return coef[0] + coef[1] * b + coef[2] * b * s + coef[3] * b * s * s

    D, F = {}, {}
    for q in keys:
        d = [sums[("adamw", 2) + bs][q] - sums[("adamw", 1) + bs][q] for bs in fit_shapes]
        f = [sums[("adamw", 1) + bs][q] - dd for bs, dd in zip(fit_shapes, d)]
        D[q], F[q] = fit(d), fit(f)

    def predict(L, b, s):
        return {q: at(F[q], b, s) + L * at(D[q], b, s) for q in keys}

    checks = sorted(k for k in sums if k[0] == "adamw" and (k[2], k[3]) not in fit_shapes)
    print(f"Extrapolation fitted to AdamW at batch x seq {', '.join(f'{b}x{s}' for b, s in fit_shapes)}"
          " (1 and 2 layers each).")
    for k in checks:
        p, m = predict(k[1], k[2], k[3]), sums[k]
        worst = max(abs(p[q] - m[q]) / max(abs(m[q]), 1.0)
                    for q in keys if q != "gemm_time" and ":" not in q)
        print(f"Check against a run it was not fitted to (AdamW, {k[1]} layer{'s' if k[1] > 1 else ''}, "
              f"batch {k[2]} x seq {k[3]}): largest relative error of a figure {100 * worst:.3f}%.")
    print()
    L, B, S = GPT2["L"], GPT2["B"], GPT2["S"]
    print(f"Extrapolated to GPT-2 small ({L} layers, batch {B} x seq {S}); GEMM time here is "
          "max(bytes / bandwidth, flops / peak) per math class of the totals:\n")
    print(HEADER.format(what="step"))
    adamw = predict(L, B, S)
    extrapolated = {}
    for o in optimizers:
        if o == "adamw":
            s = adamw
        else:
            if (o, 1) + base not in sums or (o, 2) + base not in sums:
                continue
            d_o = combine(per_layer[o], per_layer["adamw"], 1.0, -1.0)
            f_o = combine(combine(sums[(o, 1) + base], per_layer[o], 1.0, -1.0),
                          combine(sums[("adamw", 1) + base], per_layer["adamw"], 1.0, -1.0), 1.0, -1.0)
            s = combine(adamw, combine(f_o, d_o, 1.0, float(L)))
        extrapolated[o] = s
        print(row(o, s, per_call_gemm=False))
    print()
    for o, s in extrapolated.items():
        top_kernels(s, f"Top 10 kernels by bytes, {o}, GPT-2 small, extrapolated")
    print("Per layer at GPT-2 small's batch x seq (AdamW's forward + backward + update of one "
          "block):\n")
    print(HEADER.format(what="per layer"))
    print(row("adamw", {q: at(D[q], B, S) for q in keys}, per_call_gemm=False))


if __name__ == "__main__":
    main()
