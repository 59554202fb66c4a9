// The decoder on the GPU (include/pion/cuda/llama.h): the same sequence of layer calls as
// src/model/llama.cpp, on device buffers, with pion/cuda/layers.h in place of the CPU layers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <string>

#include "pion/core/error.h"
#include "pion/cuda/cudnn_attention.h"
#include "pion/cuda/flash_attention.h"
#include "pion/cuda/llama.h"
#include "pion/cuda/vector_ops.h"
#include "pion/model/layers.h"

namespace pion::cuda {

using layers::i64;
using layers::MatmulPrecision;

layers::MatmulPrecision parse_matmul_precision(const std::string& name) {
  if (name == "bf16") return MatmulPrecision::Bf16;
  if (name == "tf32") return MatmulPrecision::Tf32;
  if (name == "fp32") return MatmulPrecision::Fp32;
  throw Error("matmul precision must be bf16, tf32 or fp32, got '" + name + "'");
}

const char* attention_name(CudaAttention attention) {
  switch (attention) {
    case CudaAttention::Materialized:
      return "materialized";
    case CudaAttention::Flash:
      return "flash";
    case CudaAttention::Cudnn:
      return "cudnn";
  }
  return "?";
}

CudaAttention choose_attention(const std::string& name, const ModelConfig& config, int batch,
                               MatmulPrecision matmul) {
  if (name == "flash") return CudaAttention::Flash;
  if (name == "materialized") return CudaAttention::Materialized;
  if (name == "cudnn") {
    check(matmul == MatmulPrecision::Bf16,
          "--attention cudnn needs --matmul_precision bf16 (cuDNN's fused attention is bf16)");
    const std::string why = layers::cudnn_attention_unavailable();
    check(why.empty(), "--attention cudnn: this pion was " + why + "; use --attention flash");
    return CudaAttention::Cudnn;
  }
  check(name == "auto", "attention must be auto, flash, materialized or cudnn, got '" + name + "'");
  if (matmul == MatmulPrecision::Bf16) return CudaAttention::Flash;  // the tensor-core kernels
  const double probs_bytes = 4.0 * config.n_layer * batch * config.n_head *
                             static_cast<double>(config.seq_len) * config.seq_len;
  return probs_bytes <= 0.25 * static_cast<double>(device_memory_bytes())
             ? CudaAttention::Materialized
             : CudaAttention::Flash;
}

namespace {

struct LayerParams {
  float *attn_norm, *wqkv, *wo, *mlp_norm, *w_gate_up, *w_down;
};
struct Weights {
  float* tok_embedding = nullptr;
  std::vector<LayerParams> layers;
  float* final_norm = nullptr;
  float* lm_head = nullptr;
};

// Pointers into a flat buffer laid out by `layout` (its entries in llama_param_layout's order,
// as Llama::weights_in reads them, at their own offsets). Without RMSNorm (norm "none") the
// layout has no norm weights: their pointers stay null. With tied embeddings the layout has no
// lm_head: it points at the token embedding, so in the gradient buffer the LM head's weight
// gradient and the lookup gradient add into the same rows.
Weights weights_in(float* base, const std::vector<ParamEntry>& layout, const ModelConfig& config) {
  const bool norms = config.has_norm();
  std::size_t k = 0;
  auto next = [&]() { return base + layout[k++].offset; };
  Weights w;
  w.tok_embedding = next();
  for (int i = 0; i < config.n_layer; ++i) {
    LayerParams l{};
    l.attn_norm = norms ? next() : nullptr;
    l.wqkv = next();
    k += 2;  // wk, wv follow wq: one [d + 2 kv_dim, d] matrix
    l.wo = next();
    l.mlp_norm = norms ? next() : nullptr;
    l.w_gate_up = next();
    k += 1;  // w_up follows w_gate: one [2f, d] matrix
    l.w_down = next();
    w.layers.push_back(l);
  }
  w.final_norm = norms ? next() : nullptr;
  w.lm_head = config.tie_embeddings ? w.tok_embedding : next();
  return w;
}

// Activations of one layer kept for backward (as Llama<T>::LayerActs).
struct LayerActs {
  float *x_in, *h1, *rstd1, *qkv, *attn_keep, *att, *x_mid, *h2, *rstd2, *gu, *act;
  // attn_keep: probs [B, H, T, T] (materialised) or the logsumexp [B, H, T] (flash).
  // Bf16 matmuls: the bf16 copies (uint16_t storage) of the four GEMM inputs, written once in
  // the forward by their producers (RMSNorm, SwiGLU, flash attention) or one conversion (the
  // materialised attention's output; without norms x_in, x_mid), read by the forward GEMM and
  // again by its weight gradient; and gu16, the gate-up GEMM's output written in bf16 for
  // SwiGLU's forward and backward. Where only those read a tensor, its fp32 version is not
  // kept (h1 and h2 with norms, act, gu, and att with flash attention, whose tensor-core
  // backward reads att16): those pointers are null. With flash attention also qkv16, the QKV
  // GEMM's output written in bf16 and rotated in place (rope_forward_bf16), which the
  // tensor-core attention reads forward and backward: the fp32 qkv is then not kept. At the
  // other precisions the bf16 pointers are null.
  std::uint16_t *h1_16, *att16, *h2_16, *act16, *gu16, *qkv16;
};

}  // namespace

struct CudaLlama::Impl {
  DeviceBuffer params, grads;
  layers::DeviceRopeTable rope;
  Weights w, g;

  // Per-(batch, seq) buffers, allocated on the first call with that shape.
  int batch = 0, seq = 0;
  DeviceBuffer acts, grad_acts;
  DeviceInt32Buffer tokens, targets;
  std::unique_ptr<layers::Bf16Workspace> bf16;
  std::unique_ptr<layers::CrossEntropyResult> loss;
  std::vector<LayerActs> layer_acts;
  float *x_final = nullptr, *h_final = nullptr, *rstd_final = nullptr, *logits = nullptr,
        *lse = nullptr, *proj = nullptr;
  // Gradient scratch, one layer at a time. dlogits (fp32) exists only without Bf16 matmuls;
  // with them the cross-entropy writes bf16 dlogits into the start of the Bf16Workspace, the
  // slice the LM head's backward would have converted them into, and the head reads them there.
  float *dres = nullptr, *dh = nullptr, *dqkv = nullptr, *datt = nullptr, *dgu = nullptr,
        *dact = nullptr, *dlogits = nullptr, *attn_scratch = nullptr;
  // Bf16 matmuls: bf16 activations and gradient scratch (the LayerActs copies, then dres16,
  // dgu16, dqkv16: the output gradients the backward GEMMs read, written by RMSNorm's
  // backward, SwiGLU's backward and the fused RoPE backward; and dact16, the down-projection's
  // din written by its GEMM in bf16 for SwiGLU's backward). Null at other precisions.
  // GEMM outputs only a bf16-reading kernel uses, written in bf16 (their fp32 buffers are then
  // not allocated): proj16, the wo and w_down outputs the residual adds read; dh16 (with
  // norms), the QKV, gate-up and LM-head backward din that RMSNorm's backward reads; datt16
  // (flash), the wo backward's din that the tensor-core attention backward reads.
  std::unique_ptr<layers::Bf16Workspace> acts16;
  std::uint16_t *dres16 = nullptr, *dgu16 = nullptr, *dqkv16 = nullptr, *dact16 = nullptr;
  std::uint16_t *proj16 = nullptr, *dh16 = nullptr, *datt16 = nullptr;
  // Bf16: the LM head's input in bf16 (written by the final RMSNorm, or converted once from
  // x_final without norms), read by the head's forward GEMM and its weight gradient; the fp32
  // h_final is then not kept (with norms).
  std::uint16_t* h_final16 = nullptr;
  bool have_loss = false;
  // A forward-only call's activations wait for weighted_backward (RL's objective path).
  bool backward_pending = false;
  // RL's objective path, allocated on its first use (sized to the rows then).
  std::unique_ptr<layers::TargetLogProbs> target_stats;
  DeviceBuffer row_scale;
  std::vector<float> row_scale_host;
  DeviceScalars norm{1};
  // Bf16 matmuls: the bf16 copy of the weights the GEMMs read (params[mirror_from, end): every
  // layer matrix and the LM head; the token embedding only when it is the tied head), the
  // mirror of the workspace. Refreshed by one conversion at the start of forward_backward,
  // every call, or with track_changes only after weights_changed() / upload_params.
  std::unique_ptr<layers::Bf16Workspace> bf16_params;
  std::int64_t mirror_from = 0;
  bool track_changes = false, weights_stale = true;
  float* rms_scratch = nullptr;  // rmsnorm_backward's per-chunk weight-gradient partials
  // --attention cudnn: the fused attention's plans for the current shape and their workspace.
  // Its backward writes dqkv16 directly (no fp32 dqkv).
  std::unique_ptr<layers::CudnnAttention> cudnn;
  DeviceBuffer cudnn_workspace;
  // forward_backward's passes at the current shape, replayed per loss scale; cleared by
  // ensure_buffers with the buffers the graphs point into.
  GraphReplayer passes;

  Impl(std::int64_t num_params, const pion::layers::RopeTable<float>& table, i64 seq_len, i64 half,
       bool graphs)
      : params(static_cast<std::size_t>(num_params)),
        grads(static_cast<std::size_t>(num_params)),
        rope(table.cos, table.sin, seq_len, half),
        passes("the forward/backward pass", graphs) {}
};

CudaLlama::CudaLlama(Context& ctx, const ModelConfig& config, const CudaLlamaOptions& options)
    : ctx_(ctx), config_(config), options_(options), layout_(llama_param_layout_by_shape(config)) {
  check(config.dropout == 0.0,
        "--device cuda does not implement dropout yet: set dropout 0 (or train on the CPU)");
  check(options.attention != CudaAttention::Cudnn || options.matmul == MatmulPrecision::Bf16,
        "--attention cudnn needs --matmul_precision bf16 (cuDNN's fused attention is bf16)");
  num_params_ = 0;
  for (const ParamEntry& e : layout_) num_params_ += e.numel();
  const auto table =
      pion::layers::make_rope_table<float>(config.seq_len, config.head_dim(), config.rope_theta);
  impl_ = std::make_unique<Impl>(num_params_, table, config.seq_len, config.head_dim() / 2,
                                 options.graphs);
  impl_->params.zero();
  impl_->grads.zero();
  impl_->w = weights_in(impl_->params.data(), layout_, config);
  impl_->g = weights_in(impl_->grads.data(), layout_, config);
  if (options.matmul == MatmulPrecision::Bf16) {
    // The embedding lookup reads fp32 rows; only a tied embedding (the LM head) is a GEMM
    // operand. It sits first in the layout, everything after it is mirrored.
    impl_->mirror_from = config.tie_embeddings ? 0 : layout_.at(0).numel();
    impl_->bf16_params = std::make_unique<layers::Bf16Workspace>(num_params_ - impl_->mirror_from);
  }
}

CudaLlama::~CudaLlama() = default;

float* CudaLlama::params() {
  return impl_->params.data();
}
float* CudaLlama::grads() {
  return impl_->grads.data();
}

namespace {
// Copies every parameter between a buffer in llama_param_layout order (the host's) and one in
// `device` order (same entries, other offsets): to_device moves host -> device order.
void reorder(std::span<const float> from, std::span<float> to,
             const std::vector<ParamEntry>& device, const ModelConfig& config, bool to_device) {
  const std::vector<ParamEntry> host = llama_param_layout(config);
  for (std::size_t i = 0; i < host.size(); ++i) {
    const auto src = static_cast<std::size_t>(to_device ? host[i].offset : device[i].offset);
    const auto dst = static_cast<std::size_t>(to_device ? device[i].offset : host[i].offset);
    std::copy_n(from.begin() + static_cast<std::ptrdiff_t>(src), host[i].numel(),
                to.begin() + static_cast<std::ptrdiff_t>(dst));
  }
}
}  // namespace

void CudaLlama::upload_params(std::span<const float> host) {
  check(static_cast<std::int64_t>(host.size()) == num_params_,
        "CudaLlama::upload_params: got " + std::to_string(host.size()) + " values for " +
            std::to_string(num_params_) + " parameters");
  std::vector<float> ordered(host.size());
  reorder(host, ordered, layout_, config_, true);
  impl_->params.upload(ordered.data(), ordered.size());
  impl_->weights_stale = true;
}

void CudaLlama::track_weight_changes(bool on) {
  impl_->track_changes = on;
  impl_->weights_stale = true;
}

void CudaLlama::weights_changed() {
  impl_->weights_stale = true;
}

void CudaLlama::download_params(std::span<float> host) const {
  check(static_cast<std::int64_t>(host.size()) == num_params_,
        "CudaLlama::download_params: room for " + std::to_string(host.size()) + " values, " +
            std::to_string(num_params_) + " needed");
  std::vector<float> ordered(host.size());
  impl_->params.download(ordered.data(), ordered.size());
  reorder(ordered, host, layout_, config_, false);
}

void CudaLlama::download_grads(std::span<float> host) const {
  check(static_cast<std::int64_t>(host.size()) == num_params_,
        "CudaLlama::download_grads: room for " + std::to_string(host.size()) + " values, " +
            std::to_string(num_params_) + " needed");
  std::vector<float> ordered(host.size());
  impl_->grads.download(ordered.data(), ordered.size());
  reorder(ordered, host, layout_, config_, false);
}

namespace {

void ensure_buffers(Context& ctx, CudaLlama::Impl& m, const ModelConfig& c,
                    const CudaLlamaOptions& o, int batch, int seq, std::int64_t num_params) {
  if (batch == m.batch && seq == m.seq) return;
  m.passes.clear();
  const i64 n = static_cast<i64>(batch) * seq, d = c.d_model, f = c.ffn_size();
  const i64 v = c.vocab_size, h = c.n_head, L = c.n_layer;
  const i64 qkv = d + 2 * static_cast<i64>(c.kv_dim());  // [q | k | v] row width
  // flash: a fused attention (ours or cuDNN's) that keeps one statistic per query row.
  const bool cudnn = o.attention == CudaAttention::Cudnn;
  const bool flash = o.attention != CudaAttention::Materialized;
  const i64 keep = flash ? static_cast<i64>(layers::flash_attention_lse_elements(batch, seq, h))
                         : static_cast<i64>(batch) * h * seq * seq;
  const i64 attn_scratch =
      cudnn   ? 0
      : flash ? static_cast<i64>(layers::flash_attention_scratch_elements(batch, seq, h))
              : static_cast<i64>(batch) * h * seq * seq;
  // Bf16 matmuls keep only the bf16 copy of a tensor a GEMM alone reads (see LayerActs).
  const bool bf16 = o.matmul == MatmulPrecision::Bf16;
  const i64 h_fp32 = bf16 && c.has_norm() ? 0 : n * d, act_fp32 = bf16 ? 0 : n * f;
  const i64 gu_fp32 = bf16 ? 0 : 2 * n * f;
  // The bf16 model's tensor-core flash attention writes its output in bf16 only (the wo GEMM
  // and the attention's backward read that); every other attention keeps it in fp32.
  // So does its qkv (the QKV GEMM writes it in bf16 for RoPE and the attention), and with it
  // the attention output's gradient (the wo backward writes it in bf16 for the attention's
  // backward).
  const i64 att_fp32 = flash && bf16 ? 0 : n * d, qkv_fp32 = flash && bf16 ? 0 : n * qkv;
  // bf16: the wo and w_down GEMMs write proj in bf16 for the residual adds.
  const i64 proj_fp32 = bf16 ? 0 : n * d;
  const i64 per_layer = n * d /*x_in*/ + h_fp32 /*h1*/ + n /*rstd1*/ + qkv_fp32 /*qkv*/ + keep +
                        att_fp32 /*att*/ + n * d /*x_mid*/ + h_fp32 /*h2*/ + n /*rstd2*/ +
                        gu_fp32 /*gu*/ + act_fp32 /*act*/;
  const i64 tail = n * d /*x_final*/ + h_fp32 /*h_final*/ + n /*rstd*/ + n * v /*logits*/ +
                   n /*lse*/ + proj_fp32 /*proj*/;
  const i64 rms_scratch =
      c.has_norm() ? static_cast<i64>(layers::rmsnorm_backward_scratch_elements(n, d)) : 0;
  // Release the old shape's buffers before allocating the new ones.
  m.acts = DeviceBuffer();
  m.grad_acts = DeviceBuffer();
  m.acts = DeviceBuffer(static_cast<std::size_t>(L * per_layer + tail));
  float* p = m.acts.data();
  auto take = [&p](i64 count) -> float* {
    float* r = p;
    p += count;
    return count > 0 ? r : nullptr;
  };
  // bf16 slices start on 64-element (128-byte) boundaries, as the GEMMs want.
  const auto pad16 = [](i64 count) { return (count + 63) / 64 * 64; };
  m.acts16.reset();
  std::uint16_t* p16 = nullptr;
  const bool qkv16 = flash && bf16, dh16 = bf16 && c.has_norm();
  if (bf16) {
    m.acts16 = std::make_unique<layers::Bf16Workspace>(static_cast<std::size_t>(
        L * (3 * pad16(n * d) + pad16(n * f) + pad16(2 * n * f) + (qkv16 ? pad16(n * qkv) : 0)) +
        pad16(n * d) + pad16(2 * n * f) + pad16(n * qkv) + pad16(n * f) + pad16(n * d) +
        pad16(n * d) /*proj16*/ + (dh16 ? pad16(n * d) : 0) + (qkv16 ? pad16(n * d) : 0)));
    p16 = static_cast<std::uint16_t*>(m.acts16->data());
  }
  auto take16 = [&](i64 count) -> std::uint16_t* {
    if (!bf16 || count == 0) return nullptr;
    std::uint16_t* r = p16;
    p16 += pad16(count);
    return r;
  };
  m.layer_acts.assign(static_cast<std::size_t>(L), LayerActs{});
  for (auto& a : m.layer_acts) {
    a.x_in = take(n * d);
    a.h1 = take(h_fp32);
    a.rstd1 = take(n);
    a.qkv = take(qkv_fp32);
    a.attn_keep = take(keep);
    a.att = take(att_fp32);
    a.x_mid = take(n * d);
    a.h2 = take(h_fp32);
    a.rstd2 = take(n);
    a.gu = take(gu_fp32);
    a.act = take(act_fp32);
    a.h1_16 = take16(n * d);
    a.att16 = take16(n * d);
    a.h2_16 = take16(n * d);
    a.act16 = take16(n * f);
    a.gu16 = take16(2 * n * f);
    a.qkv16 = take16(qkv16 ? n * qkv : 0);
  }
  m.dres16 = take16(n * d);
  m.dgu16 = take16(2 * n * f);
  m.dqkv16 = take16(n * qkv);
  m.dact16 = take16(n * f);
  m.h_final16 = take16(n * d);
  m.proj16 = take16(n * d);
  m.dh16 = take16(dh16 ? n * d : 0);
  m.datt16 = take16(qkv16 ? n * d : 0);
  m.x_final = take(n * d);
  m.h_final = take(h_fp32);
  m.rstd_final = take(n);
  m.logits = take(n * v);
  m.lse = take(n);
  m.proj = take(proj_fp32);

  // bf16: dgu and dact exist only as dgu16 and dact16, and the dlogits only in bf16 (the
  // cross-entropy writes them into the workspace's LM-head dout slice).
  const i64 dgu_fp32 = bf16 ? 0 : 2 * n * f, dact_fp32 = bf16 ? 0 : n * f;
  const i64 dlogits = bf16 ? 0 : n * v;
  // bf16: dh (with norms) and datt (flash) exist only as dh16 and datt16.
  const i64 dh_fp32 = dh16 ? 0 : n * d, datt_fp32 = qkv16 ? 0 : n * d;
  // cuDNN's attention backward writes dqkv in bf16 (dqkv16) only.
  const i64 dqkv_fp32 = cudnn ? 0 : n * qkv;
  m.grad_acts = DeviceBuffer(static_cast<std::size_t>(
      n * d /*dres*/ + dh_fp32 /*dh*/ + dqkv_fp32 /*dqkv*/ + datt_fp32 /*datt*/ + dgu_fp32 /*dgu*/ +
      dact_fp32 /*dact*/ + dlogits + attn_scratch + rms_scratch));
  p = m.grad_acts.data();
  m.dres = take(n * d);
  m.dh = take(dh_fp32);
  m.dqkv = take(dqkv_fp32);
  m.datt = take(datt_fp32);
  m.dgu = take(dgu_fp32);
  m.dact = take(dact_fp32);
  m.dlogits = take(dlogits);
  m.attn_scratch = take(attn_scratch);
  m.rms_scratch = rms_scratch > 0 ? take(rms_scratch) : nullptr;

  m.tokens = DeviceInt32Buffer(static_cast<std::size_t>(n));
  m.targets = DeviceInt32Buffer(static_cast<std::size_t>(n));
  m.loss = std::make_unique<layers::CrossEntropyResult>(n);
  m.target_stats.reset();
  m.row_scale = DeviceBuffer();
  m.bf16.reset();
  if (o.matmul == MatmulPrecision::Bf16) {
    // Every GEMM weight is in the mirror: the workspace holds activation copies only, and
    // the bf16 dlogits in the LM head's dout slice ({d, v}).
    std::size_t need = 0;
    for (auto [din, dout] : {std::pair<i64, i64>{d, qkv}, {d, d}, {d, 2 * f}, {f, d}, {d, v}})
      need = std::max(need, layers::linear_bf16_workspace_elements(n, din, dout, true));
    need = std::max(need, layers::linear_bf16_dout_elements(n, v));
    m.bf16 = std::make_unique<layers::Bf16Workspace>(need);
    m.bf16->set_weight_mirror(m.params.data() + m.mirror_from, m.bf16_params->data(),
                              static_cast<std::size_t>(num_params - m.mirror_from));
  }
  m.cudnn.reset();
  m.cudnn_workspace = DeviceBuffer();
  if (cudnn) {
    m.cudnn =
        std::make_unique<layers::CudnnAttention>(ctx, batch, seq, h, c.head_dim(), c.kv_heads());
    m.cudnn_workspace = DeviceBuffer((m.cudnn->workspace_bytes() + 3) / 4);
  }
  m.batch = batch;
  m.seq = seq;
}

}  // namespace

namespace {

// The sizes and options one pass over the model uses (m.batch x m.seq rows, the shape
// ensure_buffers last set up).
struct Pass {
  Context& ctx;
  CudaLlama::Impl& m;
  i64 n, d, f, h, hd, kvh, qkv, v;
  double eps;
  MatmulPrecision mp, attn_mp;
  layers::Bf16Workspace* ws;
  bool flash, cudnn, norms, bf16;

  Pass(Context& context, CudaLlama::Impl& impl, const ModelConfig& config,
       const CudaLlamaOptions& options)
      : ctx(context),
        m(impl),
        n(static_cast<i64>(impl.batch) * impl.seq),
        d(config.d_model),
        f(config.ffn_size()),
        h(config.n_head),
        hd(config.head_dim()),
        kvh(config.kv_heads()),
        qkv(config.d_model + 2 * static_cast<i64>(config.kv_dim())),  // [q | k | v] row width
        v(config.vocab_size),
        eps(config.norm_eps),
        mp(options.matmul),
        // The materialised attention multiplies on fp32 or TF32 (its GEMMs take fp32 operands).
        attn_mp(options.matmul == MatmulPrecision::Fp32 ? MatmulPrecision::Fp32
                                                        : MatmulPrecision::Tf32),
        ws(impl.bf16.get()),
        flash(options.attention != CudaAttention::Materialized),  // ours or cuDNN's
        cudnn(options.attention == CudaAttention::Cudnn),
        norms(config.has_norm()),
        bf16(options.matmul == MatmulPrecision::Bf16) {}

  // norm "none": each RMSNorm is the identity, so its input feeds the next GEMM directly
  // (h1 = x_in, h2 = x_mid, h_final = x_final) and its backward passes dh through
  // (dres += dh), as src/model/llama.cpp does.
  const float* normed(float* hn, const float* x) const { return norms ? hn : x; }
  // A norm's backward into dres, from dh, or from dh16 where the GEMMs before it write that
  // (bf16 with norms). dres16 (bf16 with norms): RMSNorm's backward also writes the updated dres in
  // bf16, the output gradient the next backward GEMM reads.
  void norm_backward(float* dweight, const float* x, const float* weight, const float* rstd,
                     layers::GradWrite dres_write, std::uint16_t* dres16 = nullptr) {
    if (norms)
      layers::rmsnorm_backward(ctx, m.dres, dweight, m.rms_scratch, m.dh, x, weight, rstd, n, d,
                               dres_write, dres16, m.dh16);
    else
      layers::accumulate(ctx, m.dres, m.dh, n * d);
  }
  // The first writer of a gradient scratch buffer assigns it (no zeroing pass before it, and
  // its GEMM runs with beta = 0); later contributions add.
  static constexpr auto kAssign = layers::GradWrite::Assign;
  static constexpr auto kAdd = layers::GradWrite::Add;
  // Where the cross-entropy writes the dlogits the LM head's backward reads: with Bf16 matmuls
  // bf16 values at the start of the workspace (the head's dout slice, read there by its GEMMs
  // with no conversion pass; the fp32 dlogits buffer is not even allocated), else m.dlogits.
  bool bf16_dlogits() const { return bf16; }
  void* dlogits16() const { return ws->data(); }

  // Embedding to logits, keeping what backward needs.
  void forward() {
    const int batch = m.batch, seq = m.seq;
    layers::embedding_forward(ctx, m.layer_acts[0].x_in, m.tokens.data(), m.w.tok_embedding, n, d);
    for (std::size_t l = 0; l < m.layer_acts.size(); ++l) {
      LayerActs& a = m.layer_acts[l];
      const LayerParams& w = m.w.layers[l];
      float* x_out = l + 1 < m.layer_acts.size() ? m.layer_acts[l + 1].x_in : m.x_final;
      // Bf16: RMSNorm writes the bf16 input of the QKV GEMM (kept for its weight gradient);
      // without norms x_in is converted once for both.
      if (norms)
        layers::rmsnorm_forward(ctx, a.h1, a.rstd1, a.x_in, w.attn_norm, n, d, eps, a.h1_16);
      else if (bf16)
        layers::convert_to_bf16(ctx, a.h1_16, a.x_in, n * d);
      // Bf16 flash: the QKV GEMM writes qkv in bf16 only (a.qkv is null), for RoPE and the
      // tensor-core attention.
      layers::linear_forward(ctx, a.qkv, normed(a.h1, a.x_in), w.wqkv, n, d, qkv, mp, ws, a.h1_16,
                             a.qkv16);
      // RoPE rotates the h query heads and the kvh key heads that follow them (never the
      // values): one head range from the row's start.
      if (a.qkv16 != nullptr)
        layers::rope_forward_bf16(ctx, a.qkv16, m.rope, batch, seq, h + kvh, hd, qkv);
      else
        layers::rope_forward(ctx, a.qkv, m.rope, batch, seq, h + kvh, hd, qkv);
      // With bf16 GEMMs the flash attention runs on bf16 tensor cores too (its fp32 kernels
      // are the references the tests hold it to, and the tf32 / fp32 models' attention), and
      // writes its output in bf16 only (a.att is null): the wo GEMM, its weight gradient and
      // the attention's backward read att16. The fp32 flash kernel writes both (its backward
      // reads the fp32 output); the materialised attention's fp32 GEMM output (TF32 operands:
      // it cannot write bf16) is converted once here.
      if (cudnn) {
        m.cudnn->forward(a.att16, a.attn_keep, a.qkv16, m.cudnn_workspace.data());
      } else if (flash && bf16) {
        layers::flash_attention_forward_tc(ctx, a.att, a.attn_keep, nullptr, batch, seq, h, hd, kvh,
                                           a.att16, a.qkv16);
      } else if (flash) {
        layers::flash_attention_forward(ctx, a.att, a.attn_keep, a.qkv, batch, seq, h, hd, kvh,
                                        a.att16);
      } else {
        layers::attention_forward(ctx, a.att, a.attn_keep, a.qkv, batch, seq, h, hd, kvh, attn_mp);
        if (bf16) layers::convert_to_bf16(ctx, a.att16, a.att, n * d);
      }
      // Bf16: the wo and w_down GEMMs write proj in bf16 only (m.proj is null), which the
      // residual adds read; the residual stream stays fp32.
      layers::linear_forward(ctx, m.proj, a.att, w.wo, n, d, d, mp, ws, a.att16, m.proj16);
      layers::residual_forward(ctx, a.x_mid, a.x_in, m.proj, n * d, m.proj16);
      if (norms)
        layers::rmsnorm_forward(ctx, a.h2, a.rstd2, a.x_mid, w.mlp_norm, n, d, eps, a.h2_16);
      else if (bf16)
        layers::convert_to_bf16(ctx, a.h2_16, a.x_mid, n * d);
      // Bf16: the gate-up GEMM writes gu in bf16, which SwiGLU reads (forward and backward).
      layers::linear_forward(ctx, a.gu, normed(a.h2, a.x_mid), w.w_gate_up, n, d, 2 * f, mp, ws,
                             a.h2_16, a.gu16);
      layers::swiglu_forward(ctx, a.act, a.gu, n, f, a.act16, a.gu16);
      layers::linear_forward(ctx, m.proj, a.act, w.w_down, n, f, d, mp, ws, a.act16, m.proj16);
      layers::residual_forward(ctx, x_out, a.x_mid, m.proj, n * d, m.proj16);
    }
    if (norms)
      layers::rmsnorm_forward(ctx, m.h_final, m.rstd_final, m.x_final, m.w.final_norm, n, d, eps,
                              m.h_final16);
    else if (bf16)
      layers::convert_to_bf16(ctx, m.h_final16, m.x_final, n * d);
    layers::linear_forward(ctx, m.logits, normed(m.h_final, m.x_final), m.w.lm_head, n, d, v, mp,
                           ws, m.h_final16);
  }

  // From the dlogits (assigned by the caller's cross-entropy, where bf16_dlogits() says) to
  // every parameter's gradient, added into m.g. Last layer first (src/model/llama.cpp's order).
  // The LM head's backward assigns its din and the final norm's backward assigns dres: no
  // zeroing pass. Without norms the head's din is dres itself (the final norm is the identity).
  // With tied embeddings g.lm_head is g.tok_embedding: the head's weight gradient lands there
  // first and embedding_backward adds the lookup gradient at the end, both queued on the one
  // stream (a fixed order).
  void backward() {
    const int batch = m.batch, seq = m.seq;
    float* head_din = norms ? m.dh : m.dres;
    const float* head_in = normed(m.h_final, m.x_final);
    // Bf16 with norms: every GEMM whose din RMSNorm's backward reads writes it in bf16 only
    // (dh16; m.dh is null). Otherwise dh16 is null and the GEMMs write the fp32 dh.
    std::uint16_t* const dh16 = m.dh16;
    if (bf16_dlogits())
      layers::linear_backward_bf16(ctx, head_din, m.g.lm_head, dlogits16(), head_in, m.w.lm_head, n,
                                   d, v, *ws, kAssign, m.h_final16, dh16);
    else
      layers::linear_backward(ctx, head_din, m.g.lm_head, m.dlogits, head_in, m.w.lm_head, n, d, v,
                              mp, ws, kAssign);
    // Bf16 with norms: each RMSNorm backward (the final one's included) leaves dres's bf16
    // copy in dres16 for the next backward GEMM.
    std::uint16_t* const dres16 = bf16 && norms ? m.dres16 : nullptr;
    if (norms)
      norm_backward(m.g.final_norm, m.x_final, m.w.final_norm, m.rstd_final, kAssign, dres16);
    // Bf16: the MLP's and the QKV GEMM's output gradients exist only in bf16 (their producers,
    // swiglu_backward and the fused RoPE backward, write nothing else).
    float* const dgu = bf16 ? nullptr : m.dgu;
    float* const dact = bf16 ? nullptr : m.dact;
    for (std::size_t li = m.layer_acts.size(); li-- > 0;) {
      const LayerActs& a = m.layer_acts[li];
      const LayerParams& w = m.w.layers[li];
      const LayerParams& g = m.g.layers[li];
      // MLP block: dres holds dL/d(x_out). Bf16: the down-projection's din (dact) is written
      // in bf16 and SwiGLU's backward reads it.
      layers::linear_backward(ctx, dact, g.w_down, m.dres, a.act, w.w_down, n, f, d, mp, ws,
                              kAssign, dres16, a.act16, m.dact16);
      layers::swiglu_backward(ctx, dgu, dact, a.gu, n, f, kAssign, m.dgu16, a.gu16, m.dact16);
      layers::linear_backward(ctx, m.dh, g.w_gate_up, dgu, normed(a.h2, a.x_mid), w.w_gate_up, n, d,
                              2 * f, mp, ws, kAssign, m.dgu16, a.h2_16, dh16);
      norm_backward(g.mlp_norm, a.x_mid, w.mlp_norm, a.rstd2, kAdd, dres16);
      // Attention block: dres now holds dL/d(x_mid).
      // Bf16 flash: the wo backward writes datt in bf16 only (m.datt is null), which the
      // tensor-core attention backward reads with the bf16 qkv.
      layers::linear_backward(ctx, m.datt, g.wo, m.dres, a.att, w.wo, n, d, d, mp, ws, kAssign,
                              dres16, a.att16, m.datt16);
      if (cudnn)
        m.cudnn->backward(m.dqkv16, m.datt16, a.att16, a.attn_keep, a.qkv16,
                          m.cudnn_workspace.data());
      else if (flash && bf16)
        layers::flash_attention_backward_tc(ctx, m.dqkv, m.attn_scratch, nullptr, nullptr,
                                            a.attn_keep, nullptr, batch, seq, h, hd, kvh, kAssign,
                                            a.att16, m.datt16, a.qkv16);
      else if (flash)
        layers::flash_attention_backward(ctx, m.dqkv, m.attn_scratch, m.datt, a.att, a.attn_keep,
                                         a.qkv, batch, seq, h, hd, kvh, kAssign);
      else
        layers::attention_backward(ctx, m.dqkv, m.attn_scratch, m.datt, a.attn_keep, a.qkv, batch,
                                   seq, h, hd, kvh, attn_mp, kAssign);
      if (cudnn) {
        // cuDNN wrote dq, dk, dv in bf16: RoPE's backward in place on the query and key heads.
        layers::rope_backward_bf16(ctx, m.dqkv16, m.rope, batch, seq, h + kvh, hd, qkv);
      } else if (bf16) {
        // One pass: RoPE's backward of the query and key heads, the values copied, into the
        // bf16 operand of the QKV GEMM's backward (dqkv's only reader).
        layers::rope_backward_qkv_bf16(ctx, m.dqkv16, m.dqkv, m.rope, batch, seq, h, kvh, hd, qkv);
      } else {
        layers::rope_backward(ctx, m.dqkv, m.rope, batch, seq, h + kvh, hd, qkv);
      }
      layers::linear_backward(ctx, m.dh, g.wqkv, bf16 ? nullptr : m.dqkv, normed(a.h1, a.x_in),
                              w.wqkv, n, d, qkv, mp, ws, kAssign, m.dqkv16, a.h1_16, dh16);
      norm_backward(g.attn_norm, a.x_in, w.attn_norm, a.rstd1, kAdd, dres16);
    }
    layers::embedding_backward(ctx, m.g.tok_embedding, m.dres, m.tokens.data(), n, d);
  }
};

}  // namespace

void CudaLlama::forward_backward(std::span<const std::int32_t> tokens,
                                 std::span<const std::int32_t> targets, int batch, int seq,
                                 double loss_scale) {
  check(batch > 0 && seq > 0, "CudaLlama::forward_backward: batch and seq must be positive");
  check(seq <= config_.seq_len, "CudaLlama::forward_backward: sequence length " +
                                    std::to_string(seq) + " exceeds the model's seq_len " +
                                    std::to_string(config_.seq_len));
  const i64 n = static_cast<i64>(batch) * seq;
  check(static_cast<i64>(tokens.size()) == n && static_cast<i64>(targets.size()) == n,
        "CudaLlama::forward_backward: got " + std::to_string(tokens.size()) + " tokens and " +
            std::to_string(targets.size()) + " targets for batch " + std::to_string(batch) +
            " x seq " + std::to_string(seq));
  const i64 v = config_.vocab_size;
  // The kernels cannot throw: check the ids here, with the CPU model's messages.
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    check(tokens[i] >= 0 && tokens[i] < v, "CudaLlama: token " + std::to_string(tokens[i]) +
                                               " at position " + std::to_string(i) +
                                               " is outside [0, " + std::to_string(v) + ")");
    check(targets[i] < v, "CudaLlama: target " + std::to_string(targets[i]) + " at position " +
                              std::to_string(i) + " is >= vocab_size " + std::to_string(v));
  }
  Impl& m = *impl_;
  ensure_buffers(ctx_, m, config_, options_, batch, seq, num_params_);
  m.tokens.upload_async(ctx_, tokens.data(), tokens.size());
  m.targets.upload_async(ctx_, targets.data(), targets.size());
  if (m.bf16_params && (m.weights_stale || !m.track_changes)) {
    layers::convert_to_bf16(ctx_, m.bf16_params->data(), m.params.data() + m.mirror_from,
                            num_params_ - m.mirror_from);
    m.weights_stale = false;
  }

  m.have_loss = true;
  m.backward_pending = loss_scale == 0.0;
  const auto queue = [&] {
    Pass pass(ctx_, m, config_, options_);
    pass.forward();
    if (loss_scale == 0.0) {
      layers::cross_entropy(ctx_, *m.loss, m.lse, nullptr, m.logits, m.targets.data(), n, v, 1.0);
      return;
    }
    if (pass.bf16_dlogits())
      layers::cross_entropy_bf16(ctx_, *m.loss, m.lse, pass.dlogits16(), m.logits, m.targets.data(),
                                 n, v, loss_scale);
    else
      layers::cross_entropy(ctx_, *m.loss, m.lse, m.dlogits, m.logits, m.targets.data(), n, v,
                            loss_scale, layers::GradWrite::Assign);
    pass.backward();
  };
  m.passes.run(ctx_, loss_scale, queue);
}

CudaLlama::GraphCounts CudaLlama::graph_counts() const {
  return impl_->passes.counts();
}

void CudaLlama::target_log_probs(std::span<double> log_probs, std::span<double> entropies) {
  Impl& m = *impl_;
  check(m.have_loss, "CudaLlama::target_log_probs: call forward_backward first");
  const i64 n = static_cast<i64>(m.batch) * m.seq;
  check(static_cast<i64>(log_probs.size()) == n &&
            (entropies.empty() || static_cast<i64>(entropies.size()) == n),
        "CudaLlama::target_log_probs: expected " + std::to_string(n) + " outputs");
  if (!m.target_stats) m.target_stats = std::make_unique<layers::TargetLogProbs>(n);
  layers::target_log_probs(ctx_, *m.target_stats, m.logits, m.lse, m.targets.data(), n,
                           config_.vocab_size);
  m.target_stats->read(ctx_, log_probs.data(), entropies.empty() ? nullptr : entropies.data(), n);
}

void CudaLlama::weighted_backward(std::span<const double> weights, double loss_scale) {
  Impl& m = *impl_;
  check(m.backward_pending,
        "CudaLlama::weighted_backward: call forward_backward with loss_scale 0 first (once per "
        "backward)");
  const i64 n = static_cast<i64>(m.batch) * m.seq, v = config_.vocab_size;
  check(static_cast<i64>(weights.size()) == n, "CudaLlama::weighted_backward: got " +
                                                   std::to_string(weights.size()) +
                                                   " weights for " + std::to_string(n) + " tokens");
  // The CPU's per-row factor, static_cast<float>(dloss * weight) (layers.cpp), so both devices
  // scale each row's softmax - onehot by the same float.
  m.row_scale_host.resize(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < weights.size(); ++i)
    m.row_scale_host[i] = static_cast<float>(loss_scale * weights[i]);
  if (m.row_scale.size() != static_cast<std::size_t>(n))
    m.row_scale = DeviceBuffer(static_cast<std::size_t>(n));
  m.row_scale.upload(m.row_scale_host.data(), m.row_scale_host.size());
  m.backward_pending = false;
  Pass pass(ctx_, m, config_, options_);
  if (pass.bf16_dlogits())
    layers::weighted_cross_entropy_backward_bf16(ctx_, pass.dlogits16(), m.logits, m.lse,
                                                 m.targets.data(), m.row_scale.data(), n, v);
  else
    layers::weighted_cross_entropy_backward(ctx_, m.dlogits, m.logits, m.lse, m.targets.data(),
                                            m.row_scale.data(), n, v);
  pass.backward();
}

CudaLlama::Loss CudaLlama::read_loss() {
  check(impl_->have_loss, "CudaLlama::read_loss: call forward_backward first");
  const auto host = impl_->loss->read(ctx_);
  check(host.bad_targets == 0, "CudaLlama: " + std::to_string(host.bad_targets) +
                                   " targets were >= vocab_size (checked on upload; a bug)");
  return {host.loss, host.count};
}

void CudaLlama::zero_grad() {
  fill_zero(ctx_, impl_->grads.data(), num_params_);
}

double CudaLlama::grad_norm() {
  sum_squares(ctx_, impl_->norm, 0, impl_->grads.data(), num_params_);
  return std::sqrt(impl_->norm.read(ctx_)[0]);
}

void CudaLlama::scale_grads(float factor) {
  scale_inplace(ctx_, impl_->grads.data(), num_params_, factor);
}

std::size_t CudaLlama::device_bytes() const {
  const Impl& m = *impl_;
  std::size_t bytes =
      (m.params.size() + m.grads.size() + m.acts.size() + m.grad_acts.size()) * sizeof(float);
  if (m.bf16) bytes += m.bf16->size() * 2;
  if (m.bf16_params) bytes += m.bf16_params->size() * 2;
  if (m.acts16) bytes += m.acts16->size() * 2;
  return bytes;
}

}  // namespace pion::cuda
