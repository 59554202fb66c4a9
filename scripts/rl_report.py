#!/usr/bin/python3
"""The RL demo's report (scripts/rl-demo.sh): held-out exact match before SFT, after SFT and
after GRPO per optimizer (mean over seeds, each seed in brackets) as OUT/REPORT.md, and
OUT/reward.png: mean reward per RL step (moving average over 10 steps) and held-out exact match
at each eval, one line per optimizer and seed.

usage: rl_report.py OUT SEED [SEED ...]
"""
import json
import os
import statistics
import sys

OPTIMIZERS = ("adamw", "muon", "pion")


def before_accuracy(out, opt):
    """The last JSON line `pion eval` printed: {"exact_match": ...}."""
    with open(os.path.join(out, f"{opt}-before.log")) as f:
        for line in reversed(f.read().splitlines()):
            if line.startswith("{"):
                return json.loads(line)["exact_match"]
    raise SystemExit(f"rl_report.py: no result line in {out}/{opt}-before.log")


def load(path):
    with open(path) as f:
        return json.load(f)


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pct(values):
    mean = 100 * statistics.mean(values)
    each = ", ".join(f"{100 * v:.1f}" for v in values)
    return f"{mean:.1f} ({each})"


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out, seeds = sys.argv[1], sys.argv[2:]
    rows, curves = [], {}
    for opt in OPTIMIZERS:
        sft, rl, gain = [], [], []
        for seed in seeds:
            d = os.path.join(out, f"{opt}-seed{seed}")
            s_sft = load(os.path.join(d, "sft", "summary.json"))["exact_match"]
            s_rl = load(os.path.join(d, "rl", "summary.json"))["exact_match"]
            sft.append(s_sft)
            rl.append(s_rl)
            gain.append(s_rl - s_sft)
            curves[(opt, seed)] = metrics(os.path.join(d, "rl", "metrics.jsonl"))
        rows.append(f"| {opt} | {100 * before_accuracy(out, opt):.1f} | {pct(sft)} | {pct(rl)} | "
                    f"{100 * statistics.mean(gain):+.1f} |")
    table = "\n".join([
        "| optimizer (pretraining, SFT and RL) | before SFT | after SFT | after RL | RL gain "
        "(points) |", "|---|---:|---:|---:|---:|", *rows])
    text = (f"# RL demo: held-out exact match (%)\n\n{table}\n\nGreedy answers on the same 400 "
            f"held-out prompts in every column; mean over seeds {', '.join(seeds)} with each "
            "seed in brackets. Written by scripts/rl_report.py.\n")
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    print(text)
    plot(out, curves)
    return 0


def plot(out, curves):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("rl_report.py: no matplotlib (apt-get install python3-matplotlib): no plot")
        return
    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"adamw": "tab:blue", "muon": "tab:orange", "pion": "tab:green"}
    for (opt, seed), records in sorted(curves.items()):
        steps = [r["step"] for r in records if "reward_mean" in r]
        rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
        smooth = [statistics.mean(rewards[max(0, i - 9):i + 1]) for i in range(len(rewards))]
        style = "-" if seed == sorted({s for _, s in curves})[0] else "--"
        ax_r.plot(steps, smooth, style, color=colors[opt], label=f"{opt} seed {seed}")
        evals = [(r["step"], 100 * r["exact_match"]) for r in records if "exact_match" in r]
        if evals:
            ax_e.plot([e[0] for e in evals], [e[1] for e in evals], style + "o",
                      color=colors[opt], label=f"{opt} seed {seed}")
    ax_r.set_xlabel("RL step")
    ax_r.set_ylabel("mean reward (10-step moving average)")
    ax_e.set_xlabel("RL step")
    ax_e.set_ylabel("held-out exact match (%)")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "reward.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
