// Muon: parity with a NumPy float64 implementation of the spec (tests/reference/muon_ref.py),
// Newton-Schulz properties, argument checks. Then the contract every optimizer keeps, run for
// AdamW and Muon alike: bit-exact resume through a safetensors file, NaN/Inf steps skipped
// with weights and state untouched, and bad saved state rejected with the optimizer unchanged.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <type_traits>

#include "compare.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/safetensors.h"
#include "pion/optim/adamw.h"
#include "pion/optim/muon.h"
#include "pion/optim/schedule.h"

using namespace pion;
using test::bitwise_equal;
using test::diff_norm;

namespace {

// Runs `script` from tests/reference on W.<i>, g.<i>.<t> and returns its W.<i>.
TensorFile run_reference(const std::string& script, const std::vector<Tensor>& w0,
                         const std::vector<std::vector<Tensor>>& grads,
                         const nlohmann::json& config) {
  const std::string dir = test::temp_dir("muon_ref");
  TensorFile in;
  for (std::size_t i = 0; i < w0.size(); ++i) {
    in.tensors["W." + std::to_string(i)] = w0[i];
    for (std::size_t t = 0; t < grads.size(); ++t)
      in.tensors["g." + std::to_string(i) + "." + std::to_string(t)] = grads[t][i];
  }
  save_safetensors(dir + "/in.safetensors", in);
  const std::string cmd = test::python() + " " + test::source_dir() + "/tests/reference/" + script +
                          " " + dir + "/in.safetensors " + dir + "/out.safetensors --config '" +
                          config.dump() + "'";
  auto r = test::run_command(cmd);
  EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
  return load_safetensors(dir + "/out.safetensors");
}

}  // namespace

// ---- parity with the float64 reference -------------------------------------------------------

struct MuonParityCase {
  bool nesterov;
  double weight_decay;
  int ns_steps;
};

class MuonParity : public ::testing::TestWithParam<MuonParityCase> {};

TEST_P(MuonParity, MatchesFloat64Reference) {
  if (!test::python_has("numpy"))
    GTEST_SKIP() << "/usr/bin/python3 lacks numpy: cannot run muon_ref.py";
  const MuonParityCase c = GetParam();
  const std::vector<Shape> shapes = {{64, 48}, {48, 96}, {33, 33}};
  const int steps = 20;
  const double lr = 0.02, momentum = 0.95;
  const std::uint64_t seed =
      100 + static_cast<std::uint64_t>(c.ns_steps) * 7 + (c.nesterov ? 1 : 0);

  std::vector<Tensor> w0, values, grad_bufs;
  std::vector<Param> params;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    w0.push_back(test::random_tensor(shapes[i], seed + i, 0.1));
    values.push_back(w0.back().clone());
    grad_bufs.push_back(Tensor::zeros(shapes[i]));
    params.push_back({"w" + std::to_string(i), values.back(), grad_bufs.back()});
  }
  // Gradient scales differ per matrix: Muon normalises them away, so parity must hold anyway.
  std::vector<std::vector<Tensor>> grads(steps);
  for (int t = 0; t < steps; ++t)
    for (std::size_t i = 0; i < shapes.size(); ++i)
      grads[t].push_back(test::random_tensor(shapes[i], seed * 1000 + t * 10 + i,
                                             std::pow(10.0, -static_cast<double>(i))));

  Muon muon;
  muon.add_param_group(params, lr, {momentum, c.nesterov, c.ns_steps, c.weight_decay, 1e-7});
  for (int t = 0; t < steps; ++t) {
    for (std::size_t i = 0; i < shapes.size(); ++i) grad_bufs[i].copy_from(grads[t][i]);
    ASSERT_TRUE(muon.step());
  }

  TensorFile ref = run_reference("muon_ref.py", w0, grads,
                                 {{"lr", lr},
                                  {"momentum", momentum},
                                  {"nesterov", c.nesterov},
                                  {"ns_steps", c.ns_steps},
                                  {"weight_decay", c.weight_decay}});
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const Tensor& w_ref = ref.tensors.at("W." + std::to_string(i));
    const double moved = diff_norm(w_ref, w0[i]);
    const double rel = diff_norm(values[i], w_ref) / moved;
    std::printf(
        "muon parity %s nesterov=%d wd=%g ns=%d: ||W-W_ref||/||W_ref-W0|| = %.3e (moved %.3g)\n",
        shape_string(shapes[i]).c_str(), c.nesterov, c.weight_decay, c.ns_steps, rel, moved);
    EXPECT_GT(moved, 1e-2);  // the run really moved the weights
    EXPECT_LE(rel, 1e-4) << shape_string(shapes[i]);
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, MuonParity,
                         ::testing::Values(MuonParityCase{true, 0.0, 5},
                                           MuonParityCase{true, 0.1, 5},
                                           MuonParityCase{false, 0.05, 3}),
                         [](const auto& info) {
                           const MuonParityCase& c = info.param;
                           return std::string(c.nesterov ? "Nesterov" : "Plain") + "_wd" +
                                  std::to_string(static_cast<int>(c.weight_decay * 100)) + "_ns" +
                                  std::to_string(c.ns_steps);
                         });

// ---- Newton-Schulz -----------------------------------------------------------------------------

TEST(NewtonSchulz, SingularValuesLandInABandAroundOne) {
  // Rectangular random inputs at very different scales: the Frobenius normalisation makes the
  // result scale-free, and the quintic pushes every singular value into about [0.68, 1.14].
  const std::vector<Shape> shapes = {{64, 48}, {48, 96}, {128, 32}, {20, 70}};
  for (std::size_t k = 0; k < shapes.size(); ++k) {
    const double scale = std::pow(10.0, static_cast<double>(k) * 2.0 - 3.0);
    Tensor g = test::random_tensor(shapes[k], 40 + k, scale);
    Tensor s = singular_values(newton_schulz5(g));
    const float* sv = s.data<float>();
    const auto [lo, hi] = std::minmax_element(sv, sv + s.numel());
    std::printf("NS %s (input scale %g): singular values in [%.4f, %.4f]\n",
                shape_string(shapes[k]).c_str(), scale, *lo, *hi);
    EXPECT_GE(*lo, 0.65f) << shape_string(shapes[k]);
    EXPECT_LE(*hi, 1.2f) << shape_string(shapes[k]);
    // The input's singular values span a wide range; the output's do not.
    Tensor sg = singular_values(g);
    EXPECT_GT(sg.data<float>()[0] / sg.data<float>()[sg.numel() - 1], 1.5f);
  }
}

TEST(NewtonSchulz, KeepsTheSingularVectorsOfTheInput) {
  // NS applies an odd polynomial to the singular values: G = U S V^T -> O = U f(S) V^T, so
  // O^T G = V f(S) S V^T is symmetric positive semi-definite. A wrong transpose breaks this.
  for (const Shape& shape : {Shape{40, 24}, Shape{24, 40}}) {
    Tensor g = test::random_tensor(shape, 7);
    Tensor o = newton_schulz5(g);
    Tensor otg = matmul(o, g, Trans::T, Trans::N);
    const double asym = diff_norm(otg, transpose(otg)) / frobenius_norm(otg);
    EXPECT_LT(asym, 1e-5) << shape_string(shape);
    const std::int64_t n = otg.rows();
    for (std::int64_t i = 0; i < n; ++i) EXPECT_GT(otg.data<float>()[i * n + i], 0.0f);
  }
}

TEST(NewtonSchulz, TallInputIsTheTransposeOfTheWideResult) {
  Tensor g = test::random_tensor({50, 20}, 8);
  Tensor tall = newton_schulz5(g);
  Tensor wide = newton_schulz5(transpose(g));
  EXPECT_LT(diff_norm(tall, transpose(wide)) / frobenius_norm(tall), 1e-5);
  EXPECT_THROW(newton_schulz5(Tensor::zeros({3, 4, 5})), Error);
}

// ---- Muon behaviour ---------------------------------------------------------------------------

TEST(Muon, RejectsNonMatrixParamsAndBadOptions) {
  Tensor v1 = Tensor::zeros({8}), g1 = Tensor::zeros({8});
  Tensor v3 = Tensor::zeros({2, 3, 4}), g3 = Tensor::zeros({2, 3, 4});
  Tensor v2 = Tensor::zeros({4, 4}), g2 = Tensor::zeros({4, 4});
  Muon muon;
  try {
    muon.add_param_group({{"norm.weight", v1, g1}}, 0.02, {});
    FAIL() << "a 1-D parameter was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("norm.weight"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("AdamW"), std::string::npos) << e.what();
  }
  EXPECT_THROW(muon.add_param_group({{"conv", v3, g3}}, 0.02, {}), Error);
  Muon::Options bad;
  bad.momentum = 1.0;
  EXPECT_THROW(muon.add_param_group({{"w", v2, g2}}, 0.02, bad), Error);
  bad = {};
  bad.ns_steps = 0;
  EXPECT_THROW(muon.add_param_group({{"w", v2, g2}}, 0.02, bad), Error);
  bad = {};
  bad.eps = 0.0;
  EXPECT_THROW(muon.add_param_group({{"w", v2, g2}}, 0.02, bad), Error);
  EXPECT_TRUE(muon.groups().empty());
}

TEST(Muon, LeavesTheGradientAloneAndScalesTallUpdates) {
  // One step from zero momentum with nesterov gives U = (1 - beta^2) g, which the
  // normalisation cancels, so ||W1 - W0||_F = lr * sqrt(max(1, rows/cols)) * ||NS(g)||_F.
  for (const Shape& shape : {Shape{96, 24}, Shape{24, 96}}) {
    Tensor w = test::random_tensor(shape, 3, 0.1), w0 = w.clone();
    Tensor g = test::random_tensor(shape, 4), g0 = g.clone();
    Muon muon;
    muon.add_param_group({{"w", w, g}}, 0.05, {});
    ASSERT_TRUE(muon.step());
    EXPECT_TRUE(bitwise_equal(g, g0));
    const double expect = 0.05 *
                          std::sqrt(std::max(1.0, static_cast<double>(shape[0]) / shape[1])) *
                          frobenius_norm(newton_schulz5(g));
    EXPECT_NEAR(diff_norm(w, w0) / expect, 1.0, 1e-4) << shape_string(shape);
  }
}

TEST(Muon, ZeroGradientLeavesWeightsFinite) {
  Tensor w = test::random_tensor({16, 8}, 5), w0 = w.clone();
  Tensor g = Tensor::zeros({16, 8});
  Muon muon;
  muon.add_param_group({{"w", w, g}}, 0.02, {});
  ASSERT_TRUE(muon.step());
  EXPECT_TRUE(bitwise_equal(w, w0));  // eps keeps 0 / (0 + eps) = 0, and wd is 0
}

// ---- the optimizer contract, for AdamW and Muon ------------------------------------------------

namespace {

// A small model's parameters as views into one value buffer and one gradient buffer (the way
// the trainer lays them out), so the tests also cover optimizers working on views.
struct Model {
  Tensor values, grads;
  std::vector<Param> params;
};

template <class Opt>
std::vector<Shape> model_shapes() {
  if constexpr (std::is_same_v<Opt, Muon>)
    return {{24, 16}, {16, 40}, {20, 20}};
  else
    return {{24, 16}, {16}, {16, 40}, {40}};
}

template <class Opt>
Model make_model(std::uint64_t seed) {
  const auto shapes = model_shapes<Opt>();
  std::int64_t total = 0;
  for (const auto& s : shapes) total += shape_numel(s);
  Model m{test::random_tensor({total}, seed, 0.1), Tensor::zeros({total}), {}};
  std::int64_t off = 0;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    m.params.push_back({"layer" + std::to_string(i) + ".weight", m.values.view(off, shapes[i]),
                        m.grads.view(off, shapes[i])});
    off += shape_numel(shapes[i]);
  }
  return m;
}

template <class Opt>
typename Opt::Options non_default_options() {
  typename Opt::Options o;
  if constexpr (std::is_same_v<Opt, Muon>) {
    o.momentum = 0.9;
    o.weight_decay = 0.05;
  } else {
    o.beta1 = 0.8;
    o.beta2 = 0.95;
    o.weight_decay = 0.1;
  }
  return o;
}

template <class Opt>
std::unique_ptr<Opt> make_optimizer(Model& m, const typename Opt::Options& options) {
  auto opt = std::make_unique<Opt>();
  // Two groups with different learning rates, as hybrid setups use.
  std::vector<Param> first(m.params.begin(), m.params.begin() + 2);
  std::vector<Param> second(m.params.begin() + 2, m.params.end());
  opt->add_param_group(first, 0.02, options);
  opt->add_param_group(second, 0.005, options);
  return opt;
}

// The gradient at step t depends on the weights (a quadratic pull towards a fixed target plus
// noise), so a resumed run only matches if the weights were restored exactly too.
void compute_grads(Model& m, int t) {
  Tensor target = test::random_tensor(m.values.shape(), 999, 0.5);
  Tensor noise = test::random_tensor(m.values.shape(), 5000 + static_cast<std::uint64_t>(t), 0.3);
  for (std::int64_t i = 0; i < m.values.numel(); ++i)
    m.grads.data<float>()[i] =
        m.values.data<float>()[i] - target.data<float>()[i] + noise.data<float>()[i];
}

void train(Optimizer& opt, Model& m, int from, int to, const Schedule& schedule) {
  for (int t = from; t < to; ++t) {
    compute_grads(m, t);
    opt.set_lr_factor(schedule.factor(t));
    ASSERT_TRUE(opt.step()) << "step " << t;
  }
}

// Everything observable about an optimizer, for "bitwise unchanged" checks.
struct Snapshot {
  std::map<std::string, Tensor> state;
  std::int64_t steps, skipped;
  std::vector<double> lrs;
  std::vector<std::string> options;
};

Snapshot snapshot(const Optimizer& opt) {
  Snapshot s{{}, opt.steps(), opt.skipped_steps(), {}, {}};
  for (std::size_t g = 0; g < opt.groups().size(); ++g) {
    s.lrs.push_back(opt.groups()[g].lr);
    s.options.push_back(opt.group_options(g).dump());
    for (const auto& p : opt.groups()[g].params)
      if (const StateMap* st = opt.state(p.name))
        for (const auto& [key, t] : *st) s.state[p.name + "." + key] = t.clone();
  }
  return s;
}

void expect_same(const Snapshot& a, const Snapshot& b) {
  EXPECT_EQ(a.steps, b.steps);
  EXPECT_EQ(a.skipped, b.skipped);
  EXPECT_EQ(a.lrs, b.lrs);
  EXPECT_EQ(a.options, b.options);
  ASSERT_EQ(a.state.size(), b.state.size());
  for (const auto& [key, t] : a.state) {
    ASSERT_TRUE(b.state.count(key)) << key;
    EXPECT_TRUE(bitwise_equal(t, b.state.at(key))) << key;
  }
}

}  // namespace

template <class Opt>
class OptimizerContract : public ::testing::Test {};
using Optimizers = ::testing::Types<AdamW, Muon>;
TYPED_TEST_SUITE(OptimizerContract, Optimizers);

TYPED_TEST(OptimizerContract, ResumeFromFileIsBitExact) {
  using Opt = TypeParam;
  WarmupCosineSchedule schedule(4, 20, 0.1);
  const auto options = non_default_options<Opt>();

  Model straight = make_model<Opt>(11);
  auto a = make_optimizer<Opt>(straight, options);
  train(*a, straight, 0, 20, schedule);

  Model first = make_model<Opt>(11);
  auto b = make_optimizer<Opt>(first, options);
  train(*b, first, 0, 10, schedule);
  const std::string path = test::temp_dir("resume") + "/ckpt.safetensors";
  {
    TensorFile ckpt;
    b->save_state(ckpt);
    for (const auto& p : first.params) ckpt.tensors["model." + p.name] = p.value;
    save_safetensors(path, ckpt);
  }

  // A fresh run: other initial weights and default hyperparameters, all replaced by the file.
  Model resumed = make_model<Opt>(12);
  auto c = make_optimizer<Opt>(resumed, typename Opt::Options{});
  TensorFile ckpt = load_safetensors(path);
  for (auto& p : resumed.params) p.value.copy_from(ckpt.tensors.at("model." + p.name));
  c->load_state(ckpt);
  EXPECT_EQ(c->steps(), 10);
  EXPECT_EQ(c->group_options(0), a->group_options(0));
  train(*c, resumed, 10, 20, schedule);

  EXPECT_TRUE(bitwise_equal(resumed.values, straight.values))
      << "max |diff| " << max_abs_diff(resumed.values, straight.values);
  expect_same(snapshot(*c), snapshot(*a));
  EXPECT_GT(diff_norm(straight.values, make_model<Opt>(11).values), 1e-2);  // it trained
}

TYPED_TEST(OptimizerContract, NonFiniteGradientsSkipTheStepAndTouchNothing) {
  using Opt = TypeParam;
  ConstantSchedule schedule;
  Model m = make_model<Opt>(21);
  auto opt = make_optimizer<Opt>(m, non_default_options<Opt>());
  train(*opt, m, 0, 3, schedule);

  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
  std::int64_t expected_skips = 0;
  for (std::size_t k = 0; k < 3; ++k) {
    compute_grads(m, 3);
    // A different parameter and position each time, including the very last element.
    Param& p = m.params[k % m.params.size()];
    const std::int64_t pos = k == 2 ? p.grad.numel() - 1 : static_cast<std::int64_t>(k * 7);
    p.grad.data<float>()[pos] = bad_values[k];
    const Tensor weights = m.values.clone();
    const Snapshot before = snapshot(*opt);
    EXPECT_FALSE(opt->step());
    ++expected_skips;
    EXPECT_EQ(opt->skipped_steps(), expected_skips);
    EXPECT_TRUE(bitwise_equal(m.values, weights));
    Snapshot after = snapshot(*opt);
    after.skipped = before.skipped;  // the only thing allowed to change
    expect_same(before, after);
  }
  // A finite gradient steps normally again.
  compute_grads(m, 4);
  const Tensor weights = m.values.clone();
  EXPECT_TRUE(opt->step());
  EXPECT_EQ(opt->steps(), 4);
  EXPECT_FALSE(bitwise_equal(m.values, weights));
}

namespace {
// The other optimizer kind over the same parameters (for the "wrong kind" case).
template <class Opt>
std::unique_ptr<Optimizer> other_kind(Model& m) {
  std::unique_ptr<Optimizer> o;
  if constexpr (std::is_same_v<Opt, Muon>) {
    auto a = std::make_unique<AdamW>();
    a->add_param_group({m.params.begin(), m.params.begin() + 2}, 0.02, {});
    a->add_param_group({m.params.begin() + 2, m.params.end()}, 0.02, {});
    o = std::move(a);
  } else {
    // Muon takes only matrices: give it 2-D stand-ins with the same names and sizes.
    auto mu = std::make_unique<Muon>();
    std::vector<Param> first, second;
    for (std::size_t i = 0; i < m.params.size(); ++i) {
      Param p = m.params[i];
      if (p.value.ndim() == 1) {
        p.value = p.value.reshape({1, p.value.numel()});
        p.grad = p.grad.reshape({1, p.grad.numel()});
      }
      (i < 2 ? first : second).push_back(p);
    }
    mu->add_param_group(first, 0.02, {});
    mu->add_param_group(second, 0.02, {});
    o = std::move(mu);
  }
  return o;
}
}  // namespace

TYPED_TEST(OptimizerContract, BadSavedStateIsRejectedAndChangesNothing) {
  using Opt = TypeParam;
  ConstantSchedule schedule;
  // The state to corrupt comes from a run of 5 steps; the target has its own 2-step state.
  Model source_model = make_model<Opt>(31);
  auto source = make_optimizer<Opt>(source_model, non_default_options<Opt>());
  train(*source, source_model, 0, 5, schedule);
  TensorFile good;
  source->save_state(good);

  Model m = make_model<Opt>(32);
  auto target = make_optimizer<Opt>(m, typename Opt::Options{});
  train(*target, m, 0, 2, schedule);
  const Snapshot before = snapshot(*target);

  const std::string first_key = good.tensors.begin()->first;  // "optim.<param>.<state>"
  auto expect_rejected = [&](const TensorFile& file, const std::string& what) {
    EXPECT_THROW(target->load_state(file), Error) << what;
    expect_same(before, snapshot(*target));
  };

  {  // wrong kind
    Model other_model = make_model<Opt>(33);
    auto other = other_kind<Opt>(other_model);
    compute_grads(other_model, 0);
    ASSERT_TRUE(other->step());
    TensorFile f;
    other->save_state(f);
    expect_rejected(f, "wrong kind");
  }
  {  // wrong shape
    TensorFile f = good;
    const Tensor& t = f.tensors.at(first_key);
    f.tensors[first_key] = Tensor::zeros({t.numel() + 1});
    expect_rejected(f, "wrong shape");
  }
  {  // wrong dtype
    TensorFile f = good;
    f.tensors[first_key] = f.tensors.at(first_key).to(DType::F64);
    expect_rejected(f, "wrong dtype");
  }
  {  // one state tensor missing
    TensorFile f = good;
    f.tensors.erase(first_key);
    expect_rejected(f, "missing tensor");
  }
  {  // every state tensor of one parameter missing, though the saved optimizer had stepped
    TensorFile f = good;
    const std::string param_prefix = "optim." + m.params.back().name + ".";
    std::erase_if(f.tensors, [&](const auto& kv) { return kv.first.rfind(param_prefix, 0) == 0; });
    ASSERT_LT(f.tensors.size(), good.tensors.size());
    expect_rejected(f, "missing parameter state");
  }
  {  // a tensor for a parameter this optimizer does not have
    TensorFile f = good;
    f.tensors["optim.nonexistent.weight.exp_avg"] = Tensor::zeros({2});
    expect_rejected(f, "unknown parameter");
  }
  {  // wrong parameter names: the same shapes saved under other names
    Model renamed = make_model<Opt>(34);
    for (auto& p : renamed.params) p.name = "renamed." + p.name;
    auto other = make_optimizer<Opt>(renamed, non_default_options<Opt>());
    compute_grads(renamed, 0);
    ASSERT_TRUE(other->step());
    TensorFile f;
    other->save_state(f);
    expect_rejected(f, "wrong param names");
  }
  {  // metadata missing, not JSON, or with broken hyperparameters
    TensorFile f = good;
    f.metadata.erase("optim.meta");
    expect_rejected(f, "missing meta");
    f.metadata["optim.meta"] = "{not json";
    expect_rejected(f, "bad json");
    nlohmann::json meta = nlohmann::json::parse(good.metadata.at("optim.meta"));
    meta["groups"][1]["options"].erase(meta["groups"][1]["options"].begin());
    f.metadata["optim.meta"] = meta.dump();
    expect_rejected(f, "options missing a key");
    meta = nlohmann::json::parse(good.metadata.at("optim.meta"));
    meta["groups"][0]["lr"] = "fast";
    f.metadata["optim.meta"] = meta.dump();
    expect_rejected(f, "lr not a number");
  }
  // And the good file still loads.
  EXPECT_NO_THROW(target->load_state(good));
  expect_same(snapshot(*source), snapshot(*target));
}
