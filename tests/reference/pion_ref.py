#!/usr/bin/python3
"""fp64 NumPy reference of the Pion update, written directly from the spec (docs/PION.md).

Deliberately plain: generators as the two products each, the factors E2 / Cayley / exp built
as matrices and multiplied, exp through an eigendecomposition (not scaling and squaring).
It shares no code and no operation order with the C++ implementation, so agreement between
the two is evidence about both.

Import:  from pion_ref import pion_run
CLI:     pion_ref.py IN.safetensors OUT.safetensors --config JSON
  IN holds W.<i> (d_out x d_in) and g.<i>.<t> (gradient of matrix i at step t = 0..T-1).
  OUT gets W.<i> after the T steps, as F64. JSON (a string, or a path to a .json file) may set
  lr (a number or a list of T numbers), c, beta1, beta2, eps, retraction (taylor2 | cayley |
  exp), reanchor_every, momentum (lie | ambient | transported), update_side (both | left |
  right | alternate), normalizer (adam | msign) and ns_steps; omitted keys take Pion's defaults.

The variants (issue 11), as defined there:
  momentum ambient: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g*g on the d_out x d_in gradient,
    D = m / (sqrt(v) + eps), A_in = -(W^T D - D^T W), A_out = -(D W^T - W D^T);
    transported: the same, and after W <- L W R also m <- L m R (v stays).
  update_side left: R = I and A_in = 0; right: L = I and A_out = 0; alternate: left on steps
    1, 3, 5, ..., right on 2, 4, ...; with lie momentum only the rotating side's moments move.
  normalizer msign (lie momentum): buf = b1 buf + (1-b1) G per side, A = -NS(buf) with Muon's
    quintic Newton-Schulz (3.4445, -4.7750, 2.0315) on buf / (||buf||_F + 1e-7).
Needs only NumPy; safetensors are read and written by st_io.py, shared by the references.
"""
import argparse
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402

DEFAULTS = {"lr": 0.01, "c": 0.2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
            "retraction": "taylor2", "reanchor_every": 0, "momentum": "lie",
            "update_side": "both", "normalizer": "adam", "ns_steps": 5}
MOMENTA = ["lie", "ambient", "transported"]
SIDES = ["both", "left", "right", "alternate"]
NORMALIZERS = ["adam", "msign"]


def _exp_skew(a):
    """exp(a) for real skew a: i*a is Hermitian, i*a = V diag(l) V^H, so exp(a) = V diag(e^{-il}) V^H."""
    lam, vec = np.linalg.eigh(1j * a)
    return np.real((vec * np.exp(-1j * lam)) @ vec.conj().T)


def retraction_factor(a, s, kind):
    """The d x d factor R(s a) for a skew direction a."""
    eye = np.eye(a.shape[0])
    sa = s * a
    if kind == "taylor2":
        return eye + sa + (sa @ sa) / 2.0
    if kind == "cayley":
        return np.linalg.solve(eye - sa / 2.0, eye + sa / 2.0)
    if kind == "exp":
        return _exp_skew(sa)
    raise ValueError(f"unknown retraction {kind!r}: use taylor2, cayley or exp")


def newton_schulz(buf, steps):
    """Muon's quintic iteration X <- a X + (b X X^T + c (X X^T)^2) X on buf / (||buf||_F + 1e-7)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = buf / (np.linalg.norm(buf) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def rotating_sides(update_side, step):
    """(left, right) for the 1-based step: which sides turn."""
    if update_side == "alternate":
        return step % 2 == 1, step % 2 == 0
    return update_side in ("both", "left"), update_side in ("both", "right")


def pion_run(W0, grads, lr, c=0.2, beta1=0.9, beta2=0.999, eps=1e-8, retraction="taylor2",
             reanchor_every=0, momentum="lie", update_side="both", normalizer="adam",
             ns_steps=5):
    """Applies len(grads) Pion steps to W0 in fp64 and returns the final W.

    lr is a number or a sequence with one value per step; retraction is taylor2 | cayley |
    exp. reanchor_every N > 0 projects W back onto the
    singular values of W0 after every N-th step: W <- U diag(sigma0) V^T. momentum,
    update_side, normalizer and ns_steps select a variant (see the module docstring).
    """
    if momentum not in MOMENTA or update_side not in SIDES or normalizer not in NORMALIZERS:
        raise ValueError(f"unknown variant {momentum}/{update_side}/{normalizer}")
    if normalizer == "msign" and momentum != "lie":
        raise ValueError("msign needs lie momentum")
    W = np.array(W0, dtype=np.float64)
    d_out, d_in = W.shape
    m_in = np.zeros((d_in, d_in)); v_in = np.zeros((d_in, d_in))
    m_out = np.zeros((d_out, d_out)); v_out = np.zeros((d_out, d_out))
    m = np.zeros((d_out, d_in)); v = np.zeros((d_out, d_in))  # ambient moments
    sigma0 = np.linalg.svd(W, compute_uv=False)
    lrs = list(lr) if np.ndim(lr) else [lr] * len(grads)
    if len(lrs) != len(grads):
        raise ValueError(f"{len(lrs)} learning rates for {len(grads)} steps")
    for t, g in enumerate(grads):
        g = np.asarray(g, dtype=np.float64)
        left, right = rotating_sides(update_side, t + 1)
        A_in = np.zeros((d_in, d_in))
        A_out = np.zeros((d_out, d_out))
        if momentum == "lie":
            if right:
                G_in = W.T @ g - g.T @ W
                m_in = beta1 * m_in + (1 - beta1) * G_in
                if normalizer == "adam":
                    v_in = beta2 * v_in + (1 - beta2) * G_in * G_in
                    A_in = -m_in / (np.sqrt(v_in) + eps)
                else:
                    A_in = -newton_schulz(m_in, ns_steps)
            if left:
                G_out = g @ W.T - W @ g.T
                m_out = beta1 * m_out + (1 - beta1) * G_out
                if normalizer == "adam":
                    v_out = beta2 * v_out + (1 - beta2) * G_out * G_out
                    A_out = -m_out / (np.sqrt(v_out) + eps)
                else:
                    A_out = -newton_schulz(m_out, ns_steps)
        else:
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            D = m / (np.sqrt(v) + eps)
            if right:
                A_in = -(W.T @ D - D.T @ W)
            if left:
                A_out = -(D @ W.T - W @ D.T)
        alpha = c * np.sqrt(d_out * d_in) / (np.linalg.norm(A_out @ W + W @ A_in) + eps)
        s = lrs[t] * alpha
        L = retraction_factor(A_out, s, retraction) if left else np.eye(d_out)
        R = retraction_factor(A_in, s, retraction) if right else np.eye(d_in)
        W = L @ W @ R
        if momentum == "transported":
            m = L @ m @ R
        if reanchor_every > 0 and (t + 1) % reanchor_every == 0:
            u, _, vt = np.linalg.svd(W, full_matrices=False)
            W = (u * sigma0) @ vt
    return W


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--config", default="{}", help="JSON string or path to a JSON file")
    args = ap.parse_args(argv)
    text = args.config
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    config = dict(DEFAULTS)
    user = json.loads(text)
    unknown = set(user) - set(DEFAULTS)
    if unknown:
        sys.exit(f"pion_ref.py: unknown config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    config.update(user)
    tensors, _ = st_io.load(args.input)
    out = {}
    for name in tensors:
        m = re.fullmatch(r"W\.(.+)", name)
        if not m:
            continue
        i = m.group(1)
        steps = sorted(int(k.rsplit(".", 1)[1]) for k in tensors if re.fullmatch(rf"g\.{re.escape(i)}\.\d+", k))
        if steps != list(range(len(steps))):
            sys.exit(f"pion_ref.py: gradients of W.{i} must be g.{i}.0 .. g.{i}.T-1, got steps {steps}")
        grads = [tensors[f"g.{i}.{t}"] for t in steps]
        out[name] = pion_run(tensors[name], grads, config["lr"], config["c"], config["beta1"],
                             config["beta2"], config["eps"], config["retraction"],
                             int(config["reanchor_every"]), config["momentum"],
                             config["update_side"], config["normalizer"],
                             int(config["ns_steps"]))
    if not out:
        sys.exit("pion_ref.py: the input holds no W.<i> tensors")
    st_io.save(args.output, out, {"config": json.dumps(config)})


if __name__ == "__main__":
    main()
