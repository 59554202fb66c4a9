// CudaDecoder and cuda::generate_tokens (include/pion/cuda/generate.h): src/model/decode.cpp's
// Decoder::extend with the device layers of pion/cuda/layers.h and decode_layers.h.
#include <algorithm>
#include <string>
#include <utility>

#include "pion/core/error.h"
#include "pion/cuda/decode_layers.h"
#include "pion/cuda/generate.h"
#include "pion/model/layers.h"

namespace pion::cuda {

using layers::i64;
using layers::MatmulPrecision;

namespace {

i64 offset_of(const std::vector<ParamEntry>& layout, const std::string& name) {
  for (const auto& e : layout)
    if (e.name == name) return e.offset;
  throw Error("CudaDecoder: the model has no parameter \"" + name + "\"");
}

struct LayerOffsets {
  i64 attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down;  // norms -1 without RMSNorm
};

}  // namespace

struct CudaDecoder::Impl {
  CudaLlama& model;
  Context& ctx;
  ModelConfig config;
  layers::DeviceRopeTable rope;
  i64 tok_embedding = 0, final_norm = -1, lm_head = 0;
  std::vector<LayerOffsets> layers;

  int slots = 0, capacity = 0;
  DeviceBuffer keys, values;  // [n_layer, slots, n_kv_head, capacity, head_dim]
  std::vector<int> length;    // [slots]

  DecodePlan plan;
  // Row scratch for up to row_cap rows (x, h, qkv, att, proj, gu, act, rstd, then the rows
  // whose logits are wanted: selected and normed), logits for out_cap rows; grown on demand.
  i64 row_cap = 0, out_cap = 0;
  DeviceBuffer acts, logits;
  DeviceInt32Buffer meta;  // tokens | row_slot | row_pos | out_rows, row_cap each
  std::unique_ptr<layers::Bf16Workspace> bf16;
  float *x = nullptr, *h = nullptr, *qkv = nullptr, *att = nullptr, *proj = nullptr, *gu = nullptr,
        *act = nullptr, *rstd = nullptr, *sel = nullptr, *sel_normed = nullptr;
  std::vector<float> host_logits;

  Impl(CudaLlama& m, int slot_count, const pion::layers::RopeTable<float>& table)
      : model(m),
        ctx(m.context()),
        config(m.config()),
        rope(table.cos, table.sin, m.config().seq_len, m.config().head_dim() / 2),
        slots(slot_count),
        capacity(m.config().seq_len),
        keys(static_cast<std::size_t>(KvCache::bytes_for(m.config(), slot_count) / 2 /
                                      static_cast<i64>(sizeof(float)))),
        values(keys.size()),
        length(static_cast<std::size_t>(slot_count), 0) {}

  i64 norm_offset(const std::string& name) const {
    return config.has_norm() ? offset_of(model.layout(), name) : -1;
  }

  void ensure(i64 rows, i64 out_rows);
  float* cache_layer(DeviceBuffer& b, int layer) {
    return b.data() + static_cast<i64>(layer) * slots * config.kv_dim() * capacity;
  }
};

CudaDecoder::CudaDecoder(CudaLlama& model, int slots) {
  const ModelConfig& c = model.config();
  check(slots > 0, "CudaDecoder: slots must be positive (got " + std::to_string(slots) + ")");
  check(c.head_dim() <= layers::kDecodeMaxHeadDim,
        "CudaDecoder: head_dim " + std::to_string(c.head_dim()) + " is above the " +
            std::to_string(layers::kDecodeMaxHeadDim) + " the decode-attention kernel handles");
  const auto table = pion::layers::make_rope_table<float>(c.seq_len, c.head_dim(), c.rope_theta);
  impl_ = std::make_unique<Impl>(model, slots, table);
  Impl& m = *impl_;
  const auto& layout = model.layout();
  m.tok_embedding = offset_of(layout, "tok_embedding.weight");
  for (int i = 0; i < c.n_layer; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    // wq|wk|wv and w_gate|w_up are adjacent (llama.h): one fused GEMM each, as in CudaLlama.
    m.layers.push_back({m.norm_offset(p + "attn_norm.weight"), offset_of(layout, p + "attn.wq"),
                        offset_of(layout, p + "attn.wo"), m.norm_offset(p + "mlp_norm.weight"),
                        offset_of(layout, p + "mlp.w_gate"), offset_of(layout, p + "mlp.w_down")});
  }
  m.final_norm = m.norm_offset("final_norm.weight");
  // Tied embeddings: the LM head is the embedding matrix itself.
  m.lm_head = c.tie_embeddings ? m.tok_embedding : offset_of(layout, "lm_head.weight");
  // Never read before written (a slot's positions are stored before they are attended to),
  // but zeros keep a stray read finite.
  m.keys.zero();
  m.values.zero();
}

CudaDecoder::~CudaDecoder() = default;

const ModelConfig& CudaDecoder::config() const {
  return impl_->config;
}
int CudaDecoder::slots() const {
  return impl_->slots;
}
int CudaDecoder::capacity() const {
  return impl_->capacity;
}

int CudaDecoder::length(int slot) const {
  check(slot >= 0 && slot < impl_->slots, "CudaDecoder: slot " + std::to_string(slot) +
                                              " outside [0, " + std::to_string(impl_->slots) + ")");
  return impl_->length[static_cast<std::size_t>(slot)];
}

void CudaDecoder::clear(int slot) {
  length(slot);  // the range check
  impl_->length[static_cast<std::size_t>(slot)] = 0;
}

std::size_t CudaDecoder::device_bytes() const {
  const Impl& m = *impl_;
  return sizeof(float) * (m.keys.size() + m.values.size() + m.acts.size() + m.logits.size()) +
         sizeof(std::int32_t) * m.meta.size() +
         (m.bf16 ? 2 * m.bf16->size() : 0);  // bf16 elements are 2 bytes
}

void CudaDecoder::Impl::ensure(i64 rows, i64 out_rows) {
  const i64 d = config.d_model, f = config.ffn_size(), v = config.vocab_size;
  const i64 qkv_width = d + 2 * static_cast<i64>(config.kv_dim());
  const bool grow_rows = rows > row_cap, grow_out = out_rows > out_cap;
  if (!grow_rows && !grow_out) return;
  // Doubling keeps the number of reallocations logarithmic as prefills grow; every call ends
  // with a stream synchronisation, so no queued kernel still uses the buffers freed here.
  if (grow_rows) {
    row_cap = std::max(rows, 2 * row_cap);
    const i64 n = row_cap;
    acts = DeviceBuffer();
    acts = DeviceBuffer(static_cast<std::size_t>(
        n * d /*x*/ + n * d /*h*/ + n * qkv_width + n * d /*att*/ + n * d /*proj*/ + 2 * n * f +
        n * f /*act*/ + n /*rstd*/ + n * d /*sel*/ + n * d /*sel_normed*/));
    float* p = acts.data();
    auto take = [&p](i64 count) {
      float* r = p;
      p += count;
      return r;
    };
    x = take(n * d);
    h = take(n * d);
    qkv = take(n * qkv_width);
    att = take(n * d);
    proj = take(n * d);
    gu = take(2 * n * f);
    act = take(n * f);
    rstd = take(n);
    sel = take(n * d);
    sel_normed = take(n * d);
    meta = DeviceInt32Buffer();
    meta = DeviceInt32Buffer(static_cast<std::size_t>(4 * n));
  }
  if (grow_out) {
    out_cap = std::min(row_cap, std::max(out_rows, 2 * out_cap));
    logits = DeviceBuffer();
    logits = DeviceBuffer(static_cast<std::size_t>(out_cap * v));
  }
  bf16.reset();
  if (model.options().matmul == MatmulPrecision::Bf16) {
    std::size_t need = 0;
    for (auto [din, dout] : {std::pair<i64, i64>{d, qkv_width}, {d, d}, {d, 2 * f}, {f, d}})
      need = std::max(need, layers::linear_bf16_workspace_elements(row_cap, din, dout));
    need = std::max(need, layers::linear_bf16_workspace_elements(out_cap, d, v));
    bf16 = std::make_unique<layers::Bf16Workspace>(need);
  }
}

std::span<const float> CudaDecoder::extend(std::span<const DecodeChunk> chunks,
                                           bool all_positions) {
  Impl& m = *impl_;
  const ModelConfig& c = m.config;
  plan_decode(m.plan, chunks, m.length, m.capacity, c.vocab_size, all_positions,
              "CudaDecoder::extend");
  const i64 n = static_cast<i64>(m.plan.tokens.size());
  const i64 out_n = static_cast<i64>(m.plan.out_rows.size());
  m.ensure(n, out_n);

  const i64 d = c.d_model, f = c.ffn_size(), v = c.vocab_size;
  const i64 n_head = c.n_head, hd = c.head_dim(), kvh = c.kv_heads();
  const i64 qkv_width = d + 2 * static_cast<i64>(c.kv_dim());
  const double eps = c.norm_eps;
  const MatmulPrecision mp = m.model.options().matmul;
  layers::Bf16Workspace* ws = m.bf16.get();
  Context& ctx = m.ctx;
  const float* w = m.model.params();

  std::int32_t* tokens = m.meta.data();
  std::int32_t* row_slot = tokens + m.row_cap;
  std::int32_t* row_pos = row_slot + m.row_cap;
  std::int32_t* out_rows = row_pos + m.row_cap;
  layers::upload_async(ctx, tokens, m.plan.tokens.data(), m.plan.tokens.size());
  layers::upload_async(ctx, row_slot, m.plan.row_slot.data(), m.plan.row_slot.size());
  layers::upload_async(ctx, row_pos, m.plan.row_pos.data(), m.plan.row_pos.size());
  layers::upload_async(ctx, out_rows, m.plan.out_rows.data(), m.plan.out_rows.size());

  // norm "none": the norm is the identity, its input feeds the next GEMM (as CudaLlama).
  const auto normed = [&](float* out, float* rstd, const float* in, i64 weight, i64 rows) {
    if (weight < 0) return in;
    layers::rmsnorm_forward(ctx, out, rstd, in, w + weight, rows, d, eps);
    return static_cast<const float*>(out);
  };

  layers::embedding_forward(ctx, m.x, tokens, w + m.tok_embedding, n, d);
  for (int l = 0; l < c.n_layer; ++l) {
    const LayerOffsets& o = m.layers[static_cast<std::size_t>(l)];
    float* keys = m.cache_layer(m.keys, l);
    float* values = m.cache_layer(m.values, l);
    layers::linear_forward(ctx, m.qkv, normed(m.h, m.rstd, m.x, o.attn_norm, n), w + o.wqkv, n, d,
                           qkv_width, mp, ws);
    // RoPE rotates the n_head query and the kvh key heads (never the values).
    layers::rope_rows_forward(ctx, m.qkv, m.rope, row_pos, n, n_head, hd, qkv_width);
    layers::rope_rows_forward(ctx, m.qkv + d, m.rope, row_pos, n, kvh, hd, qkv_width);
    // Every row's k and v are stored first, so a prefill row sees the earlier rows of its chunk.
    layers::kv_cache_store(ctx, keys, values, m.qkv, row_slot, row_pos, n, qkv_width, kvh, hd,
                           m.capacity);
    layers::decode_attention(ctx, m.att, m.qkv, keys, values, row_slot, row_pos, n, qkv_width,
                             n_head, kvh, hd, m.capacity);
    layers::linear_forward(ctx, m.proj, m.att, w + o.wo, n, d, d, mp, ws);
    layers::residual_forward(ctx, m.x, m.x, m.proj, n * d);
    layers::linear_forward(ctx, m.gu, normed(m.h, m.rstd, m.x, o.mlp_norm, n), w + o.w_gate_up, n,
                           d, 2 * f, mp, ws);
    layers::swiglu_forward(ctx, m.act, m.gu, n, f);
    layers::linear_forward(ctx, m.proj, m.act, w + o.w_down, n, f, d, mp, ws);
    layers::residual_forward(ctx, m.x, m.x, m.proj, n * d);
  }
  for (const DecodeChunk& ch : chunks)
    m.length[static_cast<std::size_t>(ch.slot)] += static_cast<int>(ch.tokens.size());

  // Only the rows whose logits are wanted go through the final norm and the LM head.
  layers::gather_rows(ctx, m.sel, m.x, out_rows, out_n, d);
  layers::linear_forward(ctx, m.logits.data(),
                         normed(m.sel_normed, m.rstd, m.sel, m.final_norm, out_n), w + m.lm_head,
                         out_n, d, v, mp, ws);
  m.host_logits.resize(static_cast<std::size_t>(out_n * v));
  layers::download_sync(ctx, m.host_logits.data(), m.logits.data(), m.host_logits.size());
  return m.host_logits;
}

std::vector<Generation> generate_tokens(CudaLlama& model,
                                        std::span<const std::vector<std::int32_t>> prompts,
                                        const GenerateOptions& options, std::span<Rng> rngs) {
  // At least one slot, so that empty prompt lists still go through the shared checks.
  CudaDecoder decoder(
      model, generation_slots(model.config(), std::max<std::size_t>(prompts.size(), 1), options));
  return pion::generate_tokens(decoder, prompts, options, rngs);
}

}  // namespace pion::cuda
