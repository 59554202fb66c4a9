#!/usr/bin/env python3
"""Muon in NumPy float64, written from docs/PION.md (the KellerJordan/Muon single-device rule).

    muon_run(W0, grads, lr, momentum, nesterov, ns_steps, weight_decay) -> W after len(grads) steps

CLI:  muon_ref.py IN.safetensors OUT.safetensors --config JSON
  IN holds W.<i> (2-D) and g.<i>.<t> for t = 0..T-1; OUT gets W.<i> (float64) after T steps.
  JSON keys: lr, momentum, nesterov, ns_steps, weight_decay (all optional; eps too).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(G, steps=5, eps=1e-7):
    a, b, c = NS_COEFFS
    X = np.array(G, dtype=np.float64)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    X = X / (np.linalg.norm(X) + eps)  # Frobenius norm
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


def muon_run(W0, grads, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
             eps=1e-7):
    W = np.array(W0, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"muon_ref: W must be 2-D, got shape {W.shape}")
    buf = np.zeros_like(W)
    rows, cols = W.shape
    scale = max(1.0, rows / cols) ** 0.5
    for g in grads:
        g = np.asarray(g, dtype=np.float64)
        buf = buf + (1.0 - momentum) * (g - buf)          # buf.lerp_(g, 1 - beta)
        U = g + momentum * (buf - g) if nesterov else buf  # g.lerp(buf, beta)
        O = newton_schulz5(U, ns_steps, eps)
        W = W * (1.0 - lr * weight_decay) - lr * scale * O
    return W


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--config", default="{}", help="JSON hyperparameters")
    args = ap.parse_args()
    cfg = json.loads(args.config)
    known = {"lr", "momentum", "nesterov", "ns_steps", "weight_decay", "eps"}
    unknown = set(cfg) - known
    if unknown:
        sys.exit(f"muon_ref: unknown config keys {sorted(unknown)}; valid: {sorted(known)}")
    tensors, _ = st_io.load(args.input)
    out = {}
    for name in sorted(k for k in tensors if k.startswith("W.")):
        i = name[2:]
        grads = []
        while f"g.{i}.{len(grads)}" in tensors:
            grads.append(tensors[f"g.{i}.{len(grads)}"])
        if not grads:
            sys.exit(f"muon_ref: no gradients g.{i}.0.. for {name}")
        out[name] = muon_run(tensors[name], grads, **cfg)
    if not out:
        sys.exit("muon_ref: input has no W.<i> tensors")
    st_io.save(args.output, out)


if __name__ == "__main__":
    main()
