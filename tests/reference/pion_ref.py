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
  exp) and reanchor_every; omitted keys take Pion's defaults.
Needs only NumPy; safetensors are read and written by the small functions below.
"""
import argparse
import json
import os
import re
import struct
import sys

import numpy as np

DEFAULTS = {"lr": 0.01, "c": 0.2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
            "retraction": "taylor2", "reanchor_every": 0}


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


def pion_run(W0, grads, lr, c=0.2, beta1=0.9, beta2=0.999, eps=1e-8, retraction="taylor2",
             reanchor_every=0):
    """Applies len(grads) Pion steps to W0 in fp64 and returns the final W.

    lr is a number or a sequence with one value per step; retraction is taylor2 | cayley |
    exp. reanchor_every N > 0 projects W back onto the
    singular values of W0 after every N-th step: W <- U diag(sigma0) V^T.
    """
    W = np.array(W0, dtype=np.float64)
    d_out, d_in = W.shape
    m_in = np.zeros((d_in, d_in)); v_in = np.zeros((d_in, d_in))
    m_out = np.zeros((d_out, d_out)); v_out = np.zeros((d_out, d_out))
    sigma0 = np.linalg.svd(W, compute_uv=False)
    lrs = list(lr) if np.ndim(lr) else [lr] * len(grads)
    if len(lrs) != len(grads):
        raise ValueError(f"{len(lrs)} learning rates for {len(grads)} steps")
    for t, g in enumerate(grads):
        g = np.asarray(g, dtype=np.float64)
        G_in = W.T @ g - g.T @ W
        G_out = g @ W.T - W @ g.T
        m_in = beta1 * m_in + (1 - beta1) * G_in
        v_in = beta2 * v_in + (1 - beta2) * G_in * G_in
        m_out = beta1 * m_out + (1 - beta1) * G_out
        v_out = beta2 * v_out + (1 - beta2) * G_out * G_out
        A_in = -m_in / (np.sqrt(v_in) + eps)
        A_out = -m_out / (np.sqrt(v_out) + eps)
        alpha = c * np.sqrt(d_out * d_in) / (np.linalg.norm(A_out @ W + W @ A_in) + eps)
        s = lrs[t] * alpha
        W = retraction_factor(A_out, s, retraction) @ W @ retraction_factor(A_in, s, retraction)
        if reanchor_every > 0 and (t + 1) % reanchor_every == 0:
            u, _, vt = np.linalg.svd(W, full_matrices=False)
            W = (u * sigma0) @ vt
    return W


# ---- a minimal safetensors reader / writer (NumPy only) ----------------------------------
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16}


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"{path}: header length {n} exceeds the file")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    body = data[8 + n:]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_DTYPES[entry["dtype"]]).newbyteorder("<")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= len(body):
            raise ValueError(f"{path}: tensor {name} lies outside the file")
        arr = np.frombuffer(body[begin:end], dtype=dtype)
        out[name] = arr.reshape(entry["shape"]).astype(dtype.newbyteorder("="))
    return out


def save_safetensors(path, tensors, metadata=None):
    names = sorted(tensors)
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    codes = {np.dtype(v): k for k, v in _DTYPES.items()}
    blobs, offset = [], 0
    for name in names:
        arr = np.ascontiguousarray(tensors[name])
        blob = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - (8 + len(text)) % 8) % 8)  # data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


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
    tensors = load_safetensors(args.input)
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
                             int(config["reanchor_every"]))
    if not out:
        sys.exit("pion_ref.py: the input holds no W.<i> tensors")
    save_safetensors(args.output, out, {"config": json.dumps(config)})


if __name__ == "__main__":
    main()
