#!/usr/bin/env python3
"""Paper numbers for docs/SCALING.md: per-rank memory and communication per step of
data-parallel pion for GPT-2 124M, a 1.3B and a 7B model, with AdamW, Muon and Pion.

    /usr/bin/python3 scripts/scaling_model.py        # prints the Markdown tables

Conventions (as the CPU trainer stores things): fp32 weights, fp32 gradients, fp32 optimizer
state. Hidden matrices (attention q, k, v, o and the MLP matrices) go to Muon / Pion, the rest
(embeddings, LM head, norms) to AdamW. Q, K, V are separate d x d matrices, as in pion's model.
"""

GIB = 2**30


def model(name, layers, d, vocab, mlp, tied):
    """mlp: ("gelu", f) -> two matrices [f,d],[d,f]; ("swiglu", f) -> three."""
    kind, f = mlp
    hidden = [(d, d)] * 4  # q, k, v, o  (rows = d_out, cols = d_in)
    hidden += [(f, d), (d, f)] if kind == "gelu" else [(f, d), (f, d), (d, f)]
    hidden = hidden * layers
    other = vocab * d * (1 if tied else 2) + (2 * layers + 1) * d
    return {"name": name, "hidden": hidden, "other": other, "layers": layers, "d": d}


MODELS = [
    model("GPT-2 124M", 12, 768, 50257, ("gelu", 3072), True),
    model("1.3B (GPT-3 XL shape)", 24, 2048, 50257, ("gelu", 8192), True),
    model("7B (LLaMA-7B shape)", 32, 4096, 32000, ("swiglu", 11008), False),
]


def params(m):
    return sum(r * c for r, c in m["hidden"]) + m["other"]


def state_floats(m, opt):
    if opt == "adamw":
        return 2 * params(m)
    adam_rest = 2 * m["other"]
    if opt == "muon":
        return sum(r * c for r, c in m["hidden"]) + adam_rest
    return sum(2 * (r * r + c * c) for r, c in m["hidden"]) + adam_rest


def step_flops(m, opt):
    """Optimizer flops per step (whole model)."""
    if opt == "adamw":
        return 12 * params(m)
    rest = 12 * m["other"]
    if opt == "muon":
        total = 0
        for r, c in m["hidden"]:
            a, b = min(r, c), max(r, c)
            total += 5 * (4 * a * a * b + 2 * a**3)
        return total + rest
    return sum(8 * r * c * c + 6 * r * r * c if r >= c else 8 * c * r * r + 6 * c * c * r
               for r, c in m["hidden"]) + rest


def largest_hidden(m, opt):
    """The heaviest single matrix: it bounds per-parameter sharding's balance."""
    def cost(rc):
        r, c = rc
        return 2 * (r * r + c * c) if opt == "pion" else r * c
    return max(m["hidden"], key=cost)


def main():
    print("| model | params | optimizer | state (1 rank) GiB | state/rank N=8 GiB | weights+grads GiB | "
          "optimizer TFLOP/step | largest Pion/Muon matrix state GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        p = params(m)
        for opt in ("adamw", "muon", "pion"):
            s = state_floats(m, opt) * 4
            lh = largest_hidden(m, opt)
            lstate = 0 if opt == "adamw" else (2 * (lh[0] ** 2 + lh[1] ** 2) if opt == "pion" else lh[0] * lh[1]) * 4
            print(f"| {m['name']} | {p / 1e6:.0f}M | {opt} | {s / GIB:.2f} | {s / 8 / GIB:.2f} | "
                  f"{8 * p / GIB:.2f} | {step_flops(m, opt) / 1e12:.3f} | "
                  f"{'—' if opt == 'adamw' else f'{lstate / GIB:.3f} ({lh[0]}x{lh[1]})'} |")
    print()
    print("Communication per rank per step (fp32, ring algorithms, N ranks), the same for every optimizer:")
    print()
    print("| model | grad all-reduce 2(N-1)/N*4P (N=8) | weight all-gather (N-1)/N*4P (N=8) | total GB | "
          "at 10 GB/s | at 100 GB/s |")
    print("|---|---|---|---|---|---|")
    n = 8
    for m in MODELS:
        p = params(m)
        ar = 2 * (n - 1) / n * 4 * p
        ag = (n - 1) / n * 4 * p
        tot = ar + ag
        print(f"| {m['name']} | {ar / 1e9:.2f} GB | {ag / 1e9:.2f} GB | {tot / 1e9:.2f} | "
              f"{tot / 10e9 * 1e3:.0f} ms | {tot / 100e9 * 1e3:.0f} ms |")
    print()
    print("Tensor parallelism, one hidden matrix [m, n] split by rows (d_out) over t ranks, elements moved per step:")
    print()
    print("| model | matrix | gather-to-owner (2 (t-1)/t m n), t=8 | partial-product route (all-reduce n^2 + all-gather W, g), t=8 |")
    print("|---|---|---|---|")
    t = 8
    for m in MODELS:
        r, c = m["hidden"][-1]
        owner = 2 * (t - 1) / t * r * c
        partial = 2 * (t - 1) / t * c * c + 2 * (t - 1) / t * r * c
        print(f"| {m['name']} | {r}x{c} | {owner / 1e6:.1f}M | {partial / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
