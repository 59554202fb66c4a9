// The whole decoder: config checks, parameter layout, an fp64 finite-difference gradient check
// (with and without dropout), float vs double, inits and their spectra, and parity with an
// independent PyTorch model (tests/reference/torch_llama.py) in float64 and float32.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "grad_check.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/safetensors.h"
#include "pion/model/init.h"
#include "pion/model/llama.h"

using namespace pion;

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

std::vector<std::int32_t> random_ids(std::size_t n, int v, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(v)));
  return t;
}

// Largest |a - b| over max |b|, for two same-sized tensors.
double rel_diff(const Tensor& a, const Tensor& b) {
  Tensor x = a.to(DType::F64), y = b.to(DType::F64);
  double err = 0, ref = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    err = std::max(err, std::abs(x.data<double>()[i] - y.data<double>()[i]));
    ref = std::max(ref, std::abs(y.data<double>()[i]));
  }
  return err / std::max(ref, 1e-300);
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

TEST(Llama, GradientMatchesFiniteDifferencesFp64) {
  ModelConfig c = tiny_config();
  Llama<double> model(c);
  Rng rng(1);
  model.init_weights(rng);
  // Non-trivial norm weights, so their gradients are checked away from 1.
  for (auto& p : model.named_params())
    if (p.name.find("norm") != std::string::npos)
      for (double& w : p.value.span<double>()) w = 1.0 + 0.3 * rng.normal();
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
  auto tokens = random_ids(b * t, c.vocab_size, 11);
  auto targets = random_ids(b * t, c.vocab_size, 12);
  md.zero_grad();
  mf.zero_grad();
  const double ld = md.forward(tokens, targets, b, t);
  const double lf = mf.forward(tokens, targets, b, t);
  EXPECT_NEAR(lf, ld, 1e-5 * ld);
  md.backward();
  mf.backward();
  EXPECT_LT(rel_diff(mf.grads(), md.grads()), 1e-4);

  // Two backward(0.5) calls add up to one backward(1).
  Tensor once = md.grads().clone();
  md.zero_grad();
  md.backward(0.5);
  md.backward(0.5);
  EXPECT_LT(rel_diff(md.grads(), once), 1e-13);
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
template <class T>
void check_torch_parity(double loss_tol, double grad_tol, const std::string& norm = "rmsnorm") {
  if (!test::python_has("torch numpy")) {
    GTEST_SKIP() << "PyTorch parity skipped: " << test::python() << " cannot import torch/numpy";
  }
  ModelConfig c;
  c.vocab_size = 13;
  c.n_layer = 2;
  c.n_head = 2;
  c.d_model = 16;
  c.seq_len = 7;
  c.init_std = 0.2;
  c.norm = norm;
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
  const double logit_err = rel_diff(logits, out.tensors.at("logits").reshape({logits.numel()}));
  EXPECT_LT(logit_err, grad_tol);
  double worst = 0;
  for (auto& p : model.named_params()) {
    const double e = rel_diff(p.grad, out.tensors.at("grad." + p.name));
    EXPECT_LT(e, grad_tol) << p.name;
    worst = std::max(worst, e);
  }
  std::printf("[parity %s, norm %s] loss %.2e, logits %.2e, worst gradient %.2e (relative)\n",
              dtype_name(dtype_of<T>()), norm.c_str(), loss_err, logit_err, worst);
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
  for (const auto& e : model.layout())
    EXPECT_EQ(e.name.find("norm"), std::string::npos) << e.name;
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
