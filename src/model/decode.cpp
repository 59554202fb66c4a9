#include "pion/model/decode.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "pion/core/error.h"
#include "pion/model/sampling.h"

namespace pion {

using layers::i64;

namespace {

// Same cut-off as the row loops in layers.cpp: below it OpenMP's spinning threads would fight
// OpenBLAS's for the cores, so small models run these loops serially.
constexpr i64 kMinParallelWork = i64{1} << 24;

i64 offset_of(const std::vector<ParamEntry>& layout, const std::string& name) {
  for (const auto& e : layout)
    if (e.name == name) return e.offset;
  throw Error("Decoder: the model has no parameter \"" + name + "\"");
}

// RoPE of layers::rope_forward, but each row at its own position (rows of different
// sequences and chunks sit at unrelated positions).
void rope_rows(float* x, const layers::RopeTable<float>& table, const int* pos, i64 rows,
               i64 n_head, i64 head_dim, i64 row_stride) {
  const i64 half = table.half;
  for (i64 r = 0; r < rows; ++r) {
    const float* cs = table.cos.data() + pos[r] * half;
    const float* sn = table.sin.data() + pos[r] * half;
    float* row = x + r * row_stride;
    for (i64 h = 0; h < n_head; ++h) {
      float* a = row + h * head_dim;
      float* b = a + half;
      for (i64 i = 0; i < half; ++i) {
        const float xa = a[i], xb = b[i];
        a[i] = xa * cs[i] - xb * sn[i];
        b[i] = xb * cs[i] + xa * sn[i];
      }
    }
  }
}

void add_in_place(float* y, const float* delta, i64 n) {
  for (i64 i = 0; i < n; ++i) y[i] += delta[i];
}

}  // namespace

void plan_decode(DecodePlan& plan, std::span<const DecodeChunk> chunks,
                 std::span<const int> lengths, int capacity, int vocab, bool all_positions,
                 const std::string& who) {
  check(!chunks.empty(), who + ": no chunks");
  const auto slots = static_cast<int>(lengths.size());
  plan.tokens.clear();
  plan.row_slot.clear();
  plan.row_pos.clear();
  plan.out_rows.clear();
  std::vector<bool> seen(lengths.size(), false);
  for (const DecodeChunk& c : chunks) {
    check(c.slot >= 0 && c.slot < slots,
          who + ": slot " + std::to_string(c.slot) + " outside [0, " + std::to_string(slots) + ")");
    check(!seen[static_cast<std::size_t>(c.slot)],
          who + ": slot " + std::to_string(c.slot) + " appears in two chunks");
    seen[static_cast<std::size_t>(c.slot)] = true;
    const int start = lengths[static_cast<std::size_t>(c.slot)];
    check(!c.tokens.empty() &&
              static_cast<i64>(start) + static_cast<i64>(c.tokens.size()) <= capacity,
          who + ": slot " + std::to_string(c.slot) + " holds " + std::to_string(start) +
              " positions; " + std::to_string(c.tokens.size()) + " more do not fit its capacity " +
              std::to_string(capacity) + " (and a chunk must not be empty)");
    for (std::size_t i = 0; i < c.tokens.size(); ++i) {
      check(c.tokens[i] >= 0 && c.tokens[i] < vocab,
            who + ": token " + std::to_string(c.tokens[i]) + " is outside [0, " +
                std::to_string(vocab) + ")");
      plan.tokens.push_back(c.tokens[i]);
      plan.row_slot.push_back(c.slot);
      plan.row_pos.push_back(start + static_cast<int>(i));
      if (all_positions || i + 1 == c.tokens.size())
        plan.out_rows.push_back(static_cast<std::int32_t>(plan.tokens.size() - 1));
    }
  }
}

// A norm weight's offset, or -1 in a model without norms (norm none: the rows pass as they are).
i64 Decoder::norm_offset(const std::vector<ParamEntry>& layout, const std::string& name) const {
  return config_.has_norm() ? offset_of(layout, name) : -1;
}

void Decoder::norm_rows(float* out, float* rstd, const float* in, i64 weight_offset, i64 rows,
                        double eps) const {
  const i64 d = config_.d_model;
  if (weight_offset < 0) {
    std::copy_n(in, rows * d, out);
    return;
  }
  layers::rmsnorm_forward(out, rstd, in, model_.params().data<float>() + weight_offset, rows, d,
                          eps);
}

Decoder::Decoder(Llama<float>& model)
    : model_(model),
      config_(model.config()),
      rope_(layers::make_rope_table<float>(config_.seq_len, config_.head_dim(),
                                           config_.rope_theta)) {
  const auto& layout = model.layout();
  tok_embedding_ = offset_of(layout, "tok_embedding.weight");
  for (int i = 0; i < config_.n_layer; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    // wq|wk|wv and w_gate|w_up are adjacent (llama.h), so each pair is one fused GEMM here too.
    layers_.push_back({norm_offset(layout, p + "attn_norm.weight"),
                       offset_of(layout, p + "attn.wq"), offset_of(layout, p + "attn.wo"),
                       norm_offset(layout, p + "mlp_norm.weight"),
                       offset_of(layout, p + "mlp.w_gate"), offset_of(layout, p + "mlp.w_down")});
  }
  final_norm_ = norm_offset(layout, "final_norm.weight");
  // Tied embeddings: the LM head is the embedding matrix itself.
  lm_head_ = config_.tie_embeddings ? tok_embedding_ : offset_of(layout, "lm_head.weight");
}

void Decoder::ensure_scratch(i64 rows, i64 out_rows) {
  const i64 d = config_.d_model, f = config_.ffn_size(), v = config_.vocab_size;
  auto grow = [](std::vector<float>& b, i64 n) {
    if (static_cast<i64>(b.size()) < n) b.resize(static_cast<std::size_t>(n));
  };
  grow(x_, rows * d);
  grow(h_, rows * d);
  grow(qkv_, rows * (d + 2 * i64{config_.kv_dim()}));
  grow(att_, rows * d);
  grow(proj_, rows * d);
  grow(gu_, rows * 2 * f);
  grow(act_, rows * f);
  grow(rstd_, rows);
  grow(h_out_, out_rows * d);
  grow(logits_, out_rows * v);
}

// att[r] = softmax(q_r K^T / sqrt(hd)) V over positions 0..plan_.row_pos[r] of row r's slot, per
// query head h with K/V head h / group; the same arithmetic as layers::attention_forward's
// row, minus the masked zeros.
void Decoder::attend(float* att, const float* qkv, const KvCache& cache, int layer) const {
  const i64 rows = static_cast<i64>(plan_.row_slot.size());
  const i64 n_head = config_.n_head, hd = config_.head_dim(), d = config_.d_model;
  const i64 stride = d + 2 * i64{config_.kv_dim()};
  const i64 group = n_head / config_.kv_heads();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  i64 work = 0;
  for (int p : plan_.row_pos) work += (p + 1) * n_head * hd;
#pragma omp parallel if (2 * work >= kMinParallelWork)
  {
    std::vector<float> scores(static_cast<std::size_t>(cache.capacity));
#pragma omp for schedule(static)
    for (i64 task = 0; task < rows * n_head; ++task) {
      const i64 r = task / n_head, h = task % n_head;
      const int slot = plan_.row_slot[static_cast<std::size_t>(r)];
      const i64 len = plan_.row_pos[static_cast<std::size_t>(r)] + 1;
      const float* q = qkv + r * stride + h * hd;
      const float* k = cache.key(layer, slot, static_cast<int>(h / group));
      const float* v = cache.value(layer, slot, static_cast<int>(h / group));
      float mx = -INFINITY;
      for (i64 j = 0; j < len; ++j) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (i64 i = 0; i < hd; ++i) dot += q[i] * k[j * hd + i];
        scores[static_cast<std::size_t>(j)] = dot * scale;
        mx = std::max(mx, dot * scale);
      }
      float sum = 0.0f;
      for (i64 j = 0; j < len; ++j) {
        float& s = scores[static_cast<std::size_t>(j)];
        s = layers::fast_exp(s - mx);
        sum += s;
      }
      const float inv = 1.0f / sum;
      float* out = att + r * d + h * hd;
      std::fill(out, out + hd, 0.0f);
      for (i64 j = 0; j < len; ++j) {
        const float p = scores[static_cast<std::size_t>(j)] * inv;
#pragma omp simd
        for (i64 i = 0; i < hd; ++i) out[i] += p * v[j * hd + i];
      }
    }
  }
}

std::span<const float> Decoder::extend(KvCache& cache, std::span<const DecodeChunk> chunks,
                                       bool all_positions) {
  check(cache.n_layer == config_.n_layer && cache.n_kv_head == config_.kv_heads() &&
            cache.head_dim == config_.head_dim() && cache.capacity <= config_.seq_len,
        "Decoder::extend: the cache was built for another model shape");
  const i64 d = config_.d_model, f = config_.ffn_size(), v = config_.vocab_size;
  const i64 n_head = config_.n_head, hd = config_.head_dim();
  const i64 kv_heads = config_.kv_heads(), kv = config_.kv_dim(), qkv_width = d + 2 * kv;
  const double eps = config_.norm_eps;

  plan_decode(plan_, chunks, cache.length, cache.capacity, config_.vocab_size, all_positions,
              "Decoder::extend");
  const std::vector<std::int32_t>& row_slot = plan_.row_slot;
  const std::vector<std::int32_t>& row_pos = plan_.row_pos;
  const i64 n = static_cast<i64>(plan_.tokens.size());
  const i64 m = static_cast<i64>(plan_.out_rows.size());
  ensure_scratch(n, m);
  const float* w = model_.params().data<float>();
  float *x = x_.data(), *h = h_.data(), *qkv = qkv_.data(), *att = att_.data();
  float *proj = proj_.data(), *gu = gu_.data(), *act = act_.data(), *rstd = rstd_.data();

  layers::embedding_forward(x, plan_.tokens.data(), w + tok_embedding_, n, d);
  for (int l = 0; l < config_.n_layer; ++l) {
    const LayerOffsets& o = layers_[static_cast<std::size_t>(l)];
    norm_rows(h, rstd, x, o.attn_norm, n, eps);
    layers::linear_forward(qkv, h, w + o.wqkv, n, d, qkv_width);
    rope_rows(qkv, rope_, row_pos.data(), n, n_head, hd, qkv_width);
    rope_rows(qkv + d, rope_, row_pos.data(), n, kv_heads, hd, qkv_width);
    // Store every row's k and v first, so a prefill row sees the earlier rows of its chunk.
    for (i64 r = 0; r < n; ++r) {
      const int slot = row_slot[static_cast<std::size_t>(r)];
      const i64 pos = row_pos[static_cast<std::size_t>(r)];
      for (i64 hh = 0; hh < kv_heads; ++hh) {
        const float* k = qkv + r * qkv_width + d + hh * hd;
        std::copy_n(k, hd, cache.key(l, slot, static_cast<int>(hh)) + pos * hd);
        std::copy_n(k + kv, hd, cache.value(l, slot, static_cast<int>(hh)) + pos * hd);
      }
    }
    attend(att, qkv, cache, l);
    layers::linear_forward(proj, att, w + o.wo, n, d, d);
    add_in_place(x, proj, n * d);
    norm_rows(h, rstd, x, o.mlp_norm, n, eps);
    layers::linear_forward(gu, h, w + o.w_gate_up, n, d, 2 * f);
    layers::swiglu_forward(act, gu, n, f);
    layers::linear_forward(proj, act, w + o.w_down, n, f, d);
    add_in_place(x, proj, n * d);
  }
  for (const DecodeChunk& c : chunks)
    cache.length[static_cast<std::size_t>(c.slot)] += static_cast<int>(c.tokens.size());

  // Only the rows whose logits are wanted go through the final norm and the LM head (for a
  // prefill that is one row in T: the LM head is the largest GEMM of a small model).
  for (i64 i = 0; i < m; ++i)
    std::copy_n(x + i64{plan_.out_rows[static_cast<std::size_t>(i)]} * d, d, h + i * d);
  norm_rows(h_out_.data(), rstd, h, final_norm_, m, eps);
  layers::linear_forward(logits_.data(), h_out_.data(), w + lm_head_, m, d, v);
  return {logits_.data(), static_cast<std::size_t>(m * v)};
}

void score_targets(Llama<float>& model, std::span<const std::int32_t> inputs,
                   std::span<const std::int32_t> targets, int rows, int seq,
                   std::span<double> log_probs) {
  const auto n = static_cast<std::size_t>(rows) * static_cast<std::size_t>(seq);
  check(rows >= 0 && seq >= 1 && inputs.size() == n && targets.size() == n && log_probs.size() == n,
        "score_targets: inputs, targets and log_probs must all hold rows x seq entries");
  model.set_training(false);
  std::fill(log_probs.begin(), log_probs.end(), 0.0);
  const ModelConfig& mc = model.config();
  const auto v = static_cast<std::size_t>(mc.vocab_size);
  const auto T = static_cast<std::size_t>(seq);
  // Each row's length: up to and including its last target (a row without targets is skipped).
  std::vector<std::size_t> scored;  // rows with targets
  std::vector<std::size_t> length(static_cast<std::size_t>(rows), 0);
  for (std::size_t b = 0; b < static_cast<std::size_t>(rows); ++b) {
    for (std::size_t i = T; i-- > 0;)
      if (targets[b * T + i] >= 0) {
        length[b] = i + 1;
        break;
      }
    if (length[b] > 0) scored.push_back(b);
  }
  int block = static_cast<int>(std::min<std::size_t>(scored.size(), 64));
  while (block > 1 && KvCache::bytes_for(mc, block) > (std::int64_t{256} << 20)) block /= 2;
  if (block < 1) return;
  Decoder decoder(model);
  KvCache cache(mc, block);
  std::vector<DecodeChunk> chunks;
  for (std::size_t first = 0; first < scored.size(); first += static_cast<std::size_t>(block)) {
    const std::size_t count = std::min(scored.size() - first, static_cast<std::size_t>(block));
    chunks.clear();
    for (std::size_t j = 0; j < count; ++j) {
      cache.clear(static_cast<int>(j));
      const std::size_t b = scored[first + j];
      chunks.push_back({static_cast<int>(j), inputs.subspan(b * T, length[b])});
    }
    const std::span<const float> logits = decoder.extend(cache, chunks, true);
    std::size_t position = 0;  // the first logits row of chunk j
    for (std::size_t j = 0; j < count; ++j) {
      const std::size_t b = scored[first + j];
      for (std::size_t i = 0; i < length[b]; ++i) {
        const std::int32_t t = targets[b * T + i];
        if (t >= 0) log_probs[b * T + i] = token_log_prob(logits.subspan((position + i) * v, v), t);
      }
      position += length[b];
    }
  }
}

}  // namespace pion
