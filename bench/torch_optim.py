#!/usr/bin/python3
"""PyTorch (CPU, fp32) side of the optimizer-step benchmark: the same math as
bench/bench_optim.cpp on the same GPT-2-small-shaped layer, timed the same way.

Run with Debian's /usr/bin/python3 (it has torch 1.13); scripts/bench-optim.sh runs this
beside the C++ benchmark with the same thread count and prints the side-by-side table.

Every optimizer is written as a PyTorch user would write it, given its honest best:
  pion_taylor2_naive  the spec's formula written out: G_in, G_out from two GEMMs each,
                      moments, A, alpha, the E2 matrices formed, then E2_out @ W @ E2_in
  pion_taylor2_7gemm  the spec's 7-GEMM expansion (X - X^T generators, P and Q reused for
                      alpha, E2 applied without forming it, cheaper side first, addmm fusing)
  pion_cayley         7-GEMM front, factors (I - sA/2)^-1 (I + sA/2) by torch.linalg.solve
  pion_exp            7-GEMM front, factors exp(sA) by torch.linalg.matrix_exp
  muon                KellerJordan/Muon's muon_update + zeropower_via_newtonschulz5, fp32
  adamw               torch.optim.AdamW(foreach=True)
plus sgemm (torch.mm, 2048^3), to check both sides see the same BLAS.

Output: one JSON object (median ms per step, all repetitions, versions) on stdout or --json.
"""
import argparse
import json
import math
import os
import statistics
import time

import torch

# The layer (d_out, d_in) and hyperparameters: keep in step with bench/bench_optim.cpp.
SHAPES = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]
MATRIX_LR = 0.02
ADAM_LR = 1e-3
PION = dict(c=0.2, beta1=0.9, beta2=0.999, eps=1e-8)
MUON = dict(momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0)
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def make_layer(seed=2026):
    gen = torch.Generator().manual_seed(seed)
    weights, grads = [], []
    for d_out, d_in in SHAPES:
        weights.append(torch.randn(d_out, d_in, generator=gen) * 0.02)
        grads.append(torch.randn(d_out, d_in, generator=gen) * 1e-3)
    return weights, grads


# ---- Pion, the spec's formula written straightforwardly -------------------------------
class PionNaive:
    def __init__(self, weights, grads, lr=MATRIX_LR, c=0.2, beta1=0.9, beta2=0.999, eps=1e-8):
        self.weights, self.grads = weights, grads
        self.lr, self.c, self.b1, self.b2, self.eps = lr, c, beta1, beta2, eps
        self.state = []
        for w in weights:
            m, n = w.shape
            self.state.append(dict(m_in=torch.zeros(n, n), v_in=torch.zeros(n, n),
                                   m_out=torch.zeros(m, m), v_out=torch.zeros(m, m)))

    @torch.no_grad()
    def step(self):
        for W, g, st in zip(self.weights, self.grads, self.state):
            m, n = W.shape
            G_in = W.T @ g - g.T @ W
            G_out = g @ W.T - W @ g.T
            st["m_in"].mul_(self.b1).add_(G_in, alpha=1 - self.b1)
            st["v_in"].mul_(self.b2).addcmul_(G_in, G_in, value=1 - self.b2)
            st["m_out"].mul_(self.b1).add_(G_out, alpha=1 - self.b1)
            st["v_out"].mul_(self.b2).addcmul_(G_out, G_out, value=1 - self.b2)
            A_in = -st["m_in"] / (st["v_in"].sqrt() + self.eps)
            A_out = -st["m_out"] / (st["v_out"].sqrt() + self.eps)
            alpha = self.c * math.sqrt(m * n) / (torch.linalg.norm(A_out @ W + W @ A_in) + self.eps)
            s = self.lr * alpha
            sA_in, sA_out = s * A_in, s * A_out
            E2_in = torch.eye(n) + sA_in + sA_in @ sA_in / 2
            E2_out = torch.eye(m) + sA_out + sA_out @ sA_out / 2
            W.copy_(E2_out @ W @ E2_in)


# ---- Pion with the spec's 7-GEMM expansion (and exact retractions) ----------------------
def _moments_and_direction(x, m, v, b1, b2, eps):
    """x = W^T g (or g W^T); returns A = -m / (sqrt(v) + eps) after the moment update."""
    G = x - x.T
    m.mul_(b1).add_(G, alpha=1 - b1)
    v.mul_(b2).addcmul_(G, G, value=1 - b2)
    return torch.div(m, v.sqrt().add_(eps)).neg_()


class PionFast(PionNaive):
    def __init__(self, weights, grads, retraction="taylor2", **kw):
        super().__init__(weights, grads, **kw)
        self.retraction = retraction

    @torch.no_grad()
    def step(self):
        for W, g, st in zip(self.weights, self.grads, self.state):
            m, n = W.shape
            A_in = _moments_and_direction(W.T @ g, st["m_in"], st["v_in"], self.b1, self.b2, self.eps)
            A_out = _moments_and_direction(g @ W.T, st["m_out"], st["v_out"], self.b1, self.b2, self.eps)
            P = A_out @ W
            Q = W @ A_in
            alpha = self.c * math.sqrt(m * n) / (torch.linalg.norm(P + Q).item() + self.eps)
            s = self.lr * alpha
            if self.retraction == "taylor2":
                h = s * s / 2
                if m >= n:  # left first: 8 m n^2 + 6 m^2 n flops in all
                    LW = torch.addmm(W.add(P, alpha=s), A_out, P, alpha=h)
                    R = LW @ A_in
                    W.copy_(torch.addmm(LW.add_(R, alpha=s), R, A_in, alpha=h))
                else:  # right first: 6 m n^2 + 8 m^2 n
                    WR = torch.addmm(W.add(Q, alpha=s), Q, A_in, alpha=h)
                    L = A_out @ WR
                    W.copy_(torch.addmm(WR.add_(L, alpha=s), A_out, L, alpha=h))
            else:
                W.copy_(self._factor(A_out, s) @ W @ self._factor(A_in, s))

    def _factor(self, A, s):
        if self.retraction == "exp":
            return torch.linalg.matrix_exp(s * A)
        eye = torch.eye(A.shape[0])
        return torch.linalg.solve(eye - (s / 2) * A, eye + (s / 2) * A)


# ---- Muon: the reference single-device implementation, fp32 on CPU -----------------------
def zeropower_via_newtonschulz5(G, steps):
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.float()  # the reference casts to bf16 on GPU; fp32 here, as pion's CPU Muon
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def muon_update(grad, momentum, beta=0.95, ns_steps=5, nesterov=True):
    momentum.lerp_(grad, 1 - beta)
    # The reference writes grad.lerp_(...) in place; out of place here so the benchmark's
    # gradient stays the same every step (one extra allocation, on the torch side's cost).
    update = grad.lerp(momentum, beta) if nesterov else momentum
    update = zeropower_via_newtonschulz5(update, steps=ns_steps)
    update *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    return update


class Muon:
    def __init__(self, weights, grads, lr=MATRIX_LR, momentum=0.95, nesterov=True, ns_steps=5,
                 weight_decay=0.0):
        self.weights, self.grads = weights, grads
        self.lr, self.beta, self.nesterov, self.ns_steps, self.wd = lr, momentum, nesterov, ns_steps, weight_decay
        self.buffers = [torch.zeros_like(w) for w in weights]

    @torch.no_grad()
    def step(self):
        for p, g, buf in zip(self.weights, self.grads, self.buffers):
            update = muon_update(g, buf, beta=self.beta, ns_steps=self.ns_steps, nesterov=self.nesterov)
            p.mul_(1 - self.lr * self.wd)
            p.add_(update.reshape(p.shape), alpha=-self.lr)


class AdamW:
    def __init__(self, weights, grads):
        self.params = [torch.nn.Parameter(w) for w in weights]
        for p, g in zip(self.params, grads):
            p.grad = g
        self.opt = torch.optim.AdamW(self.params, lr=ADAM_LR, foreach=True, **ADAMW)

    def step(self):
        self.opt.step()


def make(name):
    weights, grads = make_layer()
    if name == "pion_taylor2_naive":
        return PionNaive(weights, grads, **PION)
    if name.startswith("pion_"):
        retraction = name[len("pion_"):].replace("taylor2_7gemm", "taylor2")
        return PionFast(weights, grads, retraction=retraction, **PION)
    if name == "muon":
        return Muon(weights, grads, **MUON)
    if name == "adamw":
        return AdamW(weights, grads)
    raise SystemExit(f"unknown optimizer {name}")


def time_steps(step, reps, min_time):
    """Median wall time of one call, over reps repetitions of at least min_time seconds."""
    per_call = []
    for _ in range(reps):
        calls, start = 0, time.perf_counter()
        while True:
            step()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        per_call.append(1e3 * elapsed / calls)
    return statistics.median(per_call), per_call


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated subset of the optimizers")
    ap.add_argument("--json", default="", help="write the results here instead of stdout")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "steps_ms": {}, "reps_ms": {}}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)  # warm-up
    ms, reps = time_steps(lambda: torch.mm(a, b), args.reps, 0.3)
    results["sgemm_2048_ms"] = ms
    results["sgemm_2048_gflops"] = 2 * 2048**3 / (ms * 1e-3) / 1e9

    names = ["pion_taylor2_naive", "pion_taylor2_7gemm", "pion_cayley", "pion_exp", "muon", "adamw"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    for name in names:
        opt = make(name)
        for _ in range(2):  # warm-up: state allocation, allocator caches, thread start-up
            opt.step()
        # One step per repetition for the matrix optimizers (each takes most of a second).
        ms, reps = time_steps(opt.step, args.reps, 0.3 if name == "adamw" else 0.0)
        results["steps_ms"][name] = ms
        results["reps_ms"][name] = reps
        print(f"torch {name}: {ms:.1f} ms", flush=True, file=__import__("sys").stderr)
        del opt

    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
