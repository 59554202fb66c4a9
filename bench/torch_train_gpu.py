#!/usr/bin/env python3
"""PyTorch GPU peer of `pion bench train --device cuda`: training tokens/s of the same
LLaMA-style decoder (RMSNorm, RoPE on pairs (i, i + head_dim/2), SwiGLU, untied head,
no biases) on random tokens, written as a PyTorch user would for speed:
bf16 autocast with fp32 master weights, F.scaled_dot_product_attention (flash) with
is_causal, torch.optim.AdamW(fused=True) with decay on 2-D parameters only, global grad-norm
clipping at 1.0, warmup + cosine lr. --compile adds torch.compile (the issue's 450K tok/s
figure); eager is the default (its 185K tok/s).

    torch_train_gpu.py [--layers 12 --d_model 768 --heads 12 --seq_len 1024 --batch 16
                        --vocab 50304] [--steps 30] [--warmup 10] [--compile] [--json FILE]

Tokens/s counts batch * seq_len tokens per step over the timed steps (after --warmup
untimed ones), timed with CUDA events around each step; prints one JSON object.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, d, n_head, f):
        super().__init__()
        self.n_head = n_head
        self.attn_norm = RMSNorm(d)
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.w_gate_up = nn.Linear(d, 2 * f, bias=False)
        self.w_down = nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        hd = d // self.n_head
        q, k, v = self.wqkv(self.attn_norm(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, hd).transpose(1, 2) for z in (q, k, v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, d))
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, vocab, layers, d, n_head, seq_len):
        super().__init__()
        f = int(math.ceil(8 * d / 3 / 32)) * 32
        self.tok_embedding = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, n_head, f) for _ in range(layers))
        self.final_norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        hd = d // n_head
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, targets):
        x = self.tok_embedding(tokens)
        t = tokens.shape[1]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.final_norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d_model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "torch_train_gpu.py needs a CUDA device"
    torch.manual_seed(1337)
    dev = torch.device("cuda")
    model = Llama(args.vocab, args.layers, args.d_model, args.heads, args.seq_len).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model)
    total = args.warmup + args.steps
    gen = torch.Generator(device=dev).manual_seed(7)
    times, loss = [], None
    for step in range(total):
        x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=dev, generator=gen)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        scale = min(1.0, (step + 1) / 10)
        for g in opt.param_groups:
            g["lr"] = 6e-4 * scale
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(start.elapsed_time(end) / 1e3)
    tokens = args.batch * args.seq_len
    out = {"peer": "pytorch" + (" compile" if args.compile else " eager"),
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
           "date": time.strftime("%Y-%m-%d"),
           "params": sum(p.numel() for p in model.parameters()),
           "tokens_per_sec": args.steps * tokens / sum(times),
           "median_step_ms": 1e3 * statistics.median(times), "final_loss": float(loss),
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
