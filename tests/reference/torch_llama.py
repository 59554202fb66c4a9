#!/usr/bin/env python3
"""PyTorch reference for pion's LLaMA-style decoder (include/pion/model/llama.h).

Written independently of the C++ code from the usual LLaMA / HF definitions: RMSNorm with a
weight, RoPE with rotate_half (pairs (i, i + head_dim/2)), causal softmax attention without
biases, SwiGLU MLP, final RMSNorm, LM head, mean cross-entropy ignoring targets < 0.
Grouped-query attention (config "n_kv_head" < "n_head") repeats each K/V head for its group of
query heads as Hugging Face's repeat_kv does; "tie_embeddings" makes the LM head the embedding
matrix (logits = h E^T, one parameter whose gradient autograd sums over both uses).

CLI:
  torch_llama.py grads IN.safetensors OUT.safetensors
      IN: every parameter under its pion name, "tokens" and "targets" (I32 [B, T]) and metadata
      "config" (ModelConfig JSON). The model runs in float64. OUT: "loss" [1], "logits"
      [B, T, V] and "grad.<name>" for every parameter, all float64.
  torch_llama.py bench --config JSON [--batch B] [--steps N] [--threads K]
      Times forward + backward (no optimizer) in float32; prints tokens/s as JSON.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x, n_rep):
    """[b, kv_heads, t, hd] -> [b, kv_heads * n_rep, t, hd], each head n_rep times in a row
    (transformers.models.llama.modeling_llama.repeat_kv)."""
    if n_rep == 1:
        return x
    b, kvh, t, hd = x.shape
    return x[:, :, None, :, :].expand(b, kvh, n_rep, t, hd).reshape(b, kvh * n_rep, t, hd)


class Attention(nn.Module):
    def __init__(self, d, n_head, n_kv_head):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        kv = d // n_head * n_kv_head
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, kv, bias=False)
        self.wv = nn.Linear(d, kv, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        hd = d // self.n_head
        q = self.wq(x).view(b, t, self.n_head, hd).transpose(1, 2)
        k, v = (w(x).view(b, t, self.n_kv_head, hd).transpose(1, 2) for w in (self.wk, self.wv))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = repeat_kv(k, self.n_head // self.n_kv_head)
        v = repeat_kv(v, self.n_head // self.n_kv_head)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w_gate = nn.Linear(d, f, bias=False)
        self.w_up = nn.Linear(d, f, bias=False)
        self.w_down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def make_norm(cfg):
    """RMSNorm, or no normalisation at all for config norm "none" (no weight either)."""
    if cfg.get("norm", "rmsnorm") == "none":
        return nn.Identity()
    return RMSNorm(cfg["d_model"], cfg.get("norm_eps", 1e-5))


class Block(nn.Module):
    def __init__(self, cfg, f):
        super().__init__()
        d = cfg["d_model"]
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(d, cfg["n_head"], cfg.get("n_kv_head", 0) or cfg["n_head"])
        self.mlp_norm = make_norm(cfg)
        self.mlp = Mlp(d, f)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def ffn_size(cfg):
    if cfg.get("ffn_hidden", 0):
        return cfg["ffn_hidden"]
    return int(math.ceil(8 * cfg["d_model"] / 3 / 32)) * 32


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, v = cfg["d_model"], cfg["vocab_size"]
        self.cfg = cfg
        self.tok_embedding = nn.Embedding(v, d)
        self.layers = nn.ModuleList(Block(cfg, ffn_size(cfg)) for _ in range(cfg["n_layer"]))
        self.final_norm = make_norm(cfg)
        self.tied = bool(cfg.get("tie_embeddings", False))
        if not self.tied:
            self.lm_head = nn.Linear(d, v, bias=False)

    def rope(self, t, dtype):
        hd = self.cfg["d_model"] // self.cfg["n_head"]
        theta = self.cfg.get("rope_theta", 10000.0)
        inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens, targets=None):
        x = self.tok_embedding(tokens)
        cos, sin = self.rope(tokens.shape[1], x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        h = self.final_norm(x)
        logits = F.linear(h, self.tok_embedding.weight) if self.tied else self.lm_head(h)
        if targets is None:
            return logits, None
        t = targets.reshape(-1).clone()
        t[t < 0] = -100
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t, ignore_index=-100)
        return logits, loss


def pion_names(model):
    """Maps pion parameter names to torch parameters (nn.Linear/Embedding names + '.weight')."""
    out = {}
    for name, p in model.named_parameters():
        key = name
        if name.endswith(".weight") and (".attn.w" in name or ".mlp.w" in name):
            key = name[: -len(".weight")]  # pion names linear weights without '.weight'
        out[key] = p
    return out


def grads(in_path, out_path):
    tensors, meta = st_io.load(in_path)
    cfg = json.loads(meta["config"])
    torch.set_default_dtype(torch.float64)
    model = Llama(cfg)
    params = pion_names(model)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise SystemExit(f"torch_llama: input lacks parameters {missing}")
    extra = sorted(set(tensors) - set(params) - {"tokens", "targets"})
    if extra:  # e.g. an lm_head.weight beside tie_embeddings
        raise SystemExit(f"torch_llama: input has parameters the model lacks: {extra}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(tensors[name].astype(np.float64)))
    tokens = torch.from_numpy(tensors["tokens"].astype(np.int64))
    targets = torch.from_numpy(tensors["targets"].astype(np.int64))
    logits, loss = model(tokens, targets)
    loss.backward()
    out = {"loss": np.array([loss.item()]), "logits": logits.detach().numpy()}
    for name, p in params.items():
        out["grad." + name] = p.grad.numpy()
    st_io.save(out_path, out)


def bench(cfg, batch, steps, threads):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Llama(cfg)
    t = cfg["seq_len"]
    tokens = torch.randint(0, cfg["vocab_size"], (batch, t))
    targets = torch.randint(0, cfg["vocab_size"], (batch, t))
    for _ in range(3):  # warm-up
        model.zero_grad(set_to_none=False)
        model(tokens, targets)[1].backward()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.zero_grad(set_to_none=False)
        model(tokens, targets)[1].backward()
        times.append(time.perf_counter() - start)
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "median_step_s": med, "tokens_per_s": batch * t / med}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grads")
    g.add_argument("inp")
    g.add_argument("out")
    b = sub.add_parser("bench")
    b.add_argument("--config", required=True)
    b.add_argument("--batch", type=int, default=12)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "grads":
        grads(args.inp, args.out)
    else:
        bench(json.loads(args.config), args.batch, args.steps, args.threads)


if __name__ == "__main__":
    main()
