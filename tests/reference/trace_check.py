#!/usr/bin/python3
"""Parity check of `pion optim-trace` (fp32 C++) against the fp64 references.

For one optimizer it writes a random trace (W.<i> initial weights, g.<i>.<t> random Gaussian
gradients with a random scale per step), runs the pion binary and the matching reference
(pion_ref.py, muon_ref.py, adamw_torch_ref.py) on the same file and reports, per matrix,

    rel_err = ||W_T - W_ref||_F / ||W_ref - W_0||_F

the fp32 result's distance from the fp64 one relative to how far the weights moved. Every
run draws a fresh seed (printed, so a failure can be replayed with --seed) unless --seed is
given. For pion it checks every retraction (taylor2, cayley, exp) unless --retraction is given;
with --variants, every Pion variant (momentum x update_side x normalizer) with each of them.

    trace_check.py --optimizer pion|adamw|muon --pion BUILD/pion [--seed N] [--steps 20]
                   [--retraction R] [--variants] [--config JSON] [--threshold X] [--keep DIR]
                   [--pion-args '--device cuda --precision fp32']

Prints one line per matrix and a line "METRIC <optimizer>[/<retraction>] <max rel_err>
<threshold> PASS|FAIL" per configuration. Exit code 0 when every configuration is within its
threshold, 1 when one is not, 2 when a tool failed or the arguments are wrong.
The function check(...) does the same from Python and returns the metrics.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import st_io  # noqa: E402

SHAPES = [(64, 48), (48, 96), (33, 33)]  # tall, wide, square (odd size)
RETRACTIONS = ["taylor2", "cayley", "exp"]
# Pion's variants (--variants): every momentum x update_side with the adam normalizer, and
# msign (lie momentum only) with every update_side. msign's threshold is looser: Newton-Schulz
# runs five rounds of fp32 GEMMs whose rounding the fp64 reference does not have.
PION_MOMENTA = ["lie", "ambient", "transported"]
PION_SIDES = ["both", "left", "right", "alternate"]
PION_VARIANTS = ([(m, s, "adam") for m in PION_MOMENTA for s in PION_SIDES] +
                 [("lie", s, "msign") for s in PION_SIDES])
MSIGN_THRESHOLD = 1e-4

# Per optimizer: the reference script, the accepted threshold, the test hyperparameters and
# the scale of W_0. The metric divides by how far W moved, so W_0 and lr are chosen to make
# the movement substantial (fp32 rounding of W is relative to |W|, not to the movement):
# AdamW and Muon add steps, so W_0 is small beside lr * T; Pion only rotates W, so its
# movement is set by lr * c relative to the RMS of W_0 (about 5% of it per step here).
# Non-default values (weight decay, betas, Nesterov off in a second check...) are used where
# they exercise code that the defaults would leave idle.
OPTIMIZERS = {
    "adamw": {
        "ref": "adamw_torch_ref.py", "threshold": 1e-6, "w_std": 0.02,
        "config": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1},
    },
    "muon": {
        "ref": "muon_ref.py", "threshold": 1e-4, "w_std": 0.02,
        "config": {"lr": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
                   "weight_decay": 0.1},
    },
    # Pion's eps is raised from its default 1e-8 on purpose. At the first step
    # A = -m/(sqrt(v) + eps) = -0.1 G / (0.032 |G| + eps): an entry of G within about
    # eps/0.032 of zero sits where A changes fastest (slope 0.1/eps), so fp32 noise of relative
    # size ~1e-7 in G becomes an O(1) error in A. With eps = 1e-8 that happened in about one
    # run in 40 (rel_err 3e-6 instead of 4e-7), and rarer, larger cases can exceed 1e-5: the
    # formula's conditioning, not a bug. With eps = 1e-4 the slope is bounded by 1e3, eps still
    # shapes the small entries (so mishandling it would show), and rel_err stays near 4e-7.
    "pion": {
        "ref": "pion_ref.py", "threshold": 1e-5, "w_std": 0.2,
        "config": {"lr": 0.05, "c": 0.2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-4},
    },
}


def make_trace(rng, steps, w_std):
    """Random initial weights and non-zero gradients whose scale changes from step to step
    (so the optimizers' normalisation by second moments is actually exercised)."""
    tensors = {}
    for i, (rows, cols) in enumerate(SHAPES):
        tensors[f"W.{i}"] = (w_std * rng.standard_normal((rows, cols))).astype(np.float32)
        for t in range(steps):
            scale = 10.0 ** rng.uniform(-1.0, 1.0)
            tensors[f"g.{i}.{t}"] = (scale * rng.standard_normal((rows, cols))).astype(np.float32)
    return tensors


def run_tool(cmd, what):
    """Runs a command; returns its stdout, or raises RuntimeError with its output on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}\n  command: {' '.join(cmd)}")
    return proc.stdout


def relative_errors(w0, got, ref):
    """rel_err per matrix name, all in fp64."""
    out = {}
    for name in sorted(w0):
        if name not in got:
            raise RuntimeError(f"pion output lacks {name}")
        if got[name].shape != ref[name].shape:
            raise RuntimeError(f"{name}: pion gave shape {got[name].shape}, "
                               f"the reference {ref[name].shape}")
        a = w0[name].astype(np.float64)
        moved = np.linalg.norm(ref[name].astype(np.float64) - a)
        if not moved > 0:
            raise RuntimeError(f"{name}: the reference did not move W; the check would be vacuous")
        diff = np.linalg.norm(got[name].astype(np.float64) - ref[name].astype(np.float64))
        out[name] = (float(diff / moved), float(moved))
    return out


def check(optimizer, pion_binary, seed=None, steps=20, retractions=None, extra_config=None,
          threshold=None, keep_dir=None, pion_args=None, out=sys.stdout, variants=False):
    """Runs the parity check; returns a list of (label, max rel_err, threshold, passed).
    variants (pion only): every Pion variant of PION_VARIANTS with each retraction."""
    spec = OPTIMIZERS[optimizer]
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    threshold = spec["threshold"] if threshold is None else threshold
    rng = np.random.default_rng(seed)
    tensors = make_trace(rng, steps, spec["w_std"])
    w0 = {k: v for k, v in tensors.items() if k.startswith("W.")}

    configs = []  # (label, config, threshold)
    base = dict(spec["config"], **(extra_config or {}))
    if optimizer == "pion" and variants:
        for r in (retractions or RETRACTIONS):
            for momentum, side, normalizer in PION_VARIANTS:
                limit = threshold
                if normalizer == "msign" and threshold == spec["threshold"]:
                    limit = MSIGN_THRESHOLD
                configs.append((f"pion/{r}/{momentum}/{side}/{normalizer}",
                                dict(base, retraction=r, momentum=momentum, update_side=side,
                                     normalizer=normalizer), limit))
    elif optimizer == "pion":
        for r in (retractions or RETRACTIONS):
            configs.append((f"pion/{r}", dict(base, retraction=r), threshold))
    else:
        configs.append((optimizer, base, threshold))

    work = keep_dir or tempfile.mkdtemp(prefix="pion_trace_check_")
    os.makedirs(work, exist_ok=True)
    results = []
    try:
        trace_path = os.path.join(work, "trace.safetensors")
        st_io.save(trace_path, tensors)
        print(f"trace_check: seed={seed} steps={steps} shapes={SHAPES} "
              f"(replay with --seed {seed})", file=out)
        for label, config, limit in configs:
            tag = label.replace("/", "_")
            got_path = os.path.join(work, f"{tag}.pion.safetensors")
            ref_path = os.path.join(work, f"{tag}.ref.safetensors")
            cfg = json.dumps(config)
            run_tool([pion_binary, "optim-trace", "--optimizer", optimizer, "--config", cfg,
                      "--input", trace_path, "--output", got_path] + list(pion_args or []),
                     "pion optim-trace")
            run_tool([sys.executable, os.path.join(HERE, spec["ref"]), trace_path, ref_path,
                      "--config", cfg], spec["ref"])
            got, _ = st_io.load(got_path)
            ref, _ = st_io.load(ref_path)
            errs = relative_errors(w0, got, ref)
            print(f"{label}: config {cfg}", file=out)
            for name, (err, moved) in errs.items():
                print(f"  {name} {list(w0[name].shape)}: rel_err {err:.3e} "
                      f"(||W_ref - W_0||_F = {moved:.4g})", file=out)
            worst = max(err for err, _ in errs.values())
            passed = worst <= limit
            print(f"METRIC {label} {worst:.3e} {limit:.0e} {'PASS' if passed else 'FAIL'}",
                  file=out)
            results.append((label, worst, limit, passed))
    finally:
        if keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", required=True, choices=sorted(OPTIMIZERS))
    ap.add_argument("--pion", default=os.environ.get("PION_BINARY") or shutil.which("pion"),
                    help="the pion binary (default: $PION_BINARY, else pion on PATH)")
    ap.add_argument("--seed", type=int, default=None, help="default: a fresh random seed")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--retraction", choices=RETRACTIONS, action="append",
                    help="pion only; repeatable (default: all three)")
    ap.add_argument("--variants", action="store_true",
                    help="pion only: every momentum / update_side / normalizer variant with "
                         "each retraction")
    ap.add_argument("--config", default=None,
                    help="JSON object merged over the test hyperparameters")
    ap.add_argument("--threshold", type=float, default=None,
                    help="override the optimizer's threshold")
    ap.add_argument("--keep", default=None, help="keep the trace and outputs in this directory")
    ap.add_argument("--pion-args", default="",
                    help="extra optim-trace arguments, e.g. '--device cuda --precision mixed'")
    args = ap.parse_args()
    if not args.pion:
        ap.error("no pion binary: pass --pion or set PION_BINARY")
    if args.retraction and args.optimizer != "pion":
        ap.error("--retraction applies to --optimizer pion only")
    if args.variants and args.optimizer != "pion":
        ap.error("--variants applies to --optimizer pion only")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    extra = json.loads(args.config) if args.config else None
    try:
        results = check(args.optimizer, args.pion, args.seed, args.steps, args.retraction, extra,
                        args.threshold, args.keep, args.pion_args.split(),
                        variants=args.variants)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"trace_check: error: {e}", file=sys.stderr)
        return 2
    return 0 if all(passed for *_, passed in results) else 1


if __name__ == "__main__":
    sys.exit(main())
