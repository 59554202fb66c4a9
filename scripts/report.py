#!/usr/bin/env python3
"""Turns a set of pion run directories into a report: REPORT.md with a table, and PNG plots of
validation loss against step and against wall time, training loss, and each Pion matrix's
spectrum before and after training.

usage: report.py OUT_DIR RUN_DIR [RUN_DIR ...]
Each RUN_DIR holds what `pion train` writes: config.json, metrics.jsonl, summary.json,
spectrum_init.json, spectrum_final.json. Needs Debian's python3-matplotlib (Agg backend).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_run(path):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "summary.json")) as f:
        summary = json.load(f)
    records = []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    spectra = {}
    for which in ("init", "final"):
        p = os.path.join(path, f"spectrum_{which}.json")
        if os.path.exists(p):
            with open(p) as f:
                spectra[which] = json.load(f)
    # The directory name labels the run (unique, and the user chose it: adamw, pion-spectral, ...).
    label = os.path.basename(os.path.normpath(path))
    return {"path": path, "label": label, "config": config, "summary": summary,
            "records": records, "spectra": spectra}


def fmt(v, digits=4):
    return "n/a" if v is None else f"{v:.{digits}f}"


def plot_curves(runs, out_dir):
    for xkey, fname, xlabel in (("step", "val_loss_vs_step.png", "step"),
                                ("elapsed_seconds", "val_loss_vs_time.png", "wall time (s)")):
        plt.figure(figsize=(6.4, 4.2))
        for r in runs:
            pts = [(m[xkey], m["val_loss"]) for m in r["records"] if "val_loss" in m]
            if pts:
                xs, ys = zip(*pts)
                plt.plot(xs, ys, marker="o", markersize=3, label=r["label"])
        plt.xlabel(xlabel)
        plt.ylabel("validation loss")
        plt.title("validation loss")
        plt.grid(alpha=0.3)
        plt.legend()
        plt.tight_layout()
        plt.savefig(os.path.join(out_dir, fname), dpi=110)
        plt.close()
    plt.figure(figsize=(6.4, 4.2))
    for r in runs:
        pts = [(m["step"], m["train_loss"]) for m in r["records"] if m.get("train_loss") is not None]
        if pts:
            xs, ys = zip(*pts)
            plt.plot(xs, ys, linewidth=0.8, label=r["label"])
    plt.xlabel("step")
    plt.ylabel("training loss")
    plt.grid(alpha=0.3)
    plt.legend()
    plt.tight_layout()
    plt.savefig(os.path.join(out_dir, "train_loss.png"), dpi=110)
    plt.close()


def plot_spectra(run, out_dir):
    init = {s["name"]: s for s in run["spectra"].get("init", [])}
    final = {s["name"]: s for s in run["spectra"].get("final", [])}
    names = [n for n in init if n in final]
    if not names:
        return None
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        s0, s1 = init[name]["sigma"], final[name]["sigma"]
        ax.plot(s0, label="init", linewidth=1.5)
        ax.plot(s1, linestyle="--", label="final", linewidth=1.2)
        # From zero, so an unchanged spectrum looks unchanged; the title gives the drift.
        ax.set_ylim(0, 1.1 * max(max(s0), max(s1)))
        drift = max(abs(a - b) for a, b in zip(s0, s1)) / max(s0)
        ax.set_title(f"{name.replace('layers.', 'L')}  drift {drift:.1e}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{run['label']}: singular values before and after training", fontsize=9)
    fig.tight_layout()
    fname = f"spectra_{run['label']}.png"
    fig.savefig(os.path.join(out_dir, fname), dpi=110)
    plt.close(fig)
    return fname


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    runs = [load_run(p) for p in sys.argv[2:]]
    plot_curves(runs, out_dir)
    lines = ["# pion comparison report", "",
             "| run | optimizer | init | lr / matrix_lr | best val loss | final val loss | tokens/s | wall (s) | spectrum drift | skipped steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, c = r["summary"], r["config"]
        lrs = f"{c['lr']:g}" if c["optimizer"] == "adamw" else f"{c['lr']:g} / {c['matrix_lr']:g}"
        lines.append(f"| {r['label']} | {c['optimizer']} | {c['init']} | {lrs} | {fmt(s['best_val_loss'])} | {fmt(s['final_val_loss'])} | "
                     f"{s['tokens_per_sec']:.0f} | {s['wall_seconds']:.1f} | {s['spectrum_drift_max']:.2e} | "
                     f"{s['skipped_steps']} |")
    c0 = runs[0]["config"]
    lines += ["", f"Model: {c0['n_layer']} layers, {c0['n_head']} heads, d_model {c0['d_model']}, "
              f"seq_len {c0['seq_len']}, batch {c0['batch_size']}, {c0['max_iters']} iters, "
              f"{c0['schedule']} schedule, tokenizer {c0['tokenizer']}, data {c0['data']}. "
              "Spectrum drift: max over Pion matrices of max |sigma - sigma_0| / max sigma_0 "
              "(0 for AdamW and Muon, which do not preserve the spectrum and are not measured).",
              "", "![val loss vs step](val_loss_vs_step.png)", "", "![val loss vs time](val_loss_vs_time.png)",
              "", "![train loss](train_loss.png)", ""]
    for r in runs:
        if r["config"]["optimizer"] in ("pion", "muon"):
            fname = plot_spectra(r, out_dir)
            if fname:
                lines += [f"![{r['label']} spectra]({fname})", ""]
    with open(os.path.join(out_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:3 + len(runs)]))
    print(f"report written to {os.path.join(out_dir, 'REPORT.md')}")


if __name__ == "__main__":
    main()
