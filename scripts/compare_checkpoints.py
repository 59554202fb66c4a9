#!/usr/bin/env python3
"""Largest relative difference between the weights (and optimizer state) of two pion checkpoints.

    compare_checkpoints.py A.safetensors B.safetensors [--prefix model.]

Prints one line per file pair: max over tensors of ||a - b|| / ||b|| (Frobenius), and the tensor.
Used for the 1-rank vs N-rank equality claim in docs/SCALING.md. Needs only NumPy.
"""
import json
import struct
import sys

import numpy as np


def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        assert e["dtype"] == "F32", (name, e["dtype"])
        a, b = e["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(e["shape"]).astype(np.float64)
    return out, header.get("__metadata__", {})


def main():
    args = sys.argv[1:]
    prefix = "model."
    if "--prefix" in args:
        i = args.index("--prefix")
        prefix = args[i + 1]
        del args[i : i + 2]
    a, _ = read(args[0])
    b, _ = read(args[1])
    names = sorted(k for k in b if k.startswith(prefix))
    assert names and set(k for k in a if k.startswith(prefix)) == set(names), "tensor sets differ"
    worst, where = 0.0, None
    for k in names:
        den = np.linalg.norm(b[k])
        rel = np.linalg.norm(a[k] - b[k]) / (den if den > 0 else 1.0)
        if rel >= worst:
            worst, where = rel, k
    print(f"max relative difference {worst:.3e} ({where}) over {len(names)} tensors '{prefix}*'")


if __name__ == "__main__":
    main()
