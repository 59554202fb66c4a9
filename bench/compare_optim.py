#!/usr/bin/env python3
"""Merges the two halves of the GPU optimizer-step benchmark into one Markdown table of ratios:
`pion bench optim --device cuda --json PION` and
`bench/torch_optim.py --device cuda --json TORCH`, run in the same session on the same GPU
(scripts/gpu-bench.sh does both and then calls this).

    bench/compare_optim.py PION.json TORCH.json [--command TEXT]

Standard library only. speedup = torch ms / pion ms (median step times); % of fp32 roofline =
(the step's GEMM flops / the cuBLAS fp32 SGEMM 4096^3 rate pion measured) / step time, for
both sides (the same flops: the same formula on the same matrices).
"""
import argparse
import json
import sys

# pion result, PyTorch peer, peer's description, target speedup (None: no target)
ROWS = [
    ("pion_fp32", "pion_taylor2_7gemm", "7-GEMM expansion, per matrix, fp32", 2.0),
    ("pion_fp32", "pion_taylor2_naive", "naive formula (E2 formed), per matrix, fp32", None),
    ("pion_fp32", "pion_taylor2_7gemm_batched", "7-GEMM, stacked by shape (bmm), fp32", None),
    ("pion_mixed", "pion_taylor2_7gemm", "7-GEMM expansion, per matrix, fp32", 5.0),
    ("pion_mixed", "pion_taylor2_7gemm_tf32", "7-GEMM, per matrix, TF32 allowed", None),
    ("muon_bf16", "muon_bf16", "KellerJordan/Muon reference, bf16 Newton-Schulz", None),
    ("muon_fp32", "muon_fp32", "the same reference in fp32", None),
    ("adamw", "adamw_fused", "torch.optim.AdamW(fused=True)", None),
    ("adamw", "adamw_foreach", "torch.optim.AdamW(foreach=True)", None),
]


def ms_text(ms):
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pion_json")
    ap.add_argument("torch_json")
    ap.add_argument("--command", default="", help="the command line to print under the table")
    args = ap.parse_args()
    with open(args.pion_json) as f:
        pion = json.load(f)
    with open(args.torch_json) as f:
        torch = json.load(f)

    problems = []
    if pion.get("device") != "cuda" or torch.get("device") != "cuda":
        problems.append("both inputs must come from --device cuda runs")
    for key in ("matrices", "parameters"):
        if pion.get(key) != torch.get(key):
            problems.append(f"{key} differ: pion {pion.get(key)}, torch {torch.get(key)}")
    for p in problems:
        print(f"compare_optim.py: warning: {p}", file=sys.stderr)

    fp32_rate = (pion.get("roofline", {}).get("fp32") or {}).get("tflops", 0.0) * 1e12
    opts = pion["optimizers"]
    steps = torch.get("steps_ms", {})

    print("## Optimizer step on the GPU: pion vs PyTorch, same run\n")
    print("| pion | pion ms | PyTorch peer | torch ms | speedup (torch / pion) "
          "| % of fp32 roofline (pion) | % of fp32 roofline (torch) | target |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for p_name, t_name, t_label, target in ROWS:
        p = opts.get(p_name)
        t_ms = steps.get(t_name)
        if p is None or "median_ms" not in p or t_ms is None:
            missing = p_name if p is None or "median_ms" not in p else t_name
            why = (p or {}).get("error", "not measured")
            print(f"| {p.get('label', p_name) if p else p_name} | — | {t_label} | "
                  f"{ms_text(t_ms) if t_ms is not None else '—'} | — | — | — | {missing}: {why} |")
            continue
        p_ms = p["median_ms"]
        speedup = t_ms / p_ms
        flops = p.get("gemm_flops", 0.0)
        if flops > 0 and fp32_rate > 0:
            roof_ms = flops / fp32_rate * 1e3
            p_roof, t_roof = f"{100 * roof_ms / p_ms:.0f}%", f"{100 * roof_ms / t_ms:.0f}%"
        else:
            p_roof = t_roof = "—"
        goal = "—" if target is None else (f">= {target:g}x: {'met' if speedup >= target else 'NOT met'}")
        print(f"| {p['label']} | {ms_text(p_ms)} | {t_label} | {ms_text(t_ms)} | {speedup:.2f} "
              f"| {p_roof} | {t_roof} | {goal} |")

    print()
    drift = pion.get("drift") or {}
    for name in ("pion_fp32", "pion_mixed"):
        d = (opts.get(name) or {}).get("drift")
        if d:
            print(f"- {opts[name]['label']}: spectrum drift after {d['steps']} steps at lr {d['lr']:g}: "
                  f"{d['max']:.2e} (worst matrix {d['worst_matrix']})")
    if not drift or not drift.get("steps"):
        print("- spectrum drift: not measured (--drift_steps 0)")
    roof = pion["roofline"]
    rates = ", ".join(f"{k} {v['tflops']:.1f} TFLOP/s" for k, v in roof.items())
    print(f"- cuBLAS 4096^3 in pion's run: {rates}; torch.mm fp32 4096^3 in torch's run: "
          f"{torch.get('sgemm_4096_tflops', float('nan')):.1f} TFLOP/s ({torch.get('tf32', '?')})")
    print(f"- matrices: {pion['matrices']} ({pion['layers']} layers), "
          f"{pion['parameters'] / 1e6:.1f}M parameters; pion GEMM flops per step: Pion "
          f"{opts.get('pion_fp32', {}).get('gemm_flops', 0) / 1e12:.3f} TFLOP, Muon "
          f"{opts.get('muon_bf16', {}).get('gemm_flops', 0) / 1e12:.3f} TFLOP")
    print(f"- pion timing: {pion['timing']}")
    print(f"- torch timing: {torch.get('timing', '?')}; wall ms per step (host included): " +
          ", ".join(f"{k} {v:.2f}" for k, v in torch.get("wall_ms", {}).items()))
    print()
    print("| | |\n|---|---|")
    print(f"| GPU | {pion['hardware']} (pion); {torch.get('gpu', '?')} (torch) |")
    print(f"| date | {pion['date']} |")
    print(f"| pion | {pion.get('backends', '?')} |")
    print(f"| PyTorch | {torch.get('torch_version', '?')}, CUDA {torch.get('cuda_version', '?')} |")
    if args.command:
        print(f"| command | `{args.command}` |")
    if problems:
        print("\nwarnings: " + "; ".join(problems))


if __name__ == "__main__":
    main()
