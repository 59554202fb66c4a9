"""An independent Hugging Face LLaMA reference for `pion import-hf` / `export-hf` (tests/test_hf.cpp).

Nothing here uses pion's code, and neither transformers nor safetensors nor sentencepiece is
needed (Debian's python3 has none of them): the files are written and read by the small
writers and readers below, from the published formats.

    hf_llama.py write --out DIR --spec JSON [--dtype fp32|bf16|fp16] [--shards N]
                      [--drop NAME] [--transpose NAME] [--no-tokenizer] [--seed S]
        A tiny random LlamaForCausalLM directory: config.json, model.safetensors (or N shards
        model-0000i-of-0000N.safetensors + model.safetensors.index.json) and a LLaMA-like
        SentencePiece tokenizer.model (BPE, <unk>=0, <s>=1, </s>=2, 256 byte-fallback pieces,
        dummy prefix), serialized by hand from sentencepiece_model.proto. spec keys: vocab,
        d, layers, heads, kv_heads, ffn, seq, theta, eps, tied.

    hf_llama.py logits --dir DIR --tokens 1,2,3/4,5,6 --precision fp64|fp32 --out FILE
        The logits [B, T, V] of the HF LlamaForCausalLM forward (written here in PyTorch from
        modeling_llama.py's definitions) for the given rows of token ids, as raw little-endian
        float64.

    hf_llama.py read --dir DIR --out FILE.json
        Every tensor of the directory's safetensors files as {name: {dtype, shape, sha}} with
        the values decoded to float64, for comparing two directories.
"""
import argparse
import hashlib
import json
import os
import struct
import sys

import numpy as np

# ---- safetensors (https://huggingface.co/docs/safetensors) ----------------------------------


def to_bf16_bits(a):
    """fp32 -> bfloat16 bits, round to nearest even."""
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype("<u2")


def encode(a, dtype):
    a = np.asarray(a, dtype=np.float32)
    if dtype == "fp32":
        return "F32", a.astype("<f4").tobytes()
    if dtype == "fp16":
        return "F16", a.astype("<f2").tobytes()
    if dtype == "bf16":
        return "BF16", to_bf16_bits(a).tobytes()
    raise ValueError(dtype)


def decode(raw, dtype, shape):
    if dtype == "F32":
        v = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    elif dtype == "F16":
        v = np.frombuffer(raw, dtype="<f2").astype(np.float64)
    elif dtype == "BF16":
        v = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    elif dtype == "F64":
        v = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    else:
        raise ValueError(f"dtype {dtype}")
    return v.reshape(shape)


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype name, shape, bytes)."""
    header, offset = {}, 0
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, raw in tensors:
            f.write(raw)


def read_safetensors(path):
    """{name: (dtype, shape, raw bytes)}"""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), data[b:e])
    return out


def read_dir_tensors(d):
    index = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(read_safetensors(os.path.join(d, f)))
    return out


# ---- a SentencePiece ModelProto, serialized by hand ------------------------------------------


def varint(n):
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_varint(num, value):
    return varint(num << 3) + varint(value)


def field_bytes(num, raw):
    return varint((num << 3) | 2) + varint(len(raw)) + raw


def field_float(num, value):
    return varint((num << 3) | 5) + struct.pack("<f", value)


NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def sentencepiece_model(vocab):
    """A LLaMA-like BPE model of exactly `vocab` pieces."""
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    # Merges in priority order ("he" before "\u2581t" before "\u2581the", so " the" is one piece),
    # then single characters.
    normal = ["he", "\u2581t", "\u2581the", "\u2581a", "in", "er", "an", "on", "\u2581s", "\u2581w",
              "re", "en", "nd", "\u2581o", "\u2581c", "at", "or", "is"]
    normal += ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,!?'0123456789")
    k = 0
    while len(pieces) + len(normal) < vocab:  # filler pieces that encode never reaches
        normal.append(f"\u2581zz{k}")
        k += 1
    normal = normal[: vocab - len(pieces)]
    pieces += [(p, -float(i), NORMAL) for i, p in enumerate(normal)]
    assert len(pieces) == vocab
    out = b""
    for p, score, t in pieces:
        out += field_bytes(1, field_bytes(1, p.encode()) + field_float(2, score) + field_varint(3, t))
    trainer = (field_varint(3, 2)  # model_type BPE
               + field_varint(4, vocab) + field_varint(35, 1)  # byte_fallback
               + field_varint(40, 0) + field_varint(41, 1) + field_varint(42, 2) + field_varint(43, -1))
    normalizer = (field_bytes(1, b"identity") + field_varint(3, 1)  # add_dummy_prefix
                  + field_varint(4, 0) + field_varint(5, 1))
    return out + field_bytes(2, trainer) + field_bytes(3, normalizer)


# ---- writing a model directory -----------------------------------------------------------------


def hf_names(spec):
    names = [("model.embed_tokens.weight", (spec["vocab"], spec["d"]))]
    hd = spec["d"] // spec["heads"]
    kv = spec["kv_heads"] * hd
    for i in range(spec["layers"]):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (spec["d"],)),
                  (p + "self_attn.q_proj.weight", (spec["d"], spec["d"])),
                  (p + "self_attn.k_proj.weight", (kv, spec["d"])),
                  (p + "self_attn.v_proj.weight", (kv, spec["d"])),
                  (p + "self_attn.o_proj.weight", (spec["d"], spec["d"])),
                  (p + "post_attention_layernorm.weight", (spec["d"],)),
                  (p + "mlp.gate_proj.weight", (spec["ffn"], spec["d"])),
                  (p + "mlp.up_proj.weight", (spec["ffn"], spec["d"])),
                  (p + "mlp.down_proj.weight", (spec["d"], spec["ffn"]))]
    names.append(("model.norm.weight", (spec["d"],)))
    if not spec["tied"]:
        names.append(("lm_head.weight", (spec["vocab"], spec["d"])))
    return names


def cmd_write(a):
    spec = json.loads(a.spec)
    spec.setdefault("kv_heads", spec["heads"])
    spec.setdefault("tied", False)
    os.makedirs(a.out, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec["d"], "intermediate_size": spec["ffn"],
        "num_hidden_layers": spec["layers"], "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"], "vocab_size": spec["vocab"],
        "max_position_embeddings": spec["seq"], "rms_norm_eps": spec.get("eps", 1e-6),
        "rope_theta": spec.get("theta", 10000.0), "rope_scaling": None,
        "tie_word_embeddings": spec["tied"], "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[a.dtype],
        "transformers_version": "4.44.0"}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if not a.no_tokenizer:
        with open(os.path.join(a.out, "tokenizer.model"), "wb") as f:
            f.write(sentencepiece_model(spec["vocab"]))
    rng = np.random.default_rng(a.seed)
    tensors = []
    for name, shape in hf_names(spec):
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) * (0.5 / np.sqrt(shape[-1]) if len(shape) == 2 and "embed" not in name else 1.0)
        if name in a.drop:
            continue
        if name in a.transpose:
            v = v.T
        dt, raw = encode(v, a.dtype)
        tensors.append((name, dt, v.shape, raw))
    if a.shards <= 1:
        write_safetensors(os.path.join(a.out, "model.safetensors"), tensors)
        return
    per = (len(tensors) + a.shards - 1) // a.shards
    weight_map, total = {}, 0
    for s in range(a.shards):
        fname = f"model-{s + 1:05d}-of-{a.shards:05d}.safetensors"
        part = tensors[s * per:(s + 1) * per]
        write_safetensors(os.path.join(a.out, fname), part)
        for name, _, _, raw in part:
            weight_map[name] = fname
            total += len(raw)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---- the HF LlamaForCausalLM forward, in PyTorch -----------------------------------------------


def forward(d, tokens, dtype):
    import torch

    cfg = json.load(open(os.path.join(d, "config.json")))
    raw = read_dir_tensors(d)
    W = {n: torch.tensor(decode(b, dt, shape), dtype=dtype) for n, (dt, shape, b) in raw.items()}
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd, eps = D // H, cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta", 10000.0)
    ids = torch.tensor(tokens, dtype=torch.long)
    B, T = ids.shape

    def rmsnorm(x, w):  # LlamaRMSNorm: weight * x / sqrt(mean(x^2) + eps)
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    # LlamaRotaryEmbedding (default rope_type): inv_freq = theta^(-2i/hd), computed in fp64 here.
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def repeat_kv(x, n):  # [B, KV, T, hd] -> [B, KV * n, T, hd]
        if n == 1:
            return x
        b, kv, t, h = x.shape
        return x[:, :, None, :, :].expand(b, kv, n, t, h).reshape(b, kv * n, t, h)

    mask = torch.full((T, T), float("-inf"), dtype=dtype).triu(1)
    h = W["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rmsnorm(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)
        att = (q @ k.transpose(2, 3)) / (hd ** 0.5) + mask
        att = torch.softmax(att, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, D)
        h = h + o @ W[p + "self_attn.o_proj.weight"].T
        x = rmsnorm(h, W[p + "post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(x @ W[p + "mlp.gate_proj.weight"].T)
        h = h + (g * (x @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    h = rmsnorm(h, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    return h @ head.T


def cmd_logits(a):
    import torch

    rows = [[int(t) for t in r.split(",")] for r in a.tokens.split("/")]
    dtype = torch.float64 if a.precision == "fp64" else torch.float32
    with torch.no_grad():
        logits = forward(a.dir, rows, dtype)
    logits.to(torch.float64).numpy().astype("<f8").tofile(a.out)


def cmd_read(a):
    out = {}
    for name, (dt, shape, raw) in read_dir_tensors(a.dir).items():
        v = decode(raw, dt, shape)
        out[name] = {"dtype": dt, "shape": list(shape), "sha": hashlib.sha256(v.tobytes()).hexdigest()}
    json.dump(out, open(a.out, "w"), indent=1, sort_keys=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    w.add_argument("--spec", required=True)
    w.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    w.add_argument("--shards", type=int, default=1)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--drop", action="append", default=[])
    w.add_argument("--transpose", action="append", default=[])
    w.add_argument("--no-tokenizer", action="store_true")
    lg = sub.add_parser("logits")
    lg.add_argument("--dir", required=True)
    lg.add_argument("--tokens", required=True)
    lg.add_argument("--precision", default="fp64", choices=["fp64", "fp32"])
    lg.add_argument("--out", required=True)
    rd = sub.add_parser("read")
    rd.add_argument("--dir", required=True)
    rd.add_argument("--out", required=True)
    a = ap.parse_args()
    {"write": cmd_write, "logits": cmd_logits, "read": cmd_read}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
