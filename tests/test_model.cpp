// The whole decoder: config checks, parameter layout, an fp64 finite-difference gradient check
// (with and without dropout), float vs double, inits and their spectra, and parity with an
// independent PyTorch model (tests/reference/torch_llama.py) in float64 and float32.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "compare.h"
#include "grad_check.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/safetensors.h"
#include "pion/model/init.h"
#include "pion/model/llama.h"
#include "pion/optim/adamw.h"
#include "pion/train/build_optimizer.h"
#include "pion/train/session.h"

using namespace pion;
using test::random_ids;
using test::rel_max_diff;

namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 11;
  c.n_layer = 2;
  c.n_head = 2;
  c.d_model = 8;
  c.seq_len = 5;
  c.init_std = 0.3;  // large enough that every layer is well inside its nonlinear regime
  return c;
}

// Non-trivial norm weights (1 + 0.3 N(0, 1)), so the gradient checks see them away from 1.
void perturb_norm_weights(Llama<double>& model, Rng& rng) {
  for (auto& p : model.named_params())
    if (p.name.find("norm") != std::string::npos)
      for (double& w : p.value.span<double>()) w = 1.0 + 0.3 * rng.normal();
}

// Both models' losses on one random batch of b sequences of t tokens (ids from `seed`, targets
// from seed + 1), gradients zeroed first: how the tests that check a model against an
// equivalent one start, before they compare logits and gradients.
template <class M1, class M2>
std::pair<double, double> losses_on_random_batch(M1& m1, M2& m2, int b, int t, int vocab,
                                                 std::uint64_t seed) {
  const auto tokens = random_ids(b * t, vocab, seed);
  const auto targets = random_ids(b * t, vocab, seed + 1);
  m1.zero_grad();
  m2.zero_grad();
  const double l1 = m1.forward(tokens, targets, b, t);
  const double l2 = m2.forward(tokens, targets, b, t);
  return {l1, l2};
}

// Per-parameter finite-difference check of the model's gradient. `before_forward` runs before
// every forward (e.g. to reset the dropout rng so every forward draws the same masks).
double model_grad_error(Llama<double>& model, const std::vector<std::int32_t>& tokens,
                        const std::vector<std::int32_t>& targets, int b, int t,
                        const std::function<void()>& before_forward) {
  before_forward();
  model.zero_grad();
  model.forward(tokens, targets, b, t);
  model.backward();
  double worst = 0;
  for (auto& p : model.named_params()) {
    std::vector<double> analytic(p.grad.span<double>().begin(), p.grad.span<double>().end());
    double e = test::fd_rel_error(p.value.span<double>(), analytic, [&] {
      before_forward();
      return model.forward(tokens, targets, b, t);
    });
    EXPECT_LT(e, 1e-6) << p.name;
    worst = std::max(worst, e);
  }
  return worst;
}

}  // namespace

TEST(ModelConfig, ValidatesWithClearErrors) {
  ModelConfig c = tiny_config();
  EXPECT_NO_THROW(c.validate());
  auto expect_error = [](ModelConfig bad, const std::string& fragment) {
    try {
      bad.validate();
      ADD_FAILURE() << "no error for " << fragment;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  ModelConfig bad = c;
  bad.n_head = 3;
  expect_error(bad, "divisible by n_head");
  bad = c;
  bad.d_model = 6;
  bad.n_head = 2;  // head_dim 3
  expect_error(bad, "must be even");
  bad = c;
  bad.init = "xavier";
  expect_error(bad, "init");
  bad = c;
  bad.dropout = 1.0;
  expect_error(bad, "dropout");
  bad = c;
  bad.vocab_size = 0;
  expect_error(bad, "vocab_size");
  EXPECT_THROW(Llama<float>{bad}, Error);

  for (int d : {8, 64, 96, 128, 384, 768}) {
    ModelConfig m = c;
    m.d_model = d;
    const int f = m.ffn_size();
    EXPECT_EQ(f % 32, 0);
    EXPECT_GE(3 * f, 8 * d);         // at or above 8/3 d ...
    EXPECT_LT(3 * (f - 32), 8 * d);  // ... the nearest such multiple of 32
  }
  ModelConfig round = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(round.to_json(), c.to_json());
  nlohmann::json unknown = c.to_json();
  unknown["d_modle"] = 3;
  EXPECT_THROW(ModelConfig::from_json(unknown), Error);
}

TEST(Llama, ParameterLayoutIsOneBuffer) {
  ModelConfig c = tiny_config();
  Llama<float> model(c);
  const std::int64_t d = c.d_model, f = c.ffn_size(), v = c.vocab_size;
  EXPECT_EQ(model.params().numel(), c.num_params());
  EXPECT_EQ(model.grads().numel(), c.num_params());
  std::int64_t expected_offset = 0;
  for (const auto& e : model.layout()) {
    EXPECT_EQ(e.offset, expected_offset) << e.name;
    expected_offset += e.numel();
  }
  EXPECT_EQ(expected_offset, c.num_params());
  EXPECT_EQ(model.param("tok_embedding.weight").shape(), (Shape{v, d}));
  EXPECT_EQ(model.param("layers.1.attn.wk").shape(), (Shape{d, d}));
  EXPECT_EQ(model.param("layers.0.mlp.w_gate").shape(), (Shape{f, d}));
  EXPECT_EQ(model.param("layers.0.mlp.w_down").shape(), (Shape{d, f}));
  EXPECT_EQ(model.param("lm_head.weight").shape(), (Shape{v, d}));
  EXPECT_THROW(model.param("layers.0.attn.wx"), Error);
  auto params = model.named_params();
  EXPECT_EQ(params.size(), 3u + 9u * static_cast<std::size_t>(c.n_layer));
  for (auto& p : params) {
    EXPECT_TRUE(p.value.same_storage(model.params())) << p.name;
    EXPECT_TRUE(p.grad.same_storage(model.grads())) << p.name;
  }
}

// The CUDA model's by-shape layout: the same entries in the same order, a permutation of one
// buffer (no gap, no overlap), the embedding first, the fused GEMMs' operands adjacent, and
// each shape group of the trainer's Pion matrices evenly spaced in parameter order wherever
// one stride can hold it (multi-head attention's four d x d matrices; always the MLP's).
TEST(Llama, ByShapeLayoutIsAPermutationWithEvenShapeGroups) {
  struct Case {
    const char* what;
    int n_kv_head;
    bool tie, norm;
    bool attention_even;
  };
  for (const Case& k : {Case{"mha", 0, false, true, true}, Case{"gqa", 1, false, true, false},
                        Case{"mha tied no-norm", 0, true, false, true}}) {
    SCOPED_TRACE(k.what);
    ModelConfig c = tiny_config();
    c.n_layer = 3;
    c.n_head = 4;
    if (k.n_kv_head > 0) c.n_kv_head = k.n_kv_head;
    c.tie_embeddings = k.tie;
    if (!k.norm) c.norm = "none";
    const std::vector<ParamEntry> host = llama_param_layout(c),
                                  dev = llama_param_layout_by_shape(c);
    ASSERT_EQ(dev.size(), host.size());
    std::map<std::string, const ParamEntry*> by_name;
    std::vector<std::pair<std::int64_t, std::int64_t>> spans;
    for (std::size_t i = 0; i < dev.size(); ++i) {
      EXPECT_EQ(dev[i].name, host[i].name);
      EXPECT_EQ(dev[i].shape, host[i].shape);
      by_name[dev[i].name] = &dev[i];
      spans.push_back({dev[i].offset, dev[i].offset + dev[i].numel()});
    }
    std::sort(spans.begin(), spans.end());
    std::int64_t end = 0;
    for (const auto& [a, b] : spans) {
      EXPECT_EQ(a, end);
      end = b;
    }
    EXPECT_EQ(end, c.num_params());
    EXPECT_EQ(by_name.at("tok_embedding.weight")->offset, 0);
    const auto at = [&](int layer, const char* name) {
      return by_name.at("layers." + std::to_string(layer) + "." + name);
    };
    for (int l = 0; l < c.n_layer; ++l) {
      EXPECT_EQ(at(l, "attn.wk")->offset, at(l, "attn.wq")->offset + at(l, "attn.wq")->numel());
      EXPECT_EQ(at(l, "attn.wv")->offset, at(l, "attn.wk")->offset + at(l, "attn.wk")->numel());
      EXPECT_EQ(at(l, "mlp.w_up")->offset,
                at(l, "mlp.w_gate")->offset + at(l, "mlp.w_gate")->numel());
    }
    // The shape groups in parameter order (as the GPU optimizers form them).
    std::map<Shape, std::vector<std::int64_t>> groups;
    for (const ParamEntry& e : dev)
      if (e.shape.size() == 2 && e.name.rfind("layers.", 0) == 0)
        groups[e.shape].push_back(e.offset);
    for (const auto& [shape, offsets] : groups) {
      bool even = true;
      for (std::size_t i = 2; i < offsets.size(); ++i)
        even = even && offsets[i] - offsets[i - 1] == offsets[1] - offsets[0];
      // GQA: wq|wo (d x d) and wk|wv (kv x d) alternate with the other shape in each layer.
      const bool attention =
          shape == Shape{c.d_model, c.d_model} || shape == Shape{c.kv_dim(), c.d_model};
      EXPECT_EQ(even, attention ? k.attention_even : true)
          << shape[0] << " x " << shape[1] << ", " << offsets.size() << " matrices";
    }
  }
}

TEST(Llama, GradientMatchesFiniteDifferencesFp64) {
  ModelConfig c = tiny_config();
  Llama<double> model(c);
  Rng rng(1);
  model.init_weights(rng);
  perturb_norm_weights(model, rng);
  const int b = 2, t = 5;
  auto tokens = random_ids(b * t, c.vocab_size, 2);
  auto targets = random_ids(b * t, c.vocab_size, 3);
  targets[0] = targets[6] = -1;  // ignored positions (e.g. a prompt)
  const double worst = model_grad_error(model, tokens, targets, b, t, [] {});
  std::printf("[grad] whole model fp64, worst relative error over all parameters: %.2e\n", worst);
}

TEST(Llama, GradientWithDropoutMatchesFiniteDifferences) {
  ModelConfig c = tiny_config();
  c.dropout = 0.25;
  Llama<double> model(c);
  Rng rng(4);
  model.init_weights(rng);
  const int b = 2, t = 4;
  auto tokens = random_ids(b * t, c.vocab_size, 5);
  auto targets = random_ids(b * t, c.vocab_size, 6);
  const auto state = model.dropout_rng().state();
  // Restoring the rng before every forward redraws the same masks.
  const double worst =
      model_grad_error(model, tokens, targets, b, t, [&] { model.dropout_rng().set_state(state); });
  std::printf("[grad] whole model fp64 with dropout 0.25: %.2e\n", worst);
}

TEST(Llama, DropoutTrainEvalAndDeterminism) {
  ModelConfig c = tiny_config();
  c.dropout = 0.3;
  ModelConfig c0 = c;
  c0.dropout = 0.0;
  Llama<float> model(c), plain(c0);
  Rng rng(7);
  model.init_weights(rng);
  plain.params().copy_from(model.params());
  const int b = 2, t = 5;
  auto tokens = random_ids(b * t, c.vocab_size, 8);
  auto targets = random_ids(b * t, c.vocab_size, 9);
  const double reference = plain.forward(tokens, targets, b, t);

  const auto state = model.dropout_rng().state();
  const double l1 = model.forward(tokens, targets, b, t);
  const double l2 = model.forward(tokens, targets, b, t);
  EXPECT_NE(l1, l2);  // fresh masks each forward
  EXPECT_NE(l1, reference);
  model.dropout_rng().set_state(state);
  EXPECT_EQ(model.forward(tokens, targets, b, t), l1);  // bit-exact replay

  model.set_training(false);
  const auto before_eval = model.dropout_rng().state();
  EXPECT_EQ(model.forward(tokens, targets, b, t), reference);
  EXPECT_EQ(model.dropout_rng().state(), before_eval);  // eval draws nothing
}

TEST(Llama, FloatMatchesDoubleAndLossScaleAccumulates) {
  ModelConfig c = tiny_config();
  c.d_model = 16;
  c.seq_len = 8;
  c.init = "spectral";
  Llama<double> md(c);
  Llama<float> mf(c);
  Rng rng(10);
  md.init_weights(rng);
  mf.params().copy_from(md.params().to(DType::F32));
  const int b = 3, t = 8;
  const auto [ld, lf] = losses_on_random_batch(md, mf, b, t, c.vocab_size, 11);
  EXPECT_NEAR(lf, ld, 1e-5 * ld);
  md.backward();
  mf.backward();
  EXPECT_LT(rel_max_diff(mf.grads(), md.grads()), 1e-4);

  // Two backward(0.5) calls add up to one backward(1).
  Tensor once = md.grads().clone();
  md.zero_grad();
  md.backward(0.5);
  md.backward(0.5);
  EXPECT_LT(rel_max_diff(md.grads(), once), 1e-13);
}

TEST(Llama, LogitsOnlyCausalityAndBadInput) {
  ModelConfig c = tiny_config();
  Llama<double> model(c);
  Rng rng(13);
  model.init_weights(rng);
  const int b = 2, t = 5;
  const std::int64_t v = c.vocab_size;
  auto tokens = random_ids(b * t, c.vocab_size, 14);
  auto targets = random_ids(b * t, c.vocab_size, 15);
  model.forward(tokens, targets, b, t);
  std::vector<double> with_loss(model.logits(), model.logits() + b * t * v);
  EXPECT_EQ(model.forward(tokens, {}, b, t), 0.0);
  for (std::int64_t i = 0; i < b * t * v; ++i) EXPECT_EQ(model.logits()[i], with_loss[i]);
  EXPECT_THROW(model.backward(), Error);

  // Changing the last token of sequence 0 changes no earlier logits of any sequence.
  auto changed = tokens;
  changed[t - 1] = (changed[t - 1] + 1) % c.vocab_size;
  model.forward(changed, {}, b, t);
  for (std::int64_t i = 0; i < (t - 1) * v; ++i) EXPECT_EQ(model.logits()[i], with_loss[i]);
  double moved = 0;
  for (std::int64_t i = (t - 1) * v; i < t * v; ++i)
    moved += std::abs(model.logits()[i] - with_loss[i]);
  EXPECT_GT(moved, 1e-6);

  auto bad = tokens;
  bad[3] = static_cast<std::int32_t>(v);
  EXPECT_THROW(model.forward(bad, targets, b, t), Error);
  bad[3] = -1;
  EXPECT_THROW(model.forward(bad, targets, b, t), Error);
  auto bad_target = targets;
  bad_target[1] = static_cast<std::int32_t>(v);
  EXPECT_THROW(model.forward(tokens, bad_target, b, t), Error);
  EXPECT_THROW(model.forward(tokens, targets, b, t - 1), Error);  // size mismatch
  auto longer = random_ids(b * (t + 1), c.vocab_size, 16);
  EXPECT_THROW(model.forward(longer, {}, b, t + 1), Error);  // beyond seq_len
  // A smaller batch re-plans the buffers and still works.
  std::vector<std::int32_t> one(tokens.begin(), tokens.begin() + t);
  model.forward(one, {}, 1, t);  // GEMM blocking differs with the batch: allow rounding
  for (std::int64_t i = 0; i < t * v; ++i) EXPECT_NEAR(model.logits()[i], with_loss[i], 1e-12);
}

TEST(Init, SpectralGivesFixedSingularValues) {
  ModelConfig c = tiny_config();
  c.d_model = 32;
  c.n_head = 4;
  c.vocab_size = 40;
  c.init = "spectral";
  Llama<double> model(c);
  Rng rng(20);
  model.init_weights(rng);
  auto spectra = hidden_spectra(model.named_params());
  ASSERT_EQ(spectra.size(), 7u * static_cast<std::size_t>(c.n_layer));
  for (const auto& s : spectra) {
    const double want = std::sqrt(static_cast<double>(s.rows) / static_cast<double>(s.cols));
    EXPECT_NEAR(s.sigma_max, want, 1e-12 * want) << s.name;
    EXPECT_NEAR(s.sigma_min, want, 1e-12 * want) << s.name;
    EXPECT_EQ(s.sigma.size(), static_cast<std::size_t>(std::min(s.rows, s.cols)));
  }
  // Two different matrices are not equal (fresh draws), norms are 1, embeddings N(0, std).
  EXPECT_GT(max_abs_diff(model.param("layers.0.attn.wq"), model.param("layers.0.attn.wk")), 0.1);
  for (double w : model.param("layers.1.mlp_norm.weight").span<double>()) EXPECT_EQ(w, 1.0);
  EXPECT_NEAR(frobenius_norm(model.param("tok_embedding.weight")) / std::sqrt(40.0 * 32),
              c.init_std, 0.1 * c.init_std);
  // The float model reports the same spectrum within fp32 rounding.
  Llama<float> mf(c);
  Rng rng2(20);
  mf.init_weights(rng2);
  for (const auto& s : hidden_spectra(mf.named_params())) {
    const double want = std::sqrt(static_cast<double>(s.rows) / static_cast<double>(s.cols));
    EXPECT_NEAR(s.sigma_max, want, 1e-5);
    EXPECT_NEAR(s.sigma_min, want, 1e-5);
  }
}

TEST(Init, NormalScalesOutputProjections) {
  ModelConfig c = tiny_config();
  c.d_model = 64;
  c.n_head = 4;
  c.n_layer = 3;
  c.vocab_size = 50;
  c.init_std = 0.02;
  Llama<float> model(c);
  Rng rng(30);
  model.init_weights(rng);
  auto rms = [](const Tensor& w) { return frobenius_norm(w) / std::sqrt(double(w.numel())); };
  const double scaled = c.init_std / std::sqrt(2.0 * c.n_layer);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (const char* name : {"attn.wq", "attn.wk", "attn.wv", "mlp.w_gate", "mlp.w_up"})
      EXPECT_NEAR(rms(model.param(p + name)), c.init_std, 0.05 * c.init_std) << p + name;
    EXPECT_NEAR(rms(model.param(p + "attn.wo")), scaled, 0.05 * scaled);
    EXPECT_NEAR(rms(model.param(p + "mlp.w_down")), scaled, 0.05 * scaled);
    for (float w : model.param(p + "attn_norm.weight").span<float>()) EXPECT_EQ(w, 1.0f);
  }
  EXPECT_NEAR(rms(model.param("lm_head.weight")), c.init_std, 0.05 * c.init_std);
  // Same seed, same weights.
  Llama<float> again(c);
  Rng rng2(30);
  again.init_weights(rng2);
  EXPECT_EQ(max_abs_diff(again.params(), model.params()), 0.0);
}

TEST(Llama, SaveAndLoadWeightsAcrossDtypes) {
  ModelConfig c = tiny_config();
  Llama<double> md(c);
  Rng rng(40);
  md.init_weights(rng);
  auto dir = test::temp_dir("llama_weights");
  TensorFile f;
  md.save_weights(f);
  save_safetensors(dir + "/w.safetensors", f);
  Llama<float> mf(c);
  mf.load_weights(load_safetensors(dir + "/w.safetensors"));
  EXPECT_LT(max_abs_diff(mf.params(), md.params()), 1e-7);
  TensorFile missing = f;
  missing.tensors.erase("final_norm.weight");
  EXPECT_THROW(mf.load_weights(missing), Error);
}

namespace {
// Runs the PyTorch reference on the model's weights and compares loss, logits and every grad.
// `shape` changes the config after the defaults below (GQA, tied embeddings, rope_theta, ...).
template <class T>
void check_torch_parity(double loss_tol, double grad_tol, const std::string& norm = "rmsnorm",
                        const std::function<void(ModelConfig&)>& shape = {}) {
  if (!test::python_has("torch numpy")) {
    GTEST_SKIP() << "PyTorch parity skipped: " << test::python() << " cannot import torch/numpy";
  }
  ModelConfig c = test::tiny_model_config();
  c.norm = norm;
  if (shape) shape(c);
  Llama<T> model(c);
  Rng rng(50);
  model.init_weights(rng);
  for (auto& p : model.named_params())
    if (p.name.find("norm") != std::string::npos) fill_normal(p.value, rng, 1.0, 0.2);
  const int b = 3, t = 7;
  auto tokens = random_ids(b * t, c.vocab_size, 51);
  auto targets = random_ids(b * t, c.vocab_size, 52);
  targets[2] = targets[9] = targets[10] = -1;
  model.zero_grad();
  const double loss = model.forward(tokens, targets, b, t);
  model.backward();

  auto dir = test::temp_dir("torch_llama");
  TensorFile in;
  model.save_weights(in);
  in.tensors["tokens"] = Tensor::from_vector<std::int32_t>({b, t}, tokens);
  in.tensors["targets"] = Tensor::from_vector<std::int32_t>({b, t}, targets);
  in.metadata["config"] = c.to_json().dump();
  save_safetensors(dir + "/in.safetensors", in);
  auto r = test::run_command(test::python() + " " + test::source_dir() +
                             "/tests/reference/torch_llama.py grads " + dir + "/in.safetensors " +
                             dir + "/out.safetensors");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  TensorFile out = load_safetensors(dir + "/out.safetensors");
  const double ref_loss = out.tensors.at("loss").data<double>()[0];
  const double loss_err = std::abs(loss - ref_loss) / std::abs(ref_loss);
  EXPECT_LT(loss_err, loss_tol) << loss << " vs torch " << ref_loss;
  Tensor logits = Tensor::empty({b * t * c.vocab_size}, dtype_of<T>());
  std::copy_n(model.logits(), logits.numel(), logits.data<T>());
  const double logit_err = rel_max_diff(logits, out.tensors.at("logits").reshape({logits.numel()}));
  EXPECT_LT(logit_err, grad_tol);
  double worst = 0;
  for (auto& p : model.named_params()) {
    const double e = rel_max_diff(p.grad, out.tensors.at("grad." + p.name));
    EXPECT_LT(e, grad_tol) << p.name;
    worst = std::max(worst, e);
  }
  std::printf(
      "[parity %s, norm %s, n_head %d, n_kv_head %d, tied %d, rope_theta %g, norm_eps %g] loss "
      "%.2e, logits %.2e, worst gradient %.2e (relative)\n",
      dtype_name(dtype_of<T>()), norm.c_str(), c.n_head, c.kv_heads(), c.tie_embeddings ? 1 : 0,
      c.rope_theta, c.norm_eps, loss_err, logit_err, worst);
}
}  // namespace

TEST(Llama, MatchesPyTorchFp64) {
  check_torch_parity<double>(1e-10, 1e-9);
}
TEST(Llama, MatchesPyTorchFp32) {
  check_torch_parity<float>(1e-5, 1e-4);
}
TEST(Llama, NormFreeModelMatchesPyTorchFp64) {
  check_torch_parity<double>(1e-10, 1e-9, "none");
}
// Grouped-query attention (HF's repeat_kv), tied embeddings, and a non-default RoPE base and
// RMSNorm epsilon (large enough to move the norms' outputs) against the PyTorch reference.
TEST(Llama, GqaModelMatchesPyTorchFp64) {
  for (int kv : {2, 1}) {
    check_torch_parity<double>(1e-10, 1e-9, "rmsnorm", [kv](ModelConfig& c) {
      c.n_head = 4;
      c.n_kv_head = kv;
    });
  }
}
TEST(Llama, TiedModelMatchesPyTorchFp64) {
  for (const char* norm : {"rmsnorm", "none"})
    check_torch_parity<double>(1e-10, 1e-9, norm, [](ModelConfig& c) { c.tie_embeddings = true; });
}
TEST(Llama, GqaTiedModelWithRopeThetaAndNormEpsMatchesPyTorch) {
  auto shape = [](ModelConfig& c) {
    c.n_head = 4;
    c.n_kv_head = 2;
    c.tie_embeddings = true;
    c.rope_theta = 500000.0;
    c.norm_eps = 0.05;
  };
  check_torch_parity<double>(1e-10, 1e-9, "rmsnorm", shape);
  check_torch_parity<float>(1e-5, 1e-4, "rmsnorm", shape);
}

// norm "none" (the normalisation-free model Pion trains): no RMSNorm anywhere, no norm weights,
// and a gradient that still matches finite differences.
TEST(Llama, NormFreeModelHasNoNormsAndItsGradientMatchesFiniteDifferences) {
  ModelConfig c = tiny_config();
  c.norm = "none";
  // Larger weights than tiny_config's: without norms some early-layer gradients are small
  // beside the loss's fp64 roundoff / h, which then dominates the finite-difference error
  // (worst relative error 6e-7 at init_std 0.3, 1.5e-9 at 0.5).
  c.init_std = 0.5;
  Llama<double> model(c);
  EXPECT_EQ(model.params().numel(), c.num_params());
  ModelConfig with_norms = tiny_config();
  // RMSNorm weights of d: two per layer and the final one.
  EXPECT_EQ(with_norms.num_params() - c.num_params(),
            static_cast<std::int64_t>(2 * c.n_layer + 1) * c.d_model);
  for (const auto& e : model.layout()) EXPECT_EQ(e.name.find("norm"), std::string::npos) << e.name;
  EXPECT_EQ(model.named_params().size(), 2u + 7u * static_cast<std::size_t>(c.n_layer));
  Rng rng(7);
  model.init_weights(rng);
  const int b = 2, t = 5;
  auto tokens = random_ids(b * t, c.vocab_size, 8);
  auto targets = random_ids(b * t, c.vocab_size, 9);
  targets[3] = -1;
  const double worst = model_grad_error(model, tokens, targets, b, t, [] {});
  std::printf("[grad] norm-free model fp64, worst relative error over all parameters: %.2e\n",
              worst);

  // Not the same function as the model with norms on the same shared weights.
  Llama<double> normed(with_norms);
  Rng rng2(7);
  normed.init_weights(rng2);
  for (auto& p : model.named_params()) normed.param(p.name).copy_from(p.value);
  EXPECT_GT(std::abs(normed.forward(tokens, targets, b, t) - model.forward(tokens, targets, b, t)),
            1e-6);

  // The norm is part of the config a checkpoint records, and a bad value is refused.
  EXPECT_EQ(ModelConfig::from_json(c.to_json()).norm, "none");
  nlohmann::json old_checkpoint = with_norms.to_json();
  old_checkpoint.erase("norm");  // written before the option existed
  EXPECT_EQ(ModelConfig::from_json(old_checkpoint).norm, "rmsnorm");
  nlohmann::json bad = c.to_json();
  bad["norm"] = "layernorm";
  EXPECT_THROW(ModelConfig::from_json(bad), Error);
  // Weights saved without norms do not load into a model with them, and the reverse.
  TensorFile f;
  model.save_weights(f);
  EXPECT_THROW(normed.load_weights(f), Error);
  TensorFile g;
  normed.save_weights(g);
  EXPECT_THROW(check_model_weights(g, "", c, "test"), Error);
}

// ---- grouped-query attention and tied embeddings ----------------------------------------------

namespace {

// tiny_config widened to 4 heads of 4 (so n_kv_head can be 4, 2 or 1).
ModelConfig gqa_config(int n_kv_head, bool tied, const std::string& norm = "rmsnorm") {
  ModelConfig c = tiny_config();
  c.d_model = 16;
  c.n_head = 4;
  c.n_kv_head = n_kv_head;
  c.tie_embeddings = tied;
  c.norm = norm;
  // Without norms, larger weights keep every gradient well above the loss's roundoff / h (see
  // NormFreeModelHasNoNormsAndItsGradientMatchesFiniteDifferences).
  c.init_std = norm == "none" ? 0.5 : 0.3;
  return c;
}

// The gradient of parameter `name` as a copy, in double.
std::vector<double> grad_of(Llama<double>& m, const std::string& name) {
  auto g = m.grad(name).span<double>();
  return {g.begin(), g.end()};
}

double max_abs_vec_diff(std::span<const double> a, std::span<const double> b) {
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) e = std::max(e, std::abs(a[i] - b[i]));
  return e;
}

}  // namespace

TEST(Llama, GqaAndTiedLayoutAndConfig) {
  ModelConfig c = gqa_config(1, true);
  Llama<float> model(c);
  const std::int64_t d = 16, kv = 4, v = c.vocab_size;
  EXPECT_EQ(c.kv_dim(), kv);
  EXPECT_EQ(model.params().numel(), c.num_params());
  EXPECT_EQ(model.param("layers.0.attn.wq").shape(), (Shape{d, d}));
  EXPECT_EQ(model.param("layers.0.attn.wk").shape(), (Shape{kv, d}));
  EXPECT_EQ(model.param("layers.1.attn.wv").shape(), (Shape{kv, d}));
  EXPECT_EQ(model.param("tok_embedding.weight").shape(), (Shape{v, d}));
  EXPECT_THROW(model.param("lm_head.weight"), Error);  // tied: the embedding is the head
  EXPECT_EQ(model.named_params().size(), 2u + 9u * static_cast<std::size_t>(c.n_layer));
  // Untied MHA has 2 (d - kv) d more per wk and wv, and the head.
  ModelConfig mha = gqa_config(0, false);
  EXPECT_EQ(mha.num_params() - c.num_params(), c.n_layer * 2 * (d - kv) * d + v * d);

  // Checkpoint metadata: round trip, and a config written before the keys existed is MHA, untied.
  const ModelConfig back = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(back.n_kv_head, 1);
  EXPECT_TRUE(back.tie_embeddings);
  nlohmann::json old = mha.to_json();
  old.erase("n_kv_head");
  old.erase("tie_embeddings");
  const ModelConfig old_c = ModelConfig::from_json(old);
  EXPECT_EQ(old_c.kv_heads(), old_c.n_head);
  EXPECT_FALSE(old_c.tie_embeddings);
  Llama<float> old_model(old_c);
  EXPECT_NO_THROW(old_model.param("lm_head.weight"));
  nlohmann::json bad = c.to_json();
  bad["n_kv_head"] = 3;  // does not divide 4
  EXPECT_THROW(ModelConfig::from_json(bad), Error);
  bad = c.to_json();
  bad["tie_embeddings"] = 1;
  EXPECT_THROW(ModelConfig::from_json(bad), Error);

  // Tied weights do not load into an untied model of the same shape, nor the reverse.
  TensorFile f;
  model.save_weights(f);
  ModelConfig untied = c;
  untied.tie_embeddings = false;
  Llama<float> u(untied);
  EXPECT_THROW(u.load_weights(f), Error);
  TensorFile g;
  u.save_weights(g);
  EXPECT_THROW(model.load_weights(g), Error);
  EXPECT_NO_THROW(model.load_weights(f));
}

// The fp64 finite-difference check of every parameter of the whole model for GQA groups of
// 2 and 4 query heads, MHA, tied and untied embeddings, with and without RMSNorm.
TEST(Llama, GqaAndTiedGradientsMatchFiniteDifferencesFp64) {
  struct Case {
    int kv;
    bool tied;
    const char* norm;
  };
  const Case cases[] = {{2, false, "rmsnorm"}, {1, false, "none"}, {4, true, "rmsnorm"},
                        {2, true, "rmsnorm"},  {1, true, "none"},  {1, true, "rmsnorm"}};
  for (const Case& k : cases) {
    SCOPED_TRACE("n_kv_head " + std::to_string(k.kv) + " tied " + std::to_string(k.tied) +
                 " norm " + k.norm);
    ModelConfig c = gqa_config(k.kv, k.tied, k.norm);
    Llama<double> model(c);
    Rng rng(60 + static_cast<std::uint64_t>(k.kv));
    model.init_weights(rng);
    perturb_norm_weights(model, rng);
    const int b = 2, t = 5;
    auto tokens = random_ids(b * t, c.vocab_size, 61);
    auto targets = random_ids(b * t, c.vocab_size, 62);
    targets[1] = -1;
    const double worst = model_grad_error(model, tokens, targets, b, t, [] {});
    std::printf("[grad] n_head 4, n_kv_head %d, tied %d, norm %s: worst relative error %.2e\n",
                k.kv, k.tied ? 1 : 0, k.norm, worst);
  }
}

// Exact structure: GQA is MHA whose K/V heads are repeated per group. A GQA model and an MHA
// model holding wk/wv rows of head h = the GQA rows of head h / group (every other weight the
// same) give the same logits, and the MHA wk/wv gradients summed over each group are the GQA
// gradients (every other gradient equal).
TEST(Llama, GqaEqualsMhaWithRepeatedKvHeads) {
  for (int kv : {2, 1}) {
    for (bool tied : {false, true}) {
      SCOPED_TRACE("n_kv_head " + std::to_string(kv) + " tied " + std::to_string(tied));
      const ModelConfig gc = gqa_config(kv, tied);
      const ModelConfig mc = gqa_config(0, tied);
      Llama<double> gqa(gc), mha(mc);
      Rng rng(70);
      gqa.init_weights(rng);
      const std::int64_t hd = gc.head_dim(), d = gc.d_model, group = gc.n_head / kv;
      for (auto& p : mha.named_params()) {
        Tensor src = gqa.param(p.name);
        if (src.shape() == p.value.shape()) {
          p.value.copy_from(src);
          continue;
        }
        // wk / wv: MHA head h's hd rows are GQA head h / group's.
        for (std::int64_t h = 0; h < gc.n_head; ++h)
          std::copy_n(src.data<double>() + (h / group) * hd * d, hd * d,
                      p.value.data<double>() + h * hd * d);
      }
      const int b = 2, t = 5;
      const auto [lg, lm] = losses_on_random_batch(gqa, mha, b, t, gc.vocab_size, 71);
      EXPECT_NEAR(lg, lm, 1e-13 * std::abs(lm));
      double logit_err = 0;
      for (std::int64_t i = 0; i < b * t * gc.vocab_size; ++i)
        logit_err = std::max(logit_err, std::abs(gqa.logits()[i] - mha.logits()[i]));
      EXPECT_LT(logit_err, 1e-12);
      gqa.backward();
      mha.backward();
      double grad_err = 0;
      for (auto& p : gqa.named_params()) {
        std::vector<double> want = grad_of(mha, p.name);
        if (want.size() != static_cast<std::size_t>(p.grad.numel())) {
          // Sum the MHA gradient over each group's heads.
          std::vector<double> summed(static_cast<std::size_t>(p.grad.numel()), 0.0);
          for (std::int64_t h = 0; h < gc.n_head; ++h)
            for (std::int64_t i = 0; i < hd * d; ++i)
              summed[static_cast<std::size_t>((h / group) * hd * d + i)] +=
                  want[static_cast<std::size_t>(h * hd * d + i)];
          want = summed;
        }
        const double e = max_abs_vec_diff(grad_of(gqa, p.name), want);
        EXPECT_LT(e, 1e-12) << p.name;
        grad_err = std::max(grad_err, e);
      }
      std::printf(
          "[gqa = repeated mha] n_kv_head %d tied %d: logits %.2e, gradients %.2e (max "
          "abs)\n",
          kv, tied ? 1 : 0, logit_err, grad_err);
    }
  }
}

// Exact structure: a tied model is an untied one whose lm_head equals tok_embedding: the same
// logits, and the tied gradient is the untied embedding gradient plus the untied head's.
TEST(Llama, TiedEqualsUntiedWithHeadEqualToEmbedding) {
  for (int kv : {4, 2}) {
    for (const char* norm : {"rmsnorm", "none"}) {
      SCOPED_TRACE(std::string("norm ") + norm + " n_kv_head " + std::to_string(kv));
      const ModelConfig tc = gqa_config(kv, true, norm), uc = gqa_config(kv, false, norm);
      Llama<double> tied(tc), untied(uc);
      Rng rng(80);
      tied.init_weights(rng);
      for (auto& p : tied.named_params()) untied.param(p.name).copy_from(p.value);
      untied.param("lm_head.weight").copy_from(tied.param("tok_embedding.weight"));
      const int b = 3, t = 4;
      const auto [lt, lu] = losses_on_random_batch(tied, untied, b, t, tc.vocab_size, 81);
      EXPECT_EQ(lt, lu);  // the same arithmetic on the same numbers
      for (std::int64_t i = 0; i < b * t * tc.vocab_size; ++i)
        ASSERT_EQ(tied.logits()[i], untied.logits()[i]);
      tied.backward();
      untied.backward();
      double err = 0;
      for (auto& p : tied.named_params()) {
        std::vector<double> want = grad_of(untied, p.name);
        if (p.name == "tok_embedding.weight") {
          const std::vector<double> head = grad_of(untied, "lm_head.weight");
          for (std::size_t i = 0; i < want.size(); ++i) want[i] += head[i];
        }
        // Relative: the tied buffer adds the two parts in another order (head, then lookup).
        double scale = 1e-300;
        for (double x : want) scale = std::max(scale, std::abs(x));
        const double e = max_abs_vec_diff(grad_of(tied, p.name), want) / scale;
        EXPECT_LT(e, 1e-14) << p.name;
        err = std::max(err, e);
      }
      std::printf(
          "[tied = untied with lm_head = E] norm %s n_kv_head %d: loss diff %.2e, "
          "gradients %.2e (relative)\n",
          norm, kv, std::abs(lt - lu), err);
    }
  }
}

// A tied embedding is one AdamW parameter under every optimizer; GQA's [kv, d] wk and wv are
// hidden matrices like the others (Muon / Pion).
TEST(Llama, TiedEmbeddingIsOneAdamWParameterUnderEveryOptimizer) {
  Llama<float> model(gqa_config(2, true));
  const auto params = model.named_params();
  for (const char* opt : {"adamw", "muon", "pion"}) {
    SCOPED_TRACE(opt);
    TrainConfig tc;
    tc.optimizer = opt;
    OptimizerSet set = build_optimizers(tc, params);
    std::map<std::string, int> seen;  // parameter -> how many groups hold it
    std::set<std::string> in_adamw, in_matrix;
    for (const auto& o : set.optimizers()) {
      const bool adamw = dynamic_cast<const AdamW*>(o.get()) != nullptr;
      for (const auto& g : o->groups())
        for (const auto& p : g.params) {
          ++seen[p.name];
          (adamw ? in_adamw : in_matrix).insert(p.name);
        }
    }
    EXPECT_EQ(seen.size(), params.size());
    for (const auto& [name, n] : seen) EXPECT_EQ(n, 1) << name;
    EXPECT_TRUE(in_adamw.count("tok_embedding.weight"));
    if (std::string(opt) != "adamw") {
      for (int l = 0; l < 2; ++l)
        for (const char* w :
             {"attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down"})
          EXPECT_TRUE(in_matrix.count("layers." + std::to_string(l) + "." + w)) << w;
      EXPECT_EQ(in_matrix.size(), 14u);
    }
  }
}

// The `pion train` keys reach the model (and so the checkpoint's model config); a saved run
// config from before the keys existed still reads, as MHA with an untied head.
TEST(Llama, TrainConfigKeysReachTheModelConfig) {
  TrainConfig tc;
  apply_config_json(tc, {{"n_head", 4},
                         {"d_model", 32},
                         {"n_kv_head", 2},
                         {"tie_embeddings", true},
                         {"rope_theta", 500000.0},
                         {"norm_eps", 1e-6}});
  tc.validate();
  const ModelConfig m = model_config_for(tc, 40);
  EXPECT_EQ(m.kv_heads(), 2);
  EXPECT_TRUE(m.tie_embeddings);
  EXPECT_EQ(m.rope_theta, 500000.0);
  EXPECT_EQ(m.norm_eps, 1e-6);
  const nlohmann::json saved = ModelConfig::from_json(m.to_json()).to_json();
  EXPECT_EQ(saved, m.to_json());

  nlohmann::json old = TrainConfig{}.to_json();
  for (const char* key : {"n_kv_head", "tie_embeddings", "rope_theta", "norm_eps"}) old.erase(key);
  TrainConfig back;
  apply_config_json(back, old);
  EXPECT_NO_THROW(back.validate());
  const ModelConfig mb = model_config_for(back, 40);
  EXPECT_EQ(mb.kv_heads(), mb.n_head);
  EXPECT_FALSE(mb.tie_embeddings);
  EXPECT_EQ(mb.rope_theta, 10000.0);
  EXPECT_EQ(mb.norm_eps, 1e-5);

  TrainConfig bad;
  bad.n_head = 4;
  bad.n_kv_head = 3;
  try {
    bad.validate();
    ADD_FAILURE() << "n_kv_head 3 of 4 heads accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("n_kv_head"), std::string::npos) << e.what();
  }
  EXPECT_THROW(set_config_value(bad, "tie_embeddings", "yes"), Error);
  EXPECT_THROW(set_config_value(bad, "n_kv_head", 2000), Error);
}
