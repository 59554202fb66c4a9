#!/usr/bin/env python3
"""AdamW reference: torch.optim.AdamW itself, run in float64.

CLI:  adamw_torch_ref.py IN.safetensors OUT.safetensors --config JSON
  IN holds W.<i> and g.<i>.<t> for t = 0..T-1; OUT gets W.<i> (float64) after T steps, with
  all W.<i> in one param group (as an optimizer over a model would be).
  JSON keys: lr, beta1, beta2, eps, weight_decay (all optional; torch's defaults otherwise).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402


def adamw_run(Ws, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    """Ws: list of arrays; grads: grads[t][i] for step t, param i. Returns the list of W_T."""
    params = [torch.tensor(np.asarray(w, dtype=np.float64), requires_grad=True) for w in Ws]
    opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps,
                            weight_decay=weight_decay)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(np.asarray(g, dtype=np.float64))
        opt.step()
    return [p.detach().numpy().copy() for p in params]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--config", default="{}", help="JSON hyperparameters")
    args = ap.parse_args()
    cfg = json.loads(args.config)
    known = {"lr", "beta1", "beta2", "eps", "weight_decay"}
    unknown = set(cfg) - known
    if unknown:
        sys.exit(f"adamw_torch_ref: unknown config keys {sorted(unknown)}; valid: {sorted(known)}")
    tensors, _ = st_io.load(args.input)
    names = sorted(k for k in tensors if k.startswith("W."))
    if not names:
        sys.exit("adamw_torch_ref: input has no W.<i> tensors")
    steps = 0
    while all(f"g.{n[2:]}.{steps}" in tensors for n in names):
        steps += 1
    if steps == 0:
        sys.exit("adamw_torch_ref: no gradients g.<i>.0 found")
    grads = [[tensors[f"g.{n[2:]}.{t}"] for n in names] for t in range(steps)]
    result = adamw_run([tensors[n] for n in names], grads, **cfg)
    st_io.save(args.output, dict(zip(names, result)))


if __name__ == "__main__":
    main()
