#!/usr/bin/env python3
"""PyTorch fp64 reference for pion's GRPO loss (include/pion/train/grpo.h).

Written from the definitions, independently of the C++ code: the policy is the PyTorch LLaMA of
torch_llama.py; advantages use torch.std (unbiased) per group; the surrogate is
-min(r A, clamp(r, 1 - eps, 1 + eps) A) with r = exp(logp - logp_old), plus kl_coef times the
k3 estimate exp(ref - logp) - (ref - logp) - 1; the loss is the sum over completion tokens
(targets >= 0) divided by their count. autograd gives the gradient (no hand-written weights).

CLI:
  grpo_torch.py IN.safetensors OUT.safetensors
      IN: every parameter under its pion name, "tokens", "targets" (I32 [B, T]), "rewards"
      (F64 [B], groups of group_size consecutive rows), "logp_old", "ref_logp" (F64 [B, T]);
      metadata "config" (ModelConfig JSON) and "grpo" (JSON: group_size, clip_eps, kl_coef,
      adv_eps, std_normalize). OUT: "loss" [1], "advantages" [B] and "grad.<name>".
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from torch_llama import Llama, pion_names  # noqa: E402


def advantages(rewards, group_size, adv_eps, std_normalize):
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (groups.std(dim=1, keepdim=True) + adv_eps)
    return centred.reshape(-1)


def main():
    in_path, out_path = sys.argv[1], sys.argv[2]
    tensors, meta = st_io.load(in_path)
    cfg = json.loads(meta["config"])
    opt = json.loads(meta["grpo"])
    torch.set_default_dtype(torch.float64)
    model = Llama(cfg)
    params = pion_names(model)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(tensors[name].astype(np.float64)))
    tokens = torch.from_numpy(tensors["tokens"].astype(np.int64))
    targets = torch.from_numpy(tensors["targets"].astype(np.int64))
    rewards = torch.from_numpy(tensors["rewards"])
    logp_old = torch.from_numpy(tensors["logp_old"])
    ref_logp = torch.from_numpy(tensors["ref_logp"])

    logits, _ = model(tokens)
    mask = targets >= 0
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    adv = advantages(rewards, opt["group_size"], opt["adv_eps"], opt["std_normalize"])
    a = adv.unsqueeze(1).expand_as(logp)
    ratio = torch.exp(logp - logp_old)
    eps = opt["clip_eps"]
    surrogate = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
    d = ref_logp - logp
    k3 = torch.exp(d) - d - 1
    per_token = surrogate + opt["kl_coef"] * k3
    loss = torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / mask.sum()
    loss.backward()
    out = {"loss": np.array([loss.item()]), "advantages": adv.numpy()}
    for name, p in params.items():
        out["grad." + name] = p.grad.numpy()
    st_io.save(out_path, out)


if __name__ == "__main__":
    main()
