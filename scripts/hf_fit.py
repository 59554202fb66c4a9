#!/usr/bin/env python3
"""Which LLaMA-architecture models fit a CPU finetuning run of pion, per optimizer.

    python3 scripts/hf_fit.py [--gib 24] [--batch 1] [--seq 512]

Prints a Markdown table (README, "Finetune an existing model"): parameters, and the memory of
a pion CPU finetuning run (fp32 weights + gradients + optimizer state + activations of one
[batch, seq] step) for AdamW, Muon and each Pion variant. The optimizer state is what
src/optim keeps (state_slots in pion.cpp, muon.cpp, adamw.cpp): hidden matrices (attention and
MLP projections) go to Muon / Pion, the rest (embeddings, LM head, norms) to AdamW with two
moments per parameter. A Pion matrix [m, n] (m = d_out) keeps
    lie momentum, both sides (and alternate), adam:  2 (m^2 + n^2) + min(m, n)
    lie, msign normalizer:                           m^2 + n^2 + min(m, n)
    lie, update side left (output side only):        2 m^2 + min(m, n)   (right: 2 n^2 + ...)
    ambient / transported momentum:                  2 m n + min(m, n)
plus scratch of n^2 + m^2 + 2 m n per distinct shape: Pion's state grows with d^2 per side, so
for the MLP's [ffn, d] matrices (ffn ~ 2.7 d) it is about 3x AdamW's. Activations follow
src/model/memory.cpp's estimate.
"""
import argparse

# (name, vocab, d_model, layers, heads, kv_heads, ffn, tied) from each model's config.json.
MODELS = [
    ("TinyLlama-1.1B", 32000, 2048, 22, 32, 4, 5632, False),
    ("Sheared-LLaMA-1.3B", 32000, 2048, 24, 16, 16, 5504, False),
    ("Sheared-LLaMA-2.7B", 32000, 2560, 32, 20, 20, 6912, False),
    ("OpenLLaMA-3B", 32000, 3200, 26, 32, 32, 8640, False),
    ("LLaMA-2-7B", 32000, 4096, 32, 32, 32, 11008, False),
]

VARIANTS = [
    ("AdamW", None),
    ("Muon", "muon"),
    ("Pion lie/both (default)", lambda m, n: 2 * (m * m + n * n)),
    ("Pion lie/both msign", lambda m, n: m * m + n * n),
    ("Pion lie/left", lambda m, n: 2 * m * m),
    ("Pion lie/right", lambda m, n: 2 * n * n),
    ("Pion ambient or transported", lambda m, n: 2 * m * n),
]


def shapes(v, d, layers, heads, kv_heads, f, tied):
    hd = d // heads
    kv = kv_heads * hd
    matrices = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)] * layers
    other = v * d * (1 if tied else 2) + d * (2 * layers + 1)
    return matrices, other


def activations(v, d, layers, heads, f, rows, seq):
    n = rows * seq
    probs = rows * heads * seq * seq
    per_layer = 8 * n * d + 2 * n + probs + 3 * n * f
    tail = 3 * n * d + 2 * n + n * v
    scratch = 7 * n * d + 3 * n * f + n * v + probs
    return (layers * per_layer + tail + scratch + 2 * n) * 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=24.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    a = ap.parse_args()
    G = 1024.0 ** 3
    head = ["model", "params", "weights fp32"] + [name for name, _ in VARIANTS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, v, d, layers, heads, kv_heads, f, tied in MODELS:
        matrices, other = shapes(v, d, layers, heads, kv_heads, f, tied)
        hidden = sum(m * n for m, n in matrices)
        params = hidden + other
        base = 2 * 4 * params + activations(v, d, layers, heads, f, a.batch, a.seq)
        cells = [name, f"{params / 1e9:.2f}B", f"{4 * params / G:.1f} GiB"]
        for label, rule in VARIANTS:
            if rule is None:
                state = 2 * params
            elif rule == "muon":
                state = hidden + 2 * other
            else:
                state = sum(rule(m, n) + min(m, n) for m, n in matrices) + 2 * other
                state += sum(n * n + m * m + 2 * m * n for m, n in set(matrices))  # scratch
            total = (base + 4 * state) / G
            cells.append(f"{total:.1f} GiB " + ("fits" if total <= a.gib else "**no**"))
        print("| " + " | ".join(cells) + " |")
    print(f"\nTotals: weights + gradients + optimizer state + activations of batch {a.batch} x "
          f"seq {a.seq}; 'fits' = at most {a.gib:g} GiB.")


if __name__ == "__main__":
    main()
