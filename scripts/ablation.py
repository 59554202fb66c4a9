#!/usr/bin/python3
"""The Pion-family ablation of issue 11, as one resumable driver over `pion sweep`.

Stages (each a set of `pion sweep` calls into one directory, OUT/runs/<name>; a rerun skips
every finished run and resumes interrupted ones, so the ablation can be spread over several
sittings or machines that share OUT):

  lr      every setting at 4 learning rates, seed 1 (while the best is at an edge of the lrs
          tried, one more a factor 2 beyond, at most 2): AdamW, Muon, Pion with each momentum
          (lie, ambient, transported) x update side (both, left, right, alternate) with the
          adam normaliser, and Pion lie + msign on both sides and alternating (16 settings).
  seeds   seeds 2 and 3 at each setting's best lr from stage lr (its seed-1 run is reused).
  nonorm  the best three settings of stage seeds, and AdamW and default Pion (lie/both/adam)
          as references if they are not among them, again with `--norm none`: 4 lrs at
          seed 1, then seeds 2, 3 at the best.
  width   the muP claim: AdamW and default Pion at d_model 64, 128 and 256 over the same 4 lrs,
          seed 1 (at 128 these are stage lr's runs, run here where --best-lrs skipped them).
  widthseeds  seeds 2 and 3 at each width's seed-1 best lr and the lrs tried beside it (AdamW
          and default Pion at the 3 widths), so the best lr per width rests on 3 seeds.
  report  OUT/ABLATION.md (tables: mean +- sample std over seeds of best val loss, with the
          optimizer state bytes and step time of the baby run, and with --bench-json those of
          one GPT-2-small layer; every lr tried at seed 1) and OUT/width_transfer.png.
  archive nothing but the --archive sync that starts every call: to keep the runs a running
          driver finished since its last sweep (it syncs after each sweep)

--archive DIR keeps each finished run's run_config.json and summary.json (a few KB, no
checkpoint) in DIR/runs/<name>/, and copies them back into OUT before any stage, so the runs
outlive OUT: commit DIR, and a fresh machine's rerun skips every archived run. The project's
own ablation archives into results/ablation.

--best-lrs FILE ({"setting name": "lr", ...}, names as the report writes them) skips the lr
sweep of those settings (with RMSNorm at the base width): stage seeds runs seeds 1-3 at the
given lr. For an lr sweep already run whose runs were lost; the report says which were given.

--shard K/N: every stage takes only its units K, K+N, K+2N, ... (stages lr and seeds: the
settings; width, widthseeds: the (width, optimizer) pairs; nonorm: the chosen settings), so N
drivers (e.g. each with --jobs 1) share one OUT without running the same run twice and keep
every core busy. Stage nonorm needs every setting's 3 seeds, and widthseeds every pair's seed-1
sweep: a lone driver goes on without what is missing; a shard polls OUT every minute
(PION_ABLATION_POLL_S) until the other shards finish them, up to 12 hours. Run stage width
before nonorm so a shard that finishes its seeds early has work.

Selecting the best lr on seed 1 and then adding seeds 2 and 3 is a cheaper design than
3 seeds at every lr (the reported means include the seed the lr was picked on, a small
optimistic bias we accept and say).

usage: scripts/ablation.py (Debian's /usr/bin/python3, for python3-matplotlib)
       scripts/ablation.py [--out DIR] [--pion PATH] [--jobs N] [--iters N]
                           [--stages lr,seeds,width,nonorm,widthseeds,report]
                           [--bench-json FILE]
                           [--archive DIR] [--best-lrs FILE] [--shard K/N]
                           [--dry-run] [-- EXTRA FLAGS]
--bench-json: the JSON of `pion bench optim --device cpu --pion_variants --json FILE`; the
report then puts each setting's step time and moment state on one GPT-2-small layer beside it.
EXTRA FLAGS go to every run (e.g. `-- --device cuda`). Defaults: runs/ablation, build/pion,
2 jobs, 2000 iters (tinyshakespeare, nanoGPT's baby config as in docs/RESULTS.md).
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# docs/RESULTS.md's baby config (tinyshakespeare, char tokenizer).
BASE = ["--data", os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")),
        "--tokenizer", "char", "--n_layer", "4", "--n_head", "4", "--d_model", "128",
        "--seq_len", "64", "--batch_size", "12", "--warmup_iters", "100", "--schedule", "cosine",
        "--min_lr_ratio", "0.1", "--grad_clip", "1", "--beta1", "0.9", "--beta2", "0.99",
        "--weight_decay", "0.1", "--dropout", "0", "--lr", "1e-3", "--eval_interval", "250",
        "--eval_iters", "200", "--log_interval", "250", "--checkpoint_minutes", "2"]

LRS = {"adamw": ("lr", ["5e-4", "1e-3", "2e-3", "4e-3"]),
       "muon": ("matrix_lr", ["0.01", "0.02", "0.04", "0.08"]),
       "pion": ("matrix_lr", ["0.001", "0.002", "0.005", "0.01"])}


def lr_text(optimizer, x):
    """An lr as the grid (and so the run's name) writes it: LRS's own text for its values."""
    for text in LRS[optimizer][1]:
        if float(text) == x:
            return text
    return f"{x:g}"


# A best val loss above this (ln 65 = 4.17 is a uniform guess over the char vocab) is a run that
# diverged: the report says so rather than print a 27-digit number.
DIVERGED = 100.0


def one_loss(x):
    return f"{x:.4f}" if x <= DIVERGED else f"diverged ({x:.1e})"


def loss_text(losses):
    """One seed's loss, or mean ± sample std (n) of several."""
    if len(losses) == 1 or any(x > DIVERGED for x in losses):
        return ", ".join(one_loss(x) for x in losses)
    return f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f} ({len(losses)})"


def settings():
    """(name, optimizer, [(key, value), ...]) of the 16 settings, keys in a fixed order so run
    names are the same in every stage."""
    out = [("AdamW", "adamw", []), ("Muon", "muon", [])]
    for momentum in ("lie", "ambient", "transported"):
        for side in ("both", "left", "right", "alternate"):
            out.append((f"Pion {momentum}/{side}/adam", "pion",
                        [("init", "spectral"), ("pion_momentum", momentum),
                         ("pion_update_side", side), ("pion_normalizer", "adam")]))
    for side in ("both", "alternate"):
        out.append((f"Pion lie/{side}/msign", "pion",
                    [("init", "spectral"), ("pion_momentum", "lie"), ("pion_update_side", side),
                     ("pion_normalizer", "msign")]))
    return out


# AdamW and default Pion: stage width's two settings, and stage nonorm's references beside its
# best three.
WIDTH_SETTINGS = [s for s in settings() if s[0] in ("AdamW", "Pion lie/both/adam")]


class Ablation:
    def __init__(self, args):
        self.out = os.path.abspath(args.out)
        self.pion = os.path.abspath(args.pion)
        self.jobs = args.jobs
        self.iters = args.iters
        self.extra = args.extra
        self.dry = args.dry_run
        self.bench = args.bench
        self.archive = os.path.abspath(args.archive) if args.archive else None
        self.best_lrs = args.best_lrs
        self.shard = args.shard
        self.poll_s = args.poll_s
        # The width of the base config (stage width adds 64 and 256 beside it).
        self.d_model = 128
        if "--d_model" in self.extra:
            self.d_model = int(self.extra[self.extra.index("--d_model") + 1])

    def sweep(self, optimizer, keys, lrs, seeds):
        lr_key = LRS[optimizer][0]
        # A flag in EXTRA replaces the same flag of the base config.
        given = {f for f in self.extra if f.startswith("--")}
        base = []
        for i in range(0, len(BASE), 2):
            if BASE[i] not in given:
                base += BASE[i:i + 2]
        cmd = [self.pion, "sweep", "--out", self.out, "--jobs", str(self.jobs), *base,
               "--max_iters", str(self.iters), *self.extra, "--grid", f"optimizer={optimizer}"]
        for k, v in keys:
            cmd += ["--grid", f"{k}={v}"]
        cmd += ["--grid", f"{lr_key}={','.join(lrs)}", "--grid",
                f"seed={','.join(str(s) for s in seeds)}"]
        if self.dry:
            cmd.append("--dry-run")
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"ablation: a run of this sweep failed (exit {rc}); its log is in "
                  f"{self.out}/runs/<name>/log.txt. Going on with the others.", flush=True)
        self.sync_archive()

    ARCHIVED = ("run_config.json", "summary.json")
    MACHINE = "machine.json"

    def machine(self):
        """{"cpu", "openblas_core"} of this machine, as OpenBLAS reports it to `pion`."""
        if not hasattr(self, "_machine"):
            cpu = "unknown"
            try:
                with open("/proc/cpuinfo") as f:
                    cpu = next((line.split(":", 1)[1].strip() for line in f
                                if line.startswith("model name")), cpu)
            except OSError:
                pass
            env = dict(os.environ, OPENBLAS_VERBOSE="2")
            try:
                ran = subprocess.run([self.pion, "--help"], env=env, capture_output=True,
                                     text=True, timeout=60)
                text = ran.stdout + ran.stderr  # OpenBLAS writes its line to stderr
            except (OSError, subprocess.SubprocessError):
                text = ""
            core = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                         if line.startswith("Core:")), "unknown")
            self._machine = {"cpu": cpu, "openblas_core": core}
        return self._machine

    def machines_line(self):
        """How many archived runs each (CPU, OpenBLAS kernels) made, for the report."""
        if not self.archive:
            return None
        counts = {}
        kept = os.path.join(self.archive, "runs")
        for name in sorted(os.listdir(kept)) if os.path.isdir(kept) else []:
            try:
                with open(os.path.join(kept, name, self.MACHINE)) as f:
                    m = json.load(f)
                key = f"{m.get('cpu', 'unknown')} (OpenBLAS {m.get('openblas_core', '?')})"
            except (OSError, ValueError):
                key = "not recorded"
            counts[key] = counts.get(key, 0) + 1
        return "Machines (archived runs): " + "; ".join(
            f"{n} {k}" if k == "not recorded" else f"{n} on {k}"
            for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) + "."

    def sync_archive(self):
        """Both ways between OUT/runs and the archive: a finished run the archive lacks is
        copied in (its two small files); an archived run OUT lacks or has unfinished is
        copied back, which `pion sweep` then counts as finished."""
        if not self.archive or self.dry:
            return
        runs = os.path.join(self.out, "runs")
        kept = os.path.join(self.archive, "runs")
        done = {name for name, _, _ in self.records()}
        os.makedirs(kept, exist_ok=True)
        for name in sorted(done):
            for f in self.ARCHIVED:
                src, dst = os.path.join(runs, name, f), os.path.join(kept, name, f)
                if not os.path.exists(dst) or open(src, "rb").read() != open(dst, "rb").read():
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(src, dst + ".tmp")
                    os.replace(dst + ".tmp", dst)
            # A run trained here (its folder holds more than the archived files; a restored one
            # does not) gets this machine's CPU and OpenBLAS kernel set, since those and not
            # only the binary decide a run's last bits.
            stamp = os.path.join(kept, name, self.MACHINE)
            if not os.path.exists(stamp) and set(os.listdir(os.path.join(runs, name))) - \
                    set(self.ARCHIVED):
                with open(stamp + ".tmp", "w") as f:
                    json.dump(self.machine(), f)
                os.replace(stamp + ".tmp", stamp)
        for name in sorted(os.listdir(kept)):
            if name in done or not all(os.path.exists(os.path.join(kept, name, f))
                                       for f in self.ARCHIVED):
                continue
            os.makedirs(os.path.join(runs, name), exist_ok=True)
            for f in self.ARCHIVED:
                shutil.copyfile(os.path.join(kept, name, f), os.path.join(runs, name, f))

    def records(self):
        """Every finished run in OUT/runs: its config and summary."""
        out = []
        runs = os.path.join(self.out, "runs")
        if not os.path.isdir(runs):
            return out
        for name in sorted(os.listdir(runs)):
            d = os.path.join(runs, name)
            try:
                with open(os.path.join(d, "run_config.json")) as f:
                    config = json.load(f)
                with open(os.path.join(d, "summary.json")) as f:
                    summary = json.load(f)
            except (OSError, ValueError):
                continue
            if summary.get("interrupted") or summary.get("iters") != config.get("max_iters"):
                continue
            if config.get("max_iters") != self.iters:
                continue
            out.append((name, config, summary))
        return out

    def matching(self, optimizer, keys, norm="rmsnorm", d_model=None):
        """Finished runs of one setting: {lr: {seed: (summary, config)}}."""
        lr_key = LRS[optimizer][0]
        d_model = d_model or self.d_model
        by_lr = {}
        for _, config, summary in self.records():
            if config.get("optimizer") != optimizer or config.get("norm", "rmsnorm") != norm:
                continue
            if config.get("d_model") != d_model:
                continue
            if any(str(config.get(k)) != v for k, v in keys):
                continue
            lr = float(config[lr_key])
            by_lr.setdefault(lr, {})[config["seed"]] = (summary, config)
        return by_lr

    def best_lr(self, optimizer, keys, norm="rmsnorm", d_model=None):
        """The lr (as the grid writes it) with the lowest seed-1 best val loss among every lr
        run so far (the 4 of LRS and any edge extension), or None."""
        by_lr = self.matching(optimizer, keys, norm, d_model)
        best = None
        for lr, seeds in by_lr.items():
            run = seeds.get(1)
            if run is None:
                continue
            loss = run[0].get("best_val_loss")
            if loss is not None and math.isfinite(loss) and (best is None or loss < best[1]):
                best = (lr, loss)
        return lr_text(optimizer, best[0]) if best else None

    def sweep_lrs(self, optimizer, keys, norm="rmsnorm", d_model=None):
        """Seed 1 at the 4 lrs of LRS; then, while the best is the smallest or the largest lr
        tried, one more lr a factor 2 beyond it (at most 2 more), so no setting is reported
        at an lr its sweep could not show to be a minimum."""
        self.sweep(optimizer, keys, LRS[optimizer][1], [1])
        for _ in range(2):
            if self.dry or (nxt := self.edge_lr(optimizer, keys, norm, d_model)) is None:
                return
            tried = sorted(self.matching(optimizer, keys, norm, d_model))
            print(f"ablation: best lr {self.best_lr(optimizer, keys, norm, d_model)} is at the "
                  f"edge of {[f'{t:g}' for t in tried]}; adding {nxt:g}", flush=True)
            self.sweep(optimizer, keys, [lr_text(optimizer, nxt)], [1])

    def edge_lr(self, optimizer, keys, norm="rmsnorm", d_model=None):
        """The lr a factor 2 beyond the seed-1 best when that is the smallest or largest lr
        tried (at most 2 beyond the 4 of LRS), else None."""
        tried = sorted(self.matching(optimizer, keys, norm, d_model))
        best = self.best_lr(optimizer, keys, norm, d_model)
        base = {float(t) for t in LRS[optimizer][1]}
        if best is None or len(tried) < 2 or len(set(tried) - base) >= 2:
            return None
        x = float(best)
        return x / 2 if x == tried[0] else x * 2 if x == tried[-1] else None

    def lr_sweep_done(self, optimizer, keys, norm="rmsnorm", d_model=None):
        """Whether sweep_lrs has nothing left to run: seed 1 at the 4 lrs, no edge to extend."""
        by_lr = self.matching(optimizer, keys, norm, d_model)
        seed1 = {lr for lr, seeds in by_lr.items() if 1 in seeds}
        return {float(t) for t in LRS[optimizer][1]} <= seed1 and \
            self.edge_lr(optimizer, keys, norm, d_model) is None

    def wait_for_others(self, stage, left):
        """Under --shard, poll OUT until left() (what the other shards still owe this stage)
        is 0, up to 12 hours; returns what is still left. A lone driver does not wait."""
        waited, limit_s = 0.0, 12 * 3600
        while (n := left()) and self.shard[1] > 1 and waited < limit_s:
            if waited == 0:
                print(f"ablation: stage {stage} waits for {n} unit(s) of the other shards "
                      f"(polling every {self.poll_s:g} s)", flush=True)
            time.sleep(self.poll_s)
            waited += self.poll_s
        return left()

    def stage_lr(self, norm_keys=(), chosen=None):
        norm = "none" if norm_keys else "rmsnorm"
        for name, optimizer, keys in (self.my_settings() if chosen is None else chosen):
            if not norm_keys and name in self.best_lrs:
                continue  # its lr sweep was run before; stage seeds runs seeds 1-3 at its best
            self.sweep_lrs(optimizer, keys + list(norm_keys), norm)

    def mine(self, units):
        """This driver's share of a stage's units under --shard K/N: K, K+N, K+2N, ..."""
        k, n = self.shard
        return [u for i, u in enumerate(units) if i % n == k]

    def my_settings(self):
        return self.mine(settings())

    def stage_seeds(self, norm_keys=(), chosen=None, norm="rmsnorm"):
        for name, optimizer, keys in (self.my_settings() if chosen is None else chosen):
            lr = (self.best_lrs.get(name) if not norm_keys else None) or \
                self.best_lr(optimizer, keys + list(norm_keys), norm)
            if lr is None:
                print(f"ablation: {name}{' (norm none)' if norm_keys else ''} has no finished "
                      "seed-1 run yet; run stage lr first", flush=True)
                continue
            self.sweep(optimizer, keys + list(norm_keys), [lr], [1, 2, 3])

    def summary_row(self, name, optimizer, keys, norm="rmsnorm"):
        """(name, best lr, mean, std, n, state MiB, step ms) at the best lr (the given one under
        --best-lrs), or None."""
        lr = (self.best_lrs.get(name) if norm == "rmsnorm" else None) or \
            self.best_lr(optimizer, keys, norm)
        if lr is None:
            return None
        seeds = self.matching(optimizer, keys, norm).get(float(lr), {})
        losses = [s.get("best_val_loss") for s, _ in seeds.values()]
        losses = [x for x in losses if x is not None and math.isfinite(x)]
        if not losses:
            return None
        any_summary = next(iter(seeds.values()))[0]
        state = any_summary.get("optimizer_state_bytes_per_rank", [0])[0] / 2**20
        step_ms = statistics.median(
            s.get("optimizer_step_cpu_ms_per_rank", [float("nan")])[0] for s, _ in seeds.values())
        std = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        return (name, lr, statistics.mean(losses), std, len(losses), state, step_ms)

    def ranked(self, norm="rmsnorm"):
        rows = []
        for name, optimizer, keys in settings():
            norm_keys = [("norm", "none")] if norm == "none" else []
            row = self.summary_row(name, optimizer, keys + norm_keys, norm)
            if row is not None:
                rows.append(row)
        return sorted(rows, key=lambda r: (r[4] < 3, r[2]))

    def best_three(self):
        full = [r for r in self.ranked() if r[4] >= 3][:3]
        names = {r[0] for r in full}
        return [s for s in settings() if s[0] in names]

    def without_three_seeds(self):
        """How many settings lack 3 finished seeds at their best lr."""
        ranked = self.ranked()
        return len(settings()) - len(ranked) + sum(1 for r in ranked if r[4] < 3)

    def stage_nonorm(self):
        # The best three are chosen on every setting's 3 seeds. Under --shard the other drivers
        # may still be running theirs: poll (a lone driver has nobody to wait for).
        if left := self.wait_for_others("nonorm", self.without_three_seeds):
            print(f"ablation: stage nonorm needs stage seeds of every setting ({left} without "
                  "3 seeds yet)", flush=True)
            return
        chosen = self.best_three()
        if len(chosen) < 3:
            print("ablation: stage nonorm needs three settings with 3 seeds (stage seeds)",
                  flush=True)
        # AdamW and default Pion run too, whatever their rank: the paper's claim is that
        # Pion's fixed spectra let it train without normalisation, which a reader judges
        # against the Euclidean baseline, and the default is what a user runs first.
        chosen = self.mine(chosen + [s for s in WIDTH_SETTINGS if s not in chosen])
        self.stage_lr([("norm", "none")], chosen)
        self.stage_seeds([("norm", "none")], chosen, "none")

    def widths(self):
        return sorted({64, self.d_model, 256})

    def width_keys(self, d_model):
        # The base width's runs carry no d_model key: they are stage lr's (or seeds') runs.
        return [] if d_model == self.d_model else [("d_model", str(d_model))]

    def stage_width(self):
        # At the base width stage lr's runs are the points, unless --best-lrs skipped that
        # sweep: then it runs here, under the base config's names (no d_model key).
        units = [(self.d_model, s) for s in WIDTH_SETTINGS if s[0] in self.best_lrs] + \
            [(d_model, s) for d_model in (64, 256) for s in WIDTH_SETTINGS]
        for d_model, (name, optimizer, keys) in self.mine(units):
            self.sweep_lrs(optimizer, self.width_keys(d_model) + keys, "rmsnorm", d_model)

    def stage_widthseeds(self):
        """Seeds 2 and 3 at each width's seed-1 best lr and the lrs tried beside it, so the
        top of each curve, and so which lr is best at a width, rests on 3 seeds."""
        units = [(d_model, s) for d_model in self.widths() for s in WIDTH_SETTINGS]
        # Each pair's seed-1 sweep may be another shard's (stage width splits its pairs
        # otherwise): wait for all of them.
        self.wait_for_others("widthseeds", lambda: sum(
            not self.lr_sweep_done(optimizer, self.width_keys(d_model) + keys, "rmsnorm", d_model)
            for d_model, (_, optimizer, keys) in units))
        for d_model, (name, optimizer, keys) in self.mine(units):
            keys = self.width_keys(d_model) + keys
            tried = sorted(self.matching(optimizer, keys, "rmsnorm", d_model))
            best = self.best_lr(optimizer, keys, "rmsnorm", d_model)
            if best is None:
                print(f"ablation: {name} at d_model {d_model} has no finished seed-1 run; run "
                      "stage width first", flush=True)
                continue
            i = tried.index(float(best))
            self.sweep(optimizer, keys, [lr_text(optimizer, x) for x in tried[max(i - 1, 0):i + 2]],
                       [2, 3])

    def bench_row(self, name):
        """(median ms, x the default two-sided step, moment state MiB) of a setting on the
        GPT-2-small layer of --bench-json, or None."""
        if not self.bench:
            return None
        for row in self.bench["rows"]:
            if name == "AdamW" and row.get("optimizer") == "adamw":
                return (row["median_ms"], None, row["moment_bytes"] / 2**20)
            label = f"Pion {row.get('momentum')}/{row.get('update_side')}/{row.get('normalizer')}"
            if row.get("optimizer") == "pion" and label == name:
                return (row["median_ms"], row["ratio_to_default"], row["moment_bytes"] / 2**20)
        return None

    def table(self, rows):
        head = ("| setting | best lr | best val loss (mean ± std) | seeds | optimizer state "
                "(MiB) | optimizer step, CPU ms |")
        rule = "|---|---:|---:|---:|---:|---:|"
        if self.bench:
            head += " GPT-2-small layer step, ms (x Pion default) | its moment state (MiB) |"
            rule += "---:|---:|"
        lines = [head, rule]
        for name, lr, mean, std, n, state, step_ms in rows:
            std_text = f"{std:.4f}" if math.isfinite(std) else "—"
            line = (f"| {name} | {lr} | {mean:.4f} ± {std_text} | {n} | {state:.2f} | "
                    f"{step_ms:.2f} |")
            if self.bench:
                b = self.bench_row(name)
                if b is None:
                    line += " — | — |"
                else:
                    ratio = f" ({b[1]:.2f}x)" if b[1] is not None else ""
                    line += f" {b[0]:.1f}{ratio} | {b[2]:.2f} |"
            lines.append(line)
        return "\n".join(lines)

    def lr_table(self, norm="rmsnorm"):
        """Every lr tried at seed 1 per setting, the best in bold."""
        lines = ["| setting | lr: best val loss (seed 1) |", "|---|---|"]
        for name, optimizer, keys in settings():
            norm_keys = [("norm", "none")] if norm == "none" else []
            by_lr = self.matching(optimizer, keys + norm_keys, norm)
            points = sorted((lr, seeds[1][0].get("best_val_loss")) for lr, seeds in by_lr.items()
                            if 1 in seeds)
            points = [(lr, x) for lr, x in points if x is not None and math.isfinite(x)]
            if not points:
                continue
            best = min(points, key=lambda p: p[1])[0]
            cells = ", ".join(f"**{lr:g}: {one_loss(x)}**" if lr == best else
                              f"{lr:g}: {one_loss(x)}"
                              for lr, x in points)
            lines.append(f"| {name} | {cells} |")
        return "\n".join(lines)

    def stage_report(self):
        parts = [f"# Pion-family ablation ({self.iters} iters, baby config)\n",
                 "Best lr per setting at seed 1 from 4 values, extended by factors of 2 while "
                 "the best was at an edge of the values tried; then seeds 1-3 at that lr "
                 "(mean ± sample std). Written by scripts/ablation.py.\n",
                 *(["Given best lrs (`--best-lrs`; their lr sweep is not in these runs): "
                    + ", ".join(f"{k} {v}" for k, v in self.best_lrs.items()) + ".\n"]
                   if self.best_lrs else []),
                 "## With RMSNorm\n", self.table(self.ranked()), "",
                 "## Without normalisation (`--norm none`)\n",
                 "The best three with RMSNorm, and AdamW and default Pion (lie/both/adam) as "
                 "references.\n", self.table(self.ranked("none")), "",
                 "## Every lr tried (seed 1)\n", self.lr_table(), "",
                 "Without normalisation:\n", self.lr_table("none"), ""]
        if (line := self.machines_line()) is not None:
            parts += [line + " OpenBLAS picks its kernels by CPU, so the same binary and "
                      "config give other last bits on another CPU; a run then drifts off like "
                      "a nearby seed.", ""]
        if self.bench:
            parts += [f"GPT-2-small layer columns: `{self.bench.get('tool')}` "
                      f"({self.bench.get('hardware')}, {self.bench.get('date')}), median of "
                      f"{self.bench.get('steps')} steps; moment state without sigma0.", ""]
        width = {}  # (name, d_model) -> [(lr, [best val loss of each seed])]
        for name, optimizer, keys in WIDTH_SETTINGS:
            for d_model in self.widths():
                by_lr = self.matching(optimizer, keys, "rmsnorm", d_model)
                points = sorted((lr, [s["best_val_loss"] for s, _ in seeds.values()])
                                for lr, seeds in by_lr.items() if 1 in seeds)
                if points:
                    width[(name, d_model)] = points
        if width:
            parts += ["## Learning rate against width\n",
                      "Best val loss at each lr: seed 1, and mean ± sample std where stage "
                      "widthseeds added seeds 2 and 3 (at the seed-1 best lr and the lrs beside "
                      "it).\n",
                      "| optimizer | d_model | lr: best val loss | best lr (seed 1) | best lr "
                      "(3-seed mean) |", "|---|---:|---|---:|---:|"]
            for (name, d_model), points in sorted(width.items()):
                cells = ", ".join(f"{lr:g}: {loss_text(losses)}" for lr, losses in points)
                seed1 = min(points, key=lambda p: p[1][0])[0]
                three = [(lr, statistics.mean(x)) for lr, x in points if len(x) >= 3]
                best3 = f"{min(three, key=lambda p: p[1])[0]:g}" if three else "—"
                parts.append(f"| {name} | {d_model} | {cells} | {seed1:g} | {best3} |")
            parts.append("")
            parts += self.transfer_table(width)
            self.plot_width(width)
        text = "\n".join(parts)
        with open(os.path.join(self.out, "ABLATION.md"), "w") as f:
            f.write(text)
        print(text)

    @staticmethod
    def transfer_table(width):
        """What the muP claim is for: tune the lr at one width, train at another. The lr picked
        at width a (best 3-seed mean, else best seed 1) is looked up at width b; its cost is
        its loss there less b's best (means over the seeds run; "1 seed" where only seed 1)."""
        def pick(points):
            three = [(lr, statistics.mean(x)) for lr, x in points if len(x) >= 3]
            return min(three or [(lr, x[0]) for lr, x in points], key=lambda p: p[1])
        lines = []
        for (name, a), points_a in sorted(width.items()):
            lr = pick(points_a)[0]
            for (other, b), points_b in sorted(width.items()):
                there = dict(points_b).get(lr)
                if other != name or b == a or there is None:
                    continue
                mean, best = statistics.mean(there), pick(points_b)[1]
                note = "" if len(there) > 1 else " (1 seed)"
                lines.append(f"| {name} | {a} | {b} | {lr:g} | {mean:.4f}{note} | {best:.4f} | "
                             f"{mean - best:+.4f} |")
        if not lines:
            return []
        return ["Tuned at one width, trained at another: the lr picked at d_model a (best 3-seed "
                "mean, else seed 1) at d_model b, against b's own best.\n",
                "| optimizer | tuned at | trained at | lr | loss there | best there | cost |",
                "|---|---:|---:|---:|---:|---:|---:|", *lines, ""]

    def plot_width(self, width):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("ablation: no matplotlib (apt-get install python3-matplotlib); no plot")
            return
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, (name, _, _) in zip(axes, WIDTH_SETTINGS):
            for d_model in self.widths():
                points = width.get((name, d_model))
                if not points:
                    continue
                # The mean over the seeds run at each lr (seed 1 alone off the curve's top),
                # with the sample std as an error bar where there are several.
                lrs = [p[0] for p in points]
                means = [statistics.mean(p[1]) for p in points]
                stds = [statistics.stdev(p[1]) if len(p[1]) > 1 else 0.0 for p in points]
                line = ax.errorbar(lrs, means, yerr=stds, fmt="o-", capsize=3,
                                   label=f"d_model {d_model}")
                best = min((p for p in zip(lrs, means, points) if len(p[2][1]) >= 3),
                           key=lambda p: p[1], default=None)
                if best is not None:
                    ax.plot([best[0]], [best[1]], "*", markersize=14,
                            color=line[0].get_color())
            ax.set_xscale("log")
            ax.set_title(name)
            ax.set_xlabel("lr" if name == "AdamW" else "matrix_lr")
            ax.legend()
        axes[0].set_ylabel("best val loss (mean over seeds; * best 3-seed mean)")
        fig.tight_layout()
        path = os.path.join(self.out, "width_transfer.png")
        fig.savefig(path, dpi=120)
        print(f"wrote {path}")


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"))
    p.add_argument("--pion", default=os.path.join(ROOT, "build", "pion"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--stages", default="lr,seeds,width,nonorm,widthseeds,report")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--bench-json", default=None)
    p.add_argument("--archive", default=None)
    p.add_argument("--best-lrs", dest="best_lrs_file", default=None)
    p.add_argument("--shard", default="0/1")
    args = p.parse_args(argv)
    args.extra = extra
    args.bench = None
    if args.bench_json is not None:
        try:
            with open(args.bench_json) as f:
                args.bench = json.load(f)
            if not isinstance(args.bench, dict) or not isinstance(args.bench.get("rows"), list):
                raise ValueError("no 'rows' list")
        except (OSError, ValueError) as e:
            print(f"ablation: --bench-json {args.bench_json}: {e}; give the JSON that "
                  "`pion bench optim --device cpu --pion_variants --json FILE` writes",
                  file=sys.stderr)
            return 2
    try:
        k, n = (int(x) for x in args.shard.split("/"))
        if not 0 <= k < n:
            raise ValueError
        args.shard = (k, n)
    except ValueError:
        print(f"ablation: --shard {args.shard}: give K/N with 0 <= K < N (e.g. 0/2 and 1/2 "
              "for two drivers)", file=sys.stderr)
        return 2
    try:
        args.poll_s = float(os.environ.get("PION_ABLATION_POLL_S", "60"))
        if not 0 < args.poll_s < math.inf:
            raise ValueError
    except ValueError:
        print(f"ablation: PION_ABLATION_POLL_S={os.environ['PION_ABLATION_POLL_S']}: give the "
              "seconds between polls of stage nonorm, a positive number", file=sys.stderr)
        return 2
    not_dir = lambda path: os.path.exists(path) and not os.path.isdir(path)  # noqa: E731
    if args.archive is not None and (not_dir(args.archive) or
                                     not_dir(os.path.join(args.archive, "runs"))):
        print(f"ablation: --archive {args.archive}: not a directory (or its runs/ is not); give "
              "the folder the archive lives in, e.g. results/ablation", file=sys.stderr)
        return 2
    args.best_lrs = {}
    if args.best_lrs_file is not None:
        names = {name for name, _, _ in settings()}
        try:
            with open(args.best_lrs_file) as f:
                args.best_lrs = json.load(f)
            if not isinstance(args.best_lrs, dict):
                raise ValueError("not a JSON object")
            for k, v in args.best_lrs.items():
                if k not in names:
                    raise ValueError(f"'{k}' is not a setting ({', '.join(sorted(names))})")
                if not isinstance(v, str) or not math.isfinite(float(v)) or float(v) <= 0:
                    raise ValueError(f"'{k}': lr {v!r} is not a positive number in a string")
        except (OSError, ValueError) as e:
            print(f"ablation: --best-lrs {args.best_lrs_file}: {e}; give a JSON object "
                  '{"setting name": "lr", ...}', file=sys.stderr)
            return 2
    if not os.access(args.pion, os.X_OK):
        print(f"ablation: no pion binary at {args.pion}; build it (cmake --build build) or "
              "give --pion", file=sys.stderr)
        return 2
    a = Ablation(args)
    a.sync_archive()
    stages = {"lr": a.stage_lr, "seeds": a.stage_seeds, "nonorm": a.stage_nonorm,
              "width": a.stage_width, "widthseeds": a.stage_widthseeds,
              "report": a.stage_report, "archive": lambda: None}
    for s in args.stages.split(","):
        if s not in stages:
            print(f"ablation: unknown stage '{s}' (lr, seeds, nonorm, width, widthseeds, "
                  "report, archive)", file=sys.stderr)
            return 2
    for s in args.stages.split(","):
        print(f"== stage {s}", flush=True)
        stages[s]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
