#!/usr/bin/python3
"""PyTorch side of the optimizer-step benchmarks: the same math as pion on the same
GPT-2-small-shaped matrices (--layers N: N x the 7 matrices of one layer).

CPU (default, fp32): the peer of bench/bench_optim.cpp, timed the same way. Run with Debian's
/usr/bin/python3 (it has torch 1.13); scripts/bench-optim.sh runs this beside the C++
benchmark with the same thread count and prints the side-by-side table.

GPU (--device cuda, fp32 with TF32 off for matmuls and cuDNN unless a name says tf32): the
peer of `pion bench optim --device cuda`; scripts/gpu-bench.sh runs both with --layers 12
and bench/compare_optim.py prints the ratios. Each step is timed with CUDA events, steps
queued back to back after warm-up steps; the median is reported. On the GPU the list is
  pion_taylor2_naive          the naive formula below
  pion_taylor2_7gemm          the 7-GEMM expansion below, one matrix at a time, alpha and s
                              kept on the device (no .item(): no host sync per matrix)
  pion_taylor2_7gemm_batched  the same with the matrices of one shape stacked (bmm/baddbmm)
  pion_taylor2_7gemm_tf32     pion_taylor2_7gemm with TF32 matmuls allowed
  muon_bf16                   KellerJordan/Muon's reference: Newton-Schulz in bf16
  muon_fp32                   the same in fp32
  adamw_foreach, adamw_fused  torch.optim.AdamW(foreach=True) and (fused=True)

Every optimizer is written as a PyTorch user would write it, given its honest best:
  pion_taylor2_naive  the spec's formula written out: G_in, G_out from two GEMMs each,
                      moments, A, alpha, the E2 matrices formed, then E2_out @ W @ E2_in
  pion_taylor2_7gemm  the spec's 7-GEMM expansion (X - X^T generators, P and Q reused for
                      alpha, E2 applied without forming it, cheaper side first, addmm fusing)
  pion_cayley         7-GEMM front, factors (I - sA/2)^-1 (I + sA/2) by torch.linalg.solve
  pion_exp            7-GEMM front, factors exp(sA) by torch.linalg.matrix_exp
  muon                KellerJordan/Muon's muon_update + zeropower_via_newtonschulz5, fp32
  adamw               torch.optim.AdamW(foreach=True)
plus sgemm (torch.mm, 2048^3 on the CPU, 4096^3 on the GPU), to check both sides see the
same BLAS.

Output: one JSON object (median ms per step, all repetitions, versions) on stdout or --json.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

# The layer (d_out, d_in) and hyperparameters: keep in step with pion bench optim's workload
# (src/cli/bench_optim_workload.h), which bench/bench_optim.cpp times at one layer.
SHAPES = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]
MATRIX_LR = 0.02
ADAM_LR = 1e-3
PION = dict(c=0.2, beta1=0.9, beta2=0.999, eps=1e-8)
MUON = dict(momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0)
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def make_layer(seed=2026, layers=1, device="cpu"):
    """N(0, 0.02^2) weights and N(0, 1e-3^2) gradients for layers x SHAPES, drawn on the CPU
    (the same values for any device; layers=1 is the CPU benchmark's one layer)."""
    gen = torch.Generator().manual_seed(seed)
    weights, grads = [], []
    for d_out, d_in in SHAPES * layers:
        weights.append((torch.randn(d_out, d_in, generator=gen) * 0.02).to(device))
        grads.append((torch.randn(d_out, d_in, generator=gen) * 1e-3).to(device))
    return weights, grads


def _try_set(obj, name, value):
    try:
        setattr(obj, name, value)
        return True
    except (AttributeError, AssertionError, RuntimeError):  # torch 1.13 raises AssertionError
        return False


def set_tf32(enabled):
    """TF32 on or off for CUDA matmuls and cuDNN, through every API this torch has, set to
    agree: PyTorch >= 2.9 checks its legacy state (set_float32_matmul_precision, allow_tf32)
    against the new fp32_precision ("ieee" / "tf32") and raises when they disagree, so both
    are set. Returns the settings as read back and the measured relative error of an fp32
    matmul against fp64 (about 1e-7 in fp32, 1e-4 or more with TF32)."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    _try_set(torch.backends.cudnn, "allow_tf32", enabled)
    mode = "tf32" if enabled else "ieee"
    new_api = _try_set(torch.backends.cuda.matmul, "fp32_precision", mode)
    if new_api:
        _try_set(torch.backends.cudnn.conv, "fp32_precision", mode)
        setting = f"torch.backends.cuda.matmul.fp32_precision = {torch.backends.cuda.matmul.fp32_precision!r}"
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        setting = f"torch.backends.cuda.matmul.allow_tf32 = {enabled}"
    try:
        setting += f", float32_matmul_precision {torch.get_float32_matmul_precision()!r}"
    except RuntimeError as e:  # the two APIs disagree after all: say so, the error check decides
        setting += f", float32_matmul_precision unreadable ({e})"
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    exact = a.double() @ b.double()
    got = (a.cuda() @ b.cuda()).double().cpu()
    err = float((got - exact).norm() / exact.norm())
    if (err > 1e-5) != enabled:
        print(f"torch_optim.py: warning: TF32 {'on' if enabled else 'off'} requested ({setting}) but an fp32 "
              f"matmul has relative error {err:.1e}", file=sys.stderr)
    return f"{setting}; fp32 matmul relative error vs fp64 {err:.1e}"


# ---- Pion, the spec's formula written straightforwardly -------------------------------
class PionNaive:
    def __init__(self, weights, grads, lr=MATRIX_LR, c=0.2, beta1=0.9, beta2=0.999, eps=1e-8):
        self.weights, self.grads = weights, grads
        self.lr, self.c, self.b1, self.b2, self.eps = lr, c, beta1, beta2, eps
        self.state = []
        for w in weights:
            m, n = w.shape
            z = dict(device=w.device)
            self.state.append(dict(m_in=torch.zeros(n, n, **z), v_in=torch.zeros(n, n, **z),
                                   m_out=torch.zeros(m, m, **z), v_out=torch.zeros(m, m, **z)))

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
            E2_in = torch.eye(n, device=W.device) + sA_in + sA_in @ sA_in / 2
            E2_out = torch.eye(m, device=W.device) + sA_out + sA_out @ sA_out / 2
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
        if self.retraction == "taylor2" and self.weights[0].is_cuda:
            return self._step_on_device()
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

    def _step_on_device(self):
        """taylor2 on a GPU: the same 7 GEMMs with alpha and s as 0-dim device tensors (a
        .item() per matrix would wait for the GPU 84 times a step); s is folded into the
        operands, since addmm's alpha must be a Python number."""
        for W, g, st in zip(self.weights, self.grads, self.state):
            m, n = W.shape
            A_in = _moments_and_direction(W.T @ g, st["m_in"], st["v_in"], self.b1, self.b2, self.eps)
            A_out = _moments_and_direction(g @ W.T, st["m_out"], st["v_out"], self.b1, self.b2, self.eps)
            P = A_out @ W
            Q = W @ A_in
            s = self.lr * self.c * math.sqrt(m * n) / (torch.linalg.norm(P + Q) + self.eps)
            sA_in, sA_out = A_in.mul_(s), A_out.mul_(s)
            if m >= n:  # LW = W + sP + (sA_out)(sP)/2; W <- LW + R + R (sA_in)/2, R = LW sA_in
                sP = P.mul_(s)
                LW = torch.addmm(W + sP, sA_out, sP, alpha=0.5)
                R = LW @ sA_in
                W.copy_(torch.addmm(LW.add_(R), R, sA_in, alpha=0.5))
            else:  # WR = W + sQ + (sQ)(sA_in)/2; W <- WR + L + (sA_out) L/2, L = sA_out WR
                sQ = Q.mul_(s)
                WR = torch.addmm(W + sQ, sQ, sA_in, alpha=0.5)
                L = sA_out @ WR
                W.copy_(torch.addmm(WR.add_(L), sA_out, L, alpha=0.5))

    def _factor(self, A, s):
        if self.retraction == "exp":
            return torch.linalg.matrix_exp(s * A)
        eye = torch.eye(A.shape[0])
        return torch.linalg.solve(eye - (s / 2) * A, eye + (s / 2) * A)


# ---- Pion, 7-GEMM expansion, the matrices of one shape stacked ----------------------------
class PionBatched:
    """The 7-GEMM taylor2 step on stacks of equal-shape matrices (bmm / baddbmm): what a
    PyTorch user who batches by shape would write. alpha and s stay on the device."""

    def __init__(self, weights, grads, lr=MATRIX_LR, c=0.2, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.c, self.b1, self.b2, self.eps = lr, c, beta1, beta2, eps
        by_shape = {}
        for w, g in zip(weights, grads):
            by_shape.setdefault(tuple(w.shape), []).append((w, g))
        self.groups = []
        for (m, n), pairs in by_shape.items():
            W = torch.stack([w for w, _ in pairs])
            G = torch.stack([g for _, g in pairs])
            b, z = W.shape[0], dict(device=W.device)
            self.groups.append(dict(W=W, G=G, m_in=torch.zeros(b, n, n, **z), v_in=torch.zeros(b, n, n, **z),
                                    m_out=torch.zeros(b, m, m, **z), v_out=torch.zeros(b, m, m, **z)))

    def _direction(self, x, m, v):
        G = x - x.transpose(-2, -1)
        m.mul_(self.b1).add_(G, alpha=1 - self.b1)
        v.mul_(self.b2).addcmul_(G, G, value=1 - self.b2)
        return torch.div(m, v.sqrt().add_(self.eps)).neg_()

    @torch.no_grad()
    def step(self):
        for grp in self.groups:
            W, g = grp["W"], grp["G"]
            _, m, n = W.shape
            A_in = self._direction(W.transpose(-2, -1) @ g, grp["m_in"], grp["v_in"])
            A_out = self._direction(g @ W.transpose(-2, -1), grp["m_out"], grp["v_out"])
            P = A_out @ W
            Q = W @ A_in
            norm = torch.linalg.norm(P + Q, dim=(-2, -1), keepdim=True)
            s = self.lr * self.c * math.sqrt(m * n) / (norm + self.eps)  # (b, 1, 1)
            sA_in, sA_out = A_in.mul_(s), A_out.mul_(s)
            if m >= n:
                sP = P.mul_(s)
                LW = torch.baddbmm(W + sP, sA_out, sP, alpha=0.5)
                R = LW @ sA_in
                W.copy_(torch.baddbmm(LW.add_(R), R, sA_in, alpha=0.5))
            else:
                sQ = Q.mul_(s)
                WR = torch.baddbmm(W + sQ, sQ, sA_in, alpha=0.5)
                L = sA_out @ WR
                W.copy_(torch.baddbmm(WR.add_(L), sA_out, L, alpha=0.5))


# ---- Muon: the reference single-device implementation (fp32 on CPU; bf16 or fp32 on GPU) --
def zeropower_via_newtonschulz5(G, steps, dtype=torch.float32):
    a, b, c = (3.4445, -4.7750, 2.0315)
    # The reference casts to bf16 (X = G.bfloat16()); fp32 on the CPU, as pion's CPU Muon.
    X = G.to(dtype)
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


def muon_update(grad, momentum, beta=0.95, ns_steps=5, nesterov=True, dtype=torch.float32):
    momentum.lerp_(grad, 1 - beta)
    # The reference writes grad.lerp_(...) in place; out of place here so the benchmark's
    # gradient stays the same every step (one extra allocation, on the torch side's cost).
    update = grad.lerp(momentum, beta) if nesterov else momentum
    update = zeropower_via_newtonschulz5(update, steps=ns_steps, dtype=dtype)
    update *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    return update


class Muon:
    def __init__(self, weights, grads, lr=MATRIX_LR, momentum=0.95, nesterov=True, ns_steps=5,
                 weight_decay=0.0, dtype=torch.float32):
        self.weights, self.grads = weights, grads
        self.lr, self.beta, self.nesterov, self.ns_steps, self.wd = lr, momentum, nesterov, ns_steps, weight_decay
        self.dtype = dtype
        self.buffers = [torch.zeros_like(w) for w in weights]

    @torch.no_grad()
    def step(self):
        for p, g, buf in zip(self.weights, self.grads, self.buffers):
            update = muon_update(g, buf, beta=self.beta, ns_steps=self.ns_steps, nesterov=self.nesterov,
                                 dtype=self.dtype)
            p.mul_(1 - self.lr * self.wd)
            p.add_(update.reshape(p.shape), alpha=-self.lr)


class AdamW:
    def __init__(self, weights, grads, fused=False):
        self.params = [torch.nn.Parameter(w) for w in weights]
        for p, g in zip(self.params, grads):
            p.grad = g
        kind = dict(fused=True) if fused else dict(foreach=True)  # torch 1.13 has no fused AdamW
        self.opt = torch.optim.AdamW(self.params, lr=ADAM_LR, **kind, **ADAMW)

    def step(self):
        self.opt.step()


CPU_NAMES = ["pion_taylor2_naive", "pion_taylor2_7gemm", "pion_cayley", "pion_exp", "muon", "adamw"]
CUDA_NAMES = ["pion_taylor2_naive", "pion_taylor2_7gemm", "pion_taylor2_7gemm_batched",
              "pion_taylor2_7gemm_tf32", "muon_bf16", "muon_fp32", "adamw_foreach", "adamw_fused"]


def make(name, base):
    """The optimizer `name` over fresh copies of base's weights (its gradients are shared:
    no optimizer here writes to them)."""
    weights, grads = [w.clone() for w in base[0]], base[1]
    if name == "pion_taylor2_naive":
        return PionNaive(weights, grads, **PION)
    if name == "pion_taylor2_7gemm_batched":
        return PionBatched(weights, grads, **PION)
    if name.startswith("pion_"):
        retraction = name[len("pion_"):].replace("taylor2_7gemm_tf32", "taylor2")
        retraction = retraction.replace("taylor2_7gemm", "taylor2")
        return PionFast(weights, grads, retraction=retraction, **PION)
    if name in ("muon", "muon_fp32"):
        return Muon(weights, grads, **MUON)
    if name == "muon_bf16":
        return Muon(weights, grads, dtype=torch.bfloat16, **MUON)
    if name in ("adamw", "adamw_foreach"):
        return AdamW(weights, grads)
    if name == "adamw_fused":
        return AdamW(weights, grads, fused=True)
    raise SystemExit(f"torch_optim.py: unknown optimizer {name}")


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


def time_cuda(step, warmup, steps):
    """Median GPU time of one call over `steps` calls queued back to back, each between its
    own pair of CUDA events, after `warmup` calls; also every call's time and the wall time
    per call (the host included: it shows when Python, not the GPU, sets the pace)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(steps)]
    start = time.perf_counter()
    for begin, end in events:
        begin.record()
        step()
        end.record()
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
    per_call = [begin.elapsed_time(end) for begin, end in events]
    return statistics.median(per_call), per_call, wall_ms


def main_cuda(args):
    if not torch.cuda.is_available():
        raise SystemExit("torch_optim.py --device cuda: torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                         "run on a machine with an NVIDIA GPU or use --device cpu")
    tf32_off = set_tf32(False)
    shapes = SHAPES * args.layers
    results = {"device": "cuda", "gpu": torch.cuda.get_device_name(0), "torch_version": torch.__version__,
               "cuda_version": torch.version.cuda, "tf32": tf32_off, "layers": args.layers,
               "matrices": len(shapes), "parameters": sum(m * n for m, n in shapes),
               "steps": args.steps, "warmup": args.warmup,
               "timing": f"median of {args.steps} steps queued back to back, CUDA events, after "
                         f"{args.warmup} warm-up steps",
               "steps_ms": {}, "reps_ms": {}, "wall_ms": {}}
    n = 4096
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    c = torch.empty(n, n, device="cuda")
    ms, _, _ = time_cuda(lambda: torch.mm(a, b, out=c), 3, 10)
    results["sgemm_4096_ms"] = ms
    results["sgemm_4096_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    del a, b, c

    base = make_layer(layers=args.layers, device="cuda")
    names = CUDA_NAMES
    if args.only:
        names = [x for x in names if x in args.only.split(",")]
    for name in names:
        tf32 = name.endswith("_tf32")
        if tf32:
            results["tf32_" + name] = set_tf32(True)
        opt = make(name, base)
        ms, per_step, wall = time_cuda(opt.step, args.warmup, args.steps)
        if tf32:
            set_tf32(False)
        results["steps_ms"][name] = ms
        results["reps_ms"][name] = per_step
        results["wall_ms"][name] = wall
        print(f"torch cuda {name}: {ms:.2f} ms (wall {wall:.2f} ms per step)", flush=True, file=sys.stderr)
        del opt
        torch.cuda.empty_cache()
    return results


def main_cpu(args):
    torch.set_num_threads(args.threads)
    results = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "steps_ms": {}, "reps_ms": {}}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)  # warm-up
    ms, reps = time_steps(lambda: torch.mm(a, b), args.reps, 0.3)
    results["sgemm_2048_ms"] = ms
    results["sgemm_2048_gflops"] = 2 * 2048**3 / (ms * 1e-3) / 1e9

    base = make_layer(layers=args.layers)
    names = CPU_NAMES
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    for name in names:
        opt = make(name, base)
        for _ in range(2):  # warm-up: state allocation, allocator caches, thread start-up
            opt.step()
        # One step per repetition for the matrix optimizers (each takes most of a second).
        ms, reps = time_steps(opt.step, args.reps, 0.3 if name == "adamw" else 0.0)
        results["steps_ms"][name] = ms
        results["reps_ms"][name] = reps
        print(f"torch {name}: {ms:.1f} ms", flush=True, file=sys.stderr)
        del opt
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layers", type=int, default=1, help="layers of 7 matrices (12: GPT-2 small's 84)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="cpu: intra-op threads")
    ap.add_argument("--reps", type=int, default=5, help="cpu: repetitions (median reported)")
    ap.add_argument("--steps", type=int, default=20, help="cuda: timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="cuda: untimed warm-up steps")
    ap.add_argument("--only", default="", help="comma-separated subset of the optimizers")
    ap.add_argument("--json", default="", help="write the results here instead of stdout")
    args = ap.parse_args()
    if args.layers < 1 or args.steps < 1 or args.warmup < 0 or args.reps < 1:
        raise SystemExit("torch_optim.py: need --layers >= 1, --steps >= 1, --warmup >= 0, --reps >= 1")
    results = main_cuda(args) if args.device == "cuda" else main_cpu(args)

    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
