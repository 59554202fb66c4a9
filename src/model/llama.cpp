#include "pion/model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>

#include "pion/core/error.h"
#include "pion/model/init.h"

namespace pion {

using layers::i64;

std::vector<ParamEntry> llama_param_layout(const ModelConfig& config) {
  config.validate();
  const i64 v = config.vocab_size, d = config.d_model, f = config.ffn_size();
  const i64 kv = config.kv_dim();
  std::vector<ParamEntry> out;
  i64 offset = 0;
  auto add = [&](const std::string& name, const Shape& shape) {
    out.push_back({name, shape, offset});
    offset += shape_numel(shape);
  };
  add("tok_embedding.weight", {v, d});
  for (int i = 0; i < config.n_layer; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    if (config.has_norm()) add(p + "attn_norm.weight", {d});
    // wq, wk, wv must stay adjacent in this order: forward uses them as one [d + 2 kv, d]
    // matrix (kv = n_kv_head * head_dim; kv = d without grouped-query attention).
    add(p + "attn.wq", {d, d});
    add(p + "attn.wk", {kv, d});
    add(p + "attn.wv", {kv, d});
    add(p + "attn.wo", {d, d});
    if (config.has_norm()) add(p + "mlp_norm.weight", {d});
    // w_gate, w_up adjacent: one [2f, d] matrix.
    add(p + "mlp.w_gate", {f, d});
    add(p + "mlp.w_up", {f, d});
    add(p + "mlp.w_down", {d, f});
  }
  if (config.has_norm()) add("final_norm.weight", {d});
  // Tied embeddings: the LM head is tok_embedding.weight, so there is no lm_head parameter.
  if (!config.tie_embeddings) add("lm_head.weight", {v, d});
  return out;
}

std::vector<ParamEntry> llama_param_layout_by_shape(const ModelConfig& config) {
  std::vector<ParamEntry> out = llama_param_layout(config);
  std::map<std::string, std::size_t> index;
  for (std::size_t i = 0; i < out.size(); ++i) index[out[i].name] = i;
  i64 offset = 0;
  auto place = [&](const std::string& name) {
    ParamEntry& e = out[index.at(name)];
    e.offset = offset;
    offset += e.numel();
  };
  place("tok_embedding.weight");
  const auto each_layer = [&](std::initializer_list<const char*> names) {
    for (int i = 0; i < config.n_layer; ++i)
      for (const char* n : names) place("layers." + std::to_string(i) + "." + n);
  };
  each_layer({"attn.wq", "attn.wk", "attn.wv", "attn.wo"});
  each_layer({"mlp.w_gate", "mlp.w_up"});
  each_layer({"mlp.w_down"});
  if (config.has_norm()) {
    each_layer({"attn_norm.weight", "mlp_norm.weight"});
    place("final_norm.weight");
  }
  if (!config.tie_embeddings) place("lm_head.weight");
  return out;
}

namespace {
template <class T>
std::int64_t first_non_finite(const Tensor& t) {
  const T* p = t.data<T>();
  for (std::int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(p[i])) return i;
  return -1;
}
}  // namespace

void check_model_weights(const TensorFile& in, const std::string& prefix, const ModelConfig& config,
                         const std::string& source) {
  const std::vector<ParamEntry> layout = llama_param_layout(config);
  std::size_t expected = 0;
  for (const auto& e : layout) {
    const std::string name = prefix + e.name;
    auto it = in.tensors.find(name);
    check(it != in.tensors.end(),
          source + ": missing tensor \"" + name + "\" (is this a checkpoint of the same model?)");
    const Tensor& t = it->second;
    check(t.shape() == e.shape, source + ": \"" + name + "\" has shape " + shape_string(t.shape()) +
                                    ", the model expects " + shape_string(e.shape));
    check(t.dtype() == DType::F32 || t.dtype() == DType::F64,
          source + ": \"" + name + "\" must be F32 or F64, not " + dtype_name(t.dtype()));
    const std::int64_t bad =
        t.dtype() == DType::F32 ? first_non_finite<float>(t) : first_non_finite<double>(t);
    check(bad < 0, source + ": \"" + name + "\" holds a non-finite value (element " +
                       std::to_string(bad) + "); the weights are damaged or the run diverged");
    ++expected;
  }
  std::size_t under_prefix = 0;
  for (const auto& [name, t] : in.tensors)
    if (name.rfind(prefix, 0) == 0) ++under_prefix;
  check(under_prefix == expected, source + ": holds " + std::to_string(under_prefix) +
                                      " tensors named \"" + prefix + "*\", the model has " +
                                      std::to_string(expected) +
                                      " (a checkpoint of another model shape?)");
}

template <class T>
Llama<T>::Llama(const ModelConfig& config)
    : config_(config),
      layout_(llama_param_layout(config)),
      rope_(layers::make_rope_table<T>(config.seq_len, config.head_dim(), config.rope_theta)) {
  const i64 total = layout_.back().offset + layout_.back().numel();
  params_ = Tensor::zeros({total}, dtype_of<T>());
  grads_ = Tensor::zeros({total}, dtype_of<T>());
  w_ = weights_in(params_);
  g_ = weights_in(grads_);
}

template <class T>
typename Llama<T>::Weights Llama<T>::weights_in(Tensor& buffer) {
  T* base = buffer.data<T>();
  std::size_t k = 0;
  auto next = [&]() { return base + layout_[k++].offset; };
  // norm "none" has no norm weights: their pointers stay null and are never read.
  const bool norms = config_.has_norm();
  auto next_norm = [&]() { return norms ? next() : nullptr; };
  Weights w;
  w.tok_embedding = next();
  for (int i = 0; i < config_.n_layer; ++i) {
    LayerParams l;
    l.attn_norm = next_norm();
    l.wqkv = next();
    k += 2;  // wk, wv follow wq
    l.wo = next();
    l.mlp_norm = next_norm();
    l.w_gate_up = next();
    k += 1;  // w_up follows w_gate
    l.w_down = next();
    w.layers.push_back(l);
  }
  w.final_norm = next_norm();
  // Tied: the head reads (and its gradient adds into) the embedding's own view.
  w.lm_head = config_.tie_embeddings ? w.tok_embedding : next();
  return w;
}

template <class T>
void Llama<T>::init_weights(Rng& rng) {
  init_parameters(named_params(), config_, rng);
}

template <class T>
void Llama<T>::ensure_buffers(int batch, int seq) {
  if (batch == batch_ && seq == seq_) return;
  const i64 n = static_cast<i64>(batch) * seq, d = config_.d_model, f = config_.ffn_size();
  const i64 v = config_.vocab_size, h = config_.n_head, L = config_.n_layer;
  const i64 qkv = d + 2 * static_cast<i64>(config_.kv_dim());  // fused q | k | v row
  const i64 probs = static_cast<i64>(batch) * h * seq * seq;
  const i64 per_layer = n * d /*x_in*/ + n * d /*h1*/ + n /*rstd1*/ + n * qkv /*qkv*/ + probs +
                        n * d /*att*/ + n * d /*x_mid*/ + n * d /*h2*/ + n /*rstd2*/ +
                        2 * n * f /*gu*/ + n * f /*act*/;
  const i64 tail = n * d /*x_final*/ + n * d /*h_final*/ + n /*rstd*/ + n * v /*logits*/ +
                   n /*lse*/ + n * d /*proj*/;
  acts_.assign(static_cast<std::size_t>(L * per_layer + tail), T(0));
  masks_.assign(config_.dropout > 0.0 ? static_cast<std::size_t>(2 * L * n * d) : 0, 0);

  T* p = acts_.data();
  auto take = [&p](i64 count) {
    T* r = p;
    p += count;
    return r;
  };
  layer_acts_.assign(static_cast<std::size_t>(L), LayerActs{});
  for (i64 l = 0; l < L; ++l) {
    LayerActs& a = layer_acts_[static_cast<std::size_t>(l)];
    a.x_in = take(n * d);
    a.h1 = take(n * d);
    a.rstd1 = take(n);
    a.qkv = take(n * qkv);
    a.probs = take(probs);
    a.att = take(n * d);
    a.x_mid = take(n * d);
    a.h2 = take(n * d);
    a.rstd2 = take(n);
    a.gu = take(2 * n * f);
    a.act = take(n * f);
    if (!masks_.empty()) {
      a.keep_attn = masks_.data() + 2 * l * n * d;
      a.keep_mlp = a.keep_attn + n * d;
    } else {
      a.keep_attn = a.keep_mlp = nullptr;
    }
  }
  x_final_ = take(n * d);
  h_final_ = take(n * d);
  rstd_final_ = take(n);
  logits_ = take(n * v);
  lse_ = take(n);
  scratch_proj_ = take(n * d);

  // Gradient scratch for one layer at a time: dres, dh, dproj [N, d], dqkv [N, d + 2 kv],
  // datt [N, d], dgu [N, 2f], dact [N, f], dlogits [N, V], attention scratch [B, H, T, T].
  grad_acts_.assign(
      static_cast<std::size_t>(3 * n * d + n * qkv + n * d + 2 * n * f + n * f + n * v + probs),
      T(0));
  batch_ = batch;
  seq_ = seq;
}

namespace {
template <class T>
void add_into(T* y, const T* x, const T* delta, i64 n) {
  // Serial: memory-bound and small next to the GEMMs around it.
  for (i64 i = 0; i < n; ++i) y[i] = x[i] + delta[i];
}
template <class T>
void zero(T* p, i64 n) {
  std::memset(p, 0, static_cast<std::size_t>(n) * sizeof(T));
}
// out = RMSNorm(x) with norms, else out = x (norm "none"). The copy keeps one activation
// layout for both models; it is one pass over [N, d] beside GEMMs over the same rows.
template <class T>
void norm_forward(bool norms, T* out, T* rstd, const T* x, const T* weight, i64 n, i64 d,
                  double eps) {
  if (norms) {
    layers::rmsnorm_forward(out, rstd, x, weight, n, d, eps);
  } else {
    std::memcpy(out, x, static_cast<std::size_t>(n * d) * sizeof(T));
  }
}
// dx += dL/dx of the norm given dout (the identity without norms).
template <class T>
void norm_backward(bool norms, T* dx, T* dweight, const T* dout, const T* x, const T* weight,
                   const T* rstd, i64 n, i64 d) {
  if (norms) {
    layers::rmsnorm_backward(dx, dweight, dout, x, weight, rstd, n, d);
  } else {
    for (i64 i = 0; i < n * d; ++i) dx[i] += dout[i];
  }
}
}  // namespace

template <class T>
double Llama<T>::forward(std::span<const std::int32_t> tokens,
                         std::span<const std::int32_t> targets, int batch, int seq,
                         std::span<const double> target_weights) {
  check(batch > 0 && seq > 0, "Llama::forward: batch and seq must be positive (got " +
                                  std::to_string(batch) + ", " + std::to_string(seq) + ")");
  check(seq <= config_.seq_len, "Llama::forward: sequence length " + std::to_string(seq) +
                                    " exceeds the model's seq_len " +
                                    std::to_string(config_.seq_len));
  const i64 n = static_cast<i64>(batch) * seq;
  check(static_cast<i64>(tokens.size()) == n,
        "Llama::forward: got " + std::to_string(tokens.size()) + " tokens for batch " +
            std::to_string(batch) + " x seq " + std::to_string(seq));
  check(targets.empty() || static_cast<i64>(targets.size()) == n,
        "Llama::forward: got " + std::to_string(targets.size()) + " targets for " +
            std::to_string(n) + " tokens (pass none to compute logits only)");
  check(target_weights.empty() || static_cast<i64>(target_weights.size()) == n,
        "Llama::forward: got " + std::to_string(target_weights.size()) + " target weights for " +
            std::to_string(n) + " tokens");
  check(target_weights.empty() || !targets.empty(), "Llama::forward: target weights need targets");
  const i64 v = config_.vocab_size;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    check(tokens[i] >= 0 && tokens[i] < v, "Llama::forward: token " + std::to_string(tokens[i]) +
                                               " at position " + std::to_string(i) +
                                               " is outside [0, " + std::to_string(v) + ")");
  }
  for (std::size_t i = 0; i < targets.size(); ++i) {
    check(targets[i] < v, "Llama::forward: target " + std::to_string(targets[i]) + " at position " +
                              std::to_string(i) + " is >= vocab_size " + std::to_string(v) +
                              " (negative targets are ignored)");
  }
  ensure_buffers(batch, seq);
  tokens_.assign(tokens.begin(), tokens.end());
  targets_.assign(targets.begin(), targets.end());
  target_weights_.assign(target_weights.begin(), target_weights.end());

  const i64 d = config_.d_model, f = config_.ffn_size(), h = config_.n_head;
  const i64 hd = config_.head_dim(), kvh = config_.kv_heads(), qkv = d + 2 * config_.kv_dim();
  const double eps = config_.norm_eps, p = config_.dropout;
  const bool drop = dropout_active();
  const bool norms = config_.has_norm();

  layers::embedding_forward(layer_acts_[0].x_in, tokens_.data(), w_.tok_embedding, n, d);
  for (std::size_t l = 0; l < layer_acts_.size(); ++l) {
    LayerActs& a = layer_acts_[l];
    const LayerParams& w = w_.layers[l];
    T* x_out = l + 1 < layer_acts_.size() ? layer_acts_[l + 1].x_in : x_final_;
    // attention block
    norm_forward(norms, a.h1, a.rstd1, a.x_in, w.attn_norm, n, d, eps);
    layers::linear_forward(a.qkv, a.h1, w.wqkv, n, d, qkv);
    layers::rope_forward(a.qkv, rope_, batch, seq, h, hd, qkv);
    layers::rope_forward(a.qkv + d, rope_, batch, seq, kvh, hd, qkv);
    layers::attention_forward(a.att, a.probs, a.qkv, batch, seq, h, hd, kvh);
    layers::linear_forward(scratch_proj_, a.att, w.wo, n, d, d);
    if (drop) {
      layers::make_dropout_mask(a.keep_attn, n * d, p, dropout_rng_);
      layers::dropout_forward(scratch_proj_, scratch_proj_, a.keep_attn, n * d, p);
    }
    add_into(a.x_mid, a.x_in, scratch_proj_, n * d);
    // MLP block
    norm_forward(norms, a.h2, a.rstd2, a.x_mid, w.mlp_norm, n, d, eps);
    layers::linear_forward(a.gu, a.h2, w.w_gate_up, n, d, 2 * f);
    layers::swiglu_forward(a.act, a.gu, n, f);
    layers::linear_forward(scratch_proj_, a.act, w.w_down, n, f, d);
    if (drop) {
      layers::make_dropout_mask(a.keep_mlp, n * d, p, dropout_rng_);
      layers::dropout_forward(scratch_proj_, scratch_proj_, a.keep_mlp, n * d, p);
    }
    add_into(x_out, a.x_mid, scratch_proj_, n * d);
  }
  norm_forward(norms, h_final_, rstd_final_, x_final_, w_.final_norm, n, d, eps);
  layers::linear_forward(logits_, h_final_, w_.lm_head, n, d, v);

  dropout_used_ = drop;
  have_loss_ = !targets_.empty();
  target_count_ = 0;
  if (!have_loss_) return 0.0;
  const double mean =
      layers::cross_entropy_forward(lse_, logits_, targets_.data(), n, v, &target_count_);
  if (target_weights_.empty()) return mean;
  return layers::weighted_cross_entropy(logits_, lse_, targets_.data(), target_weights_.data(), n,
                                        v);
}

template <class T>
void Llama<T>::target_log_probs(std::span<double> log_probs, std::span<double> entropies) const {
  check(have_loss_, "Llama::target_log_probs: call forward() with targets first");
  const i64 n = static_cast<i64>(batch_) * seq_, v = config_.vocab_size;
  check(static_cast<i64>(log_probs.size()) == n &&
            (entropies.empty() || static_cast<i64>(entropies.size()) == n),
        "Llama::target_log_probs: expected " + std::to_string(n) + " outputs");
  for (i64 i = 0; i < n; ++i) {
    const i64 t = targets_[static_cast<std::size_t>(i)];
    const T* row = logits_ + i * v;
    log_probs[static_cast<std::size_t>(i)] =
        t >= 0 ? static_cast<double>(row[t]) - static_cast<double>(lse_[i]) : 0.0;
    if (entropies.empty()) continue;
    double h = 0.0;
    if (t >= 0) {
      // H = -sum_j p_j log p_j with log p_j = logit_j - lse.
      for (i64 j = 0; j < v; ++j) {
        const double lp = static_cast<double>(row[j]) - static_cast<double>(lse_[i]);
        h -= std::exp(lp) * lp;
      }
    }
    entropies[static_cast<std::size_t>(i)] = h;
  }
}

template <class T>
double Llama<T>::set_target_weights(std::span<const double> target_weights) {
  check(have_loss_, "Llama::set_target_weights: call forward() with targets first");
  const i64 n = static_cast<i64>(batch_) * seq_;
  check(static_cast<i64>(target_weights.size()) == n,
        "Llama::set_target_weights: got " + std::to_string(target_weights.size()) +
            " weights for " + std::to_string(n) + " tokens");
  target_weights_.assign(target_weights.begin(), target_weights.end());
  return layers::weighted_cross_entropy(logits_, lse_, targets_.data(), target_weights_.data(), n,
                                        config_.vocab_size);
}

template <class T>
void Llama<T>::backward(double loss_scale) {
  check(have_loss_, "Llama::backward: call forward() with targets first");
  const i64 n = static_cast<i64>(batch_) * seq_, d = config_.d_model, f = config_.ffn_size();
  const i64 v = config_.vocab_size, h = config_.n_head, hd = config_.head_dim();
  const i64 kvh = config_.kv_heads(), qkv = d + 2 * config_.kv_dim();
  const double p = config_.dropout;
  const bool drop = dropout_used_;  // what the forward did, even if set_training changed since
  const bool norms = config_.has_norm();

  T* q = grad_acts_.data();
  T* dres = q;
  T* dh = dres + n * d;
  T* dproj = dh + n * d;
  T* dqkv = dproj + n * d;
  T* datt = dqkv + n * qkv;
  T* dgu = datt + n * d;
  T* dact = dgu + 2 * n * f;
  T* dlogits = dact + n * f;
  T* attn_scratch = dlogits + n * v;

  zero(dlogits, n * v);
  if (target_weights_.empty())
    layers::cross_entropy_backward(dlogits, logits_, lse_, targets_.data(), n, v, loss_scale);
  else
    layers::weighted_cross_entropy_backward(dlogits, logits_, lse_, targets_.data(),
                                            target_weights_.data(), n, v, loss_scale);
  zero(dh, n * d);
  // Tied embeddings: g_.lm_head is g_.tok_embedding, so the head's gradient lands there now
  // and embedding_backward below adds the lookup's.
  layers::linear_backward(dh, g_.lm_head, dlogits, h_final_, w_.lm_head, n, d, v);
  zero(dres, n * d);
  norm_backward(norms, dres, g_.final_norm, dh, x_final_, w_.final_norm, rstd_final_, n, d);

  for (std::size_t li = layer_acts_.size(); li-- > 0;) {
    const LayerActs& a = layer_acts_[li];
    const LayerParams& w = w_.layers[li];
    const LayerParams& g = g_.layers[li];
    // MLP block: dres holds dL/d(x_out).
    const T* dm = dres;
    if (drop) {
      zero(dproj, n * d);
      layers::dropout_backward(dproj, dres, a.keep_mlp, n * d, p);
      dm = dproj;
    }
    zero(dact, n * f);
    layers::linear_backward(dact, g.w_down, dm, a.act, w.w_down, n, f, d);
    zero(dgu, 2 * n * f);
    layers::swiglu_backward(dgu, dact, a.gu, n, f);
    zero(dh, n * d);
    layers::linear_backward(dh, g.w_gate_up, dgu, a.h2, w.w_gate_up, n, d, 2 * f);
    norm_backward(norms, dres, g.mlp_norm, dh, a.x_mid, w.mlp_norm, a.rstd2, n, d);
    // Attention block: dres now holds dL/d(x_mid).
    const T* da = dres;
    if (drop) {
      zero(dproj, n * d);
      layers::dropout_backward(dproj, dres, a.keep_attn, n * d, p);
      da = dproj;
    }
    zero(datt, n * d);
    layers::linear_backward(datt, g.wo, da, a.att, w.wo, n, d, d);
    zero(dqkv, n * qkv);
    layers::attention_backward(dqkv, attn_scratch, datt, a.probs, a.qkv, batch_, seq_, h, hd, kvh);
    layers::rope_backward(dqkv, rope_, batch_, seq_, h, hd, qkv);
    layers::rope_backward(dqkv + d, rope_, batch_, seq_, kvh, hd, qkv);
    zero(dh, n * d);
    layers::linear_backward(dh, g.wqkv, dqkv, a.h1, w.wqkv, n, d, qkv);
    norm_backward(norms, dres, g.attn_norm, dh, a.x_in, w.attn_norm, a.rstd1, n, d);
    if (layer_grads_ready_) layer_grads_ready_(static_cast<int>(li));
  }
  layers::embedding_backward(g_.tok_embedding, dres, tokens_.data(), n, d);
}

template <class T>
const T* Llama<T>::logits() const {
  check(logits_ != nullptr, "Llama::logits: call forward() first");
  return logits_;
}

template <class T>
void Llama<T>::zero_grad() {
  grads_.fill(0.0);
}

template <class T>
std::vector<Param> Llama<T>::named_params() {
  std::vector<Param> out;
  out.reserve(layout_.size());
  for (const auto& e : layout_) {
    out.push_back({e.name, params_.view(e.offset, e.shape), grads_.view(e.offset, e.shape)});
  }
  return out;
}

namespace {
const ParamEntry& find_entry(const std::vector<ParamEntry>& layout, const std::string& name) {
  for (const auto& e : layout) {
    if (e.name == name) return e;
  }
  throw Error("Llama: no parameter named \"" + name +
              "\" (names look like layers.0.attn.wq; see llama.h)");
}
}  // namespace

template <class T>
Tensor Llama<T>::param(const std::string& name) {
  const ParamEntry& e = find_entry(layout_, name);
  return params_.view(e.offset, e.shape);
}

template <class T>
Tensor Llama<T>::grad(const std::string& name) {
  const ParamEntry& e = find_entry(layout_, name);
  return grads_.view(e.offset, e.shape);
}

template <class T>
void Llama<T>::save_weights(TensorFile& out, const std::string& prefix) const {
  for (const auto& e : layout_) out.tensors[prefix + e.name] = params_.view(e.offset, e.shape);
}

template <class T>
void Llama<T>::load_weights(const TensorFile& in, const std::string& prefix) {
  // Everything is checked before the first value is copied: a bad file changes nothing.
  check_model_weights(in, prefix, config_, "Llama::load_weights");
  for (const auto& e : layout_) {
    Tensor dst = params_.view(e.offset, e.shape);
    dst.copy_from(in.tensors.at(prefix + e.name).to(dtype_of<T>()));
  }
}

template class Llama<float>;
template class Llama<double>;

}  // namespace pion
