#!/usr/bin/python3
"""PyTorch CPU peer of `pion train` for the training-throughput benchmark.

Trains the same LLaMA-style model (tests/reference/torch_llama.py, written independently of
the C++ code) on the same token shard that `pion prepare` wrote, with the same loop as pion's
trainer: random B x T windows, forward, backward, global grad-norm clip, torch.optim.AdamW
(decay on 2-D parameters, none on norms), linear warmup + cosine learning rate. fp32, eager
(torch 1.13 has no useful torch.compile on CPU).

    torch_train.py --data DIR --config JSON --steps N [--threads K]

Prints one JSON line: tokens/s over all steps (tokens / time spent in steps, the same
definition as pion's summary.json), the median step time and the final loss.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from torch_llama import Llama  # noqa: E402

SHARD_MAGIC = 20240520
HEADER_INTS = 256


def load_shard(path):
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        sys.exit(f"torch_train.py: {path} is not an llm.c token shard (magic {header[0]})")
    return np.fromfile(path, dtype=np.uint16, offset=HEADER_INTS * 4, count=int(header[2]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset directory made by `pion prepare`")
    ap.add_argument("--config", required=True, help="JSON: model keys + batch_size, lr, ...")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    cfg = json.loads(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.get("seed", 1337))
    rng = np.random.default_rng(cfg.get("seed", 1337))

    with open(os.path.join(args.data, "meta.json")) as f:
        meta = json.load(f)
    cfg["vocab_size"] = meta["vocab_size"]
    tokens = load_shard(os.path.join(args.data, "train.bin"))
    model = Llama(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    lr = cfg.get("lr", 1e-3)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.get("weight_decay", 0.1)},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(cfg.get("beta1", 0.9), cfg.get("beta2", 0.99)), eps=1e-8)
    b, t = cfg["batch_size"], cfg["seq_len"]
    warmup, steps = cfg.get("warmup_iters", 10), args.steps

    times = []
    loss = None
    for step in range(steps):
        start = time.perf_counter()
        starts = rng.integers(0, len(tokens) - t - 1, size=b)
        window = np.stack([tokens[s:s + t + 1] for s in starts]).astype(np.int64)
        x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
        scale = (step + 1) / warmup if step < warmup else \
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.get("grad_clip", 1.0))
        opt.step()
        times.append(time.perf_counter() - start)
    total = sum(times)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps,
                      "tokens_per_sec": steps * b * t / total,
                      "median_step_s": sorted(times)[len(times) // 2], "final_loss": float(loss)}))


if __name__ == "__main__":
    main()
