#!/usr/bin/env python3
"""Plots a `pion sweep`'s validation loss against learning rate: one line per optimizer (and per
combination of the other grid keys), x = the swept lr (matrix_lr where it is gridded, else lr)
on a log scale, y = mean best val loss over seeds, error bars = sample std over seeds.

usage: sweep_plot.py RESULTS_JSON OUT_PNG
RESULTS_JSON is the results.json `pion sweep` writes; `pion sweep` runs this script itself with
Debian's /usr/bin/python3. Exits 3 with one line when matplotlib is missing, 4 when no setting
has an lr in the grid, so the sweep can say why it skipped the plot.
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        print("usage: sweep_plot.py RESULTS_JSON OUT_PNG", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (Debian: apt-get install python3-matplotlib)")
        return 3
    with open(sys.argv[1]) as f:
        results = json.load(f)
    series = {}
    lr_keys = set()
    for s in results["settings"]:
        if "lr" not in s or s["best_val_loss"]["mean"] is None:
            continue
        lr_keys.add(s["lr_key"])
        series.setdefault(s["series"], []).append(
            (s["lr"], s["best_val_loss"]["mean"], s["best_val_loss"]["std"] or 0.0))
    if not series:
        print("no finished setting has lr or matrix_lr in the grid: nothing to plot")
        return 4
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points.sort()
        xs = [p[0] for p in points]
        ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(" / ".join(sorted(lr_keys)) + " (log scale)")
    ax.set_ylabel("best val loss (mean ± std over seeds)")
    ax.set_title("pion sweep: val loss against learning rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)
    print("wrote " + sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
