// Learning-rate schedules (values at key steps, computed here from their definitions) and
// hybrid routing: which parameters go to the matrix optimizer, and OptimizerSet stepping,
// skipping and resuming a Muon + AdamW pair as one.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <numbers>
#include <set>

#include "compare.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/safetensors.h"
#include "pion/optim/adamw.h"
#include "pion/optim/hybrid.h"
#include "pion/optim/muon.h"
#include "pion/optim/schedule.h"

using namespace pion;
using test::bitwise_equal;

// ---- schedules
// -----------------------------------------------------------------------------------

namespace {
// The definitions from schedule.h, written out independently of schedule.cpp.
double expected_warmup(std::int64_t step, std::int64_t warmup) {
  return static_cast<double>(step + 1) / static_cast<double>(warmup);
}
double expected_cosine(std::int64_t s, std::int64_t warmup, std::int64_t total, double min_ratio) {
  if (s < warmup) return expected_warmup(s, warmup);
  if (s >= total) return min_ratio;
  const double x = static_cast<double>(s - warmup) / static_cast<double>(total - warmup);
  return min_ratio + (1 - min_ratio) * (1 + std::cos(std::numbers::pi * x)) / 2;
}
}  // namespace

TEST(Schedule, WarmupCosineKeySteps) {
  const std::int64_t warmup = 10, total = 110;
  const double min_ratio = 0.1;
  WarmupCosineSchedule s(warmup, total, min_ratio);
  EXPECT_DOUBLE_EQ(s.factor(0), 0.1);  // first step: 1 / warmup
  EXPECT_DOUBLE_EQ(s.factor(4), 0.5);
  EXPECT_DOUBLE_EQ(s.factor(9), 1.0);       // last warmup step reaches the peak
  EXPECT_DOUBLE_EQ(s.factor(10), 1.0);      // cosine starts at the peak
  EXPECT_NEAR(s.factor(60), 0.55, 1e-12);   // halfway: (1 + min) / 2
  EXPECT_DOUBLE_EQ(s.factor(110), 0.1);     // end
  EXPECT_DOUBLE_EQ(s.factor(100000), 0.1);  // after the end
  for (std::int64_t step = 0; step < 130; ++step)
    EXPECT_NEAR(s.factor(step), expected_cosine(step, warmup, total, min_ratio), 1e-12) << step;
  // Rises through warmup, never rises after it, and never jumps.
  for (std::int64_t step = 1; step < 130; ++step) {
    if (step < warmup) {
      EXPECT_GT(s.factor(step), s.factor(step - 1));
    } else if (step > warmup) {
      EXPECT_LE(s.factor(step), s.factor(step - 1));
    }
    EXPECT_LE(std::fabs(s.factor(step) - s.factor(step - 1)), 0.1 + 1e-12);
  }
}

TEST(Schedule, CosineWithoutWarmupStartsAtThePeak) {
  WarmupCosineSchedule s(0, 50, 0.0);
  EXPECT_DOUBLE_EQ(s.factor(0), 1.0);
  EXPECT_NEAR(s.factor(25), 0.5, 1e-12);
  EXPECT_NEAR(s.factor(49), (1 + std::cos(std::numbers::pi * 49 / 50)) / 2, 1e-12);
  EXPECT_DOUBLE_EQ(s.factor(50), 0.0);
}

TEST(Schedule, WsdKeySteps) {
  // warmup 10, total 100, decay over the last 20% (steps 80..100) from 1 to 0.1.
  WsdSchedule s(10, 100, 0.1, 0.2);
  EXPECT_DOUBLE_EQ(s.factor(0), 0.1);
  EXPECT_DOUBLE_EQ(s.factor(9), 1.0);
  EXPECT_DOUBLE_EQ(s.factor(10), 1.0);
  EXPECT_DOUBLE_EQ(s.factor(50), 1.0);  // stable phase
  EXPECT_DOUBLE_EQ(s.factor(80), 1.0);  // decay starts at the peak
  EXPECT_NEAR(s.factor(90), 0.55, 1e-12);
  EXPECT_NEAR(s.factor(99), 1.0 - 0.9 * 19.0 / 20.0, 1e-12);
  EXPECT_DOUBLE_EQ(s.factor(100), 0.1);
  EXPECT_DOUBLE_EQ(s.factor(5000), 0.1);
  for (std::int64_t step = 81; step <= 100; ++step)
    EXPECT_NEAR(s.factor(step - 1) - s.factor(step), 0.9 / 20.0, 1e-12) << step;  // linear
}

TEST(Schedule, ConstantWithWarmupAndFactory) {
  ConstantSchedule c(5);
  EXPECT_DOUBLE_EQ(c.factor(0), 0.2);
  EXPECT_DOUBLE_EQ(c.factor(4), 1.0);
  EXPECT_DOUBLE_EQ(c.factor(1000000), 1.0);
  EXPECT_DOUBLE_EQ(ConstantSchedule().factor(0), 1.0);

  auto cos = make_schedule("cosine", 10, 110, 0.1);
  auto wsd = make_schedule("wsd", 10, 100, 0.1);
  auto con = make_schedule("constant", 5, 100, 0.1);
  EXPECT_NEAR(cos->factor(60), 0.55, 1e-12);
  EXPECT_DOUBLE_EQ(wsd->factor(50), 1.0);
  EXPECT_NEAR(wsd->factor(90), 0.55, 1e-12);
  EXPECT_DOUBLE_EQ(con->factor(0), 0.2);
  try {
    make_schedule("linear", 0, 10, 0.0);
    FAIL() << "unknown schedule accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cosine"), std::string::npos) << e.what();
  }
  EXPECT_THROW(WarmupCosineSchedule(10, 0, 0.1), Error);
  EXPECT_THROW(WarmupCosineSchedule(10, 100, 1.5), Error);
  EXPECT_THROW(WsdSchedule(10, 100, 0.1, 0.0), Error);
}

TEST(Schedule, LrFactorScalesEveryGroupsBaseLr) {
  Tensor a = test::random_tensor({4, 4}, 1), ga = Tensor::zeros({4, 4});
  Tensor b = test::random_tensor({4}, 2), gb = Tensor::zeros({4});
  AdamW opt;
  opt.add_param_group({{"a", a, ga}}, 0.01, {});
  opt.add_param_group({{"b", b, gb}}, 0.003, {});
  WarmupCosineSchedule s(10, 110, 0.1);
  opt.set_lr_factor(s.factor(0));
  EXPECT_DOUBLE_EQ(opt.groups()[0].lr, 0.01 * 0.1);
  EXPECT_DOUBLE_EQ(opt.groups()[1].lr, 0.003 * 0.1);
  opt.set_lr_factor(s.factor(60));
  EXPECT_NEAR(opt.groups()[1].lr, 0.003 * 0.55, 1e-15);
  EXPECT_DOUBLE_EQ(opt.groups()[1].base_lr, 0.003);
}

// ---- routing
// ---------------------------------------------------------------------------------------

namespace {
Param named(const std::string& name, const Shape& shape) {
  return {name, test::random_tensor(shape, std::hash<std::string>{}(name) % 1000, 0.02),
          Tensor::zeros(shape)};
}
}  // namespace

TEST(Routing, HiddenMatricesGoToTheMatrixOptimizer) {
  const std::vector<Param> params = {
      named("tok_embed.weight", {65, 32}),        named("layers.0.attn_norm.weight", {32}),
      named("layers.0.attn.wq.weight", {32, 32}), named("layers.0.attn.wo.weight", {32, 32}),
      named("layers.0.mlp_norm.weight", {32}),    named("layers.0.mlp.w1.weight", {96, 32}),
      named("layers.0.mlp.w2.weight", {32, 96}),  named("layers.0.mlp.bias", {96}),
      named("final_norm.weight", {32}),           named("lm_head.weight", {65, 32}),
      named("pos_embedding", {64, 32}),
  };
  const std::set<std::string> hidden = {"layers.0.attn.wq.weight", "layers.0.attn.wo.weight",
                                        "layers.0.mlp.w1.weight", "layers.0.mlp.w2.weight"};
  for (const auto& p : params) EXPECT_EQ(is_hidden_matrix(p), hidden.count(p.name) == 1) << p.name;

  RoutedParams routed = route_params(params);
  ASSERT_EQ(routed.matrix.size(), hidden.size());
  ASSERT_EQ(routed.other.size(), params.size() - hidden.size());
  for (const auto& p : routed.matrix) EXPECT_TRUE(hidden.count(p.name)) << p.name;
  // Order is kept, and routed params are views of the same tensors (not copies).
  EXPECT_EQ(routed.matrix.front().name, "layers.0.attn.wq.weight");
  EXPECT_EQ(routed.other.front().name, "tok_embed.weight");
  EXPECT_TRUE(routed.matrix.front().value.same_storage(params[2].value));

  // A custom rule, e.g. to send everything 2-D (embeddings included) to the matrix optimizer.
  RoutedParams all2d = route_params(params, [](const Param& p) { return p.value.ndim() == 2; });
  EXPECT_EQ(all2d.matrix.size(), 7u);

  // The routed groups build a working hybrid: Muon accepts every matrix, AdamW the rest.
  Muon muon;
  AdamW adamw;
  EXPECT_NO_THROW(muon.add_param_group(routed.matrix, 0.02, {}));
  EXPECT_NO_THROW(adamw.add_param_group(routed.other, 1e-3, {}));
  EXPECT_THROW(Muon().add_param_group(routed.other, 0.02, {}), Error);  // norms are 1-D
}

// ---- OptimizerSet: a Muon + AdamW pair stepping as one ------------------------------------------

namespace {

struct Hybrid {
  std::vector<Param> params;
  OptimizerSet set;
};

// A tiny model: an embedding, two hidden matrices, a norm, an LM head.
std::unique_ptr<Hybrid> make_hybrid(std::uint64_t seed) {
  auto h = std::make_unique<Hybrid>();
  const std::vector<std::pair<std::string, Shape>> layout = {{"tok_embed.weight", {30, 16}},
                                                             {"layers.0.wq.weight", {16, 16}},
                                                             {"layers.0.norm.weight", {16}},
                                                             {"layers.0.w1.weight", {40, 16}},
                                                             {"lm_head.weight", {30, 16}}};
  for (std::size_t i = 0; i < layout.size(); ++i)
    h->params.push_back({layout[i].first, test::random_tensor(layout[i].second, seed + i, 0.1),
                         Tensor::zeros(layout[i].second)});
  RoutedParams routed = route_params(h->params);
  auto muon = std::make_unique<Muon>();
  muon->add_param_group(routed.matrix, 0.02, {});
  auto adamw = std::make_unique<AdamW>();
  adamw->add_param_group(routed.other, 3e-3, {});
  h->set.add(std::move(muon));
  h->set.add(std::move(adamw));
  return h;
}

void fill_grads(Hybrid& h, int t) {
  for (std::size_t i = 0; i < h.params.size(); ++i) {
    Param& p = h.params[i];
    Tensor noise = test::random_tensor(p.value.shape(), 700 + t * 10 + i, 0.1);
    for (std::int64_t k = 0; k < p.value.numel(); ++k)
      p.grad.data<float>()[k] = p.value.data<float>()[k] + noise.data<float>()[k];
  }
}

std::vector<Tensor> weights(const Hybrid& h) {
  std::vector<Tensor> w;
  for (const auto& p : h.params) w.push_back(p.value.clone());
  return w;
}

// All state tensors of the set, cloned, keyed "<optimizer>.<param>.<key>".
std::map<std::string, Tensor> set_state(const OptimizerSet& set) {
  std::map<std::string, Tensor> out;
  for (std::size_t i = 0; i < set.optimizers().size(); ++i) {
    const Optimizer& o = *set.optimizers()[i];
    for (const auto& g : o.groups())
      for (const auto& p : g.params)
        if (const StateMap* s = o.state(p.name))
          for (const auto& [key, t] : *s)
            out[std::to_string(i) + "." + p.name + "." + key] = t.clone();
  }
  return out;
}

void expect_same_state(const std::map<std::string, Tensor>& a,
                       const std::map<std::string, Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, t] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_TRUE(bitwise_equal(t, b.at(k))) << k;
  }
}

}  // namespace

TEST(OptimizerSet, NonFiniteGradientInEitherOptimizerSkipsBoth) {
  auto h = make_hybrid(1);
  for (int t = 0; t < 2; ++t) {
    fill_grads(*h, t);
    ASSERT_TRUE(h->set.step());
  }
  // Params 1 and 3 belong to Muon, 0, 2 and 4 to AdamW.
  const std::vector<std::pair<std::size_t, float>> poison = {
      {3, std::numeric_limits<float>::quiet_NaN()},
      {2, std::numeric_limits<float>::infinity()},
      {4, std::numeric_limits<float>::quiet_NaN()}};
  std::int64_t skipped = 0;
  for (const auto& [index, value] : poison) {
    fill_grads(*h, 2);
    h->params[index].grad.data<float>()[3] = value;
    const auto w_before = weights(*h);
    const auto s_before = set_state(h->set);
    EXPECT_FALSE(h->set.step()) << h->params[index].name;
    ++skipped;
    EXPECT_EQ(h->set.skipped_steps(), skipped);
    for (const auto& o : h->set.optimizers()) {
      EXPECT_EQ(o->skipped_steps(), skipped);
      EXPECT_EQ(o->steps(), 2);
    }
    const auto w_after = weights(*h);
    for (std::size_t i = 0; i < w_before.size(); ++i)
      EXPECT_TRUE(bitwise_equal(w_before[i], w_after[i])) << h->params[i].name;
    expect_same_state(s_before, set_state(h->set));
  }
  fill_grads(*h, 2);
  const auto w_before = weights(*h);
  EXPECT_TRUE(h->set.step());
  const auto w_after = weights(*h);
  for (std::size_t i = 0; i < w_before.size(); ++i)
    EXPECT_FALSE(bitwise_equal(w_before[i], w_after[i])) << h->params[i].name;
}

TEST(OptimizerSet, ResumeIsBitExactAndABadFileChangesNothing) {
  WsdSchedule schedule(2, 12, 0.1);
  auto straight = make_hybrid(5);
  for (int t = 0; t < 12; ++t) {
    fill_grads(*straight, t);
    straight->set.set_lr_factor(schedule.factor(t));
    ASSERT_TRUE(straight->set.step());
  }

  auto first = make_hybrid(5);
  for (int t = 0; t < 6; ++t) {
    fill_grads(*first, t);
    first->set.set_lr_factor(schedule.factor(t));
    ASSERT_TRUE(first->set.step());
  }
  const std::string path = test::temp_dir("hybrid") + "/ckpt.safetensors";
  TensorFile ckpt;
  first->set.save_state(ckpt);
  for (const auto& p : first->params) ckpt.tensors["model." + p.name] = p.value;
  save_safetensors(path, ckpt);

  auto resumed = make_hybrid(6);
  // A file whose second optimizer's state is broken must leave the first one as it was too.
  {
    for (int t = 0; t < 1; ++t) {
      fill_grads(*resumed, 100);
      ASSERT_TRUE(resumed->set.step());
    }
    const auto before = set_state(resumed->set);
    TensorFile broken = load_safetensors(path);
    broken.metadata.erase("optim.1.meta");
    EXPECT_THROW(resumed->set.load_state(broken), Error);
    expect_same_state(before, set_state(resumed->set));
    EXPECT_EQ(resumed->set.optimizers()[0]->steps(), 1);
    // Swapped optimizer kinds are rejected too.
    broken = load_safetensors(path);
    std::swap(broken.metadata.at("optim.0.meta"), broken.metadata.at("optim.1.meta"));
    EXPECT_THROW(resumed->set.load_state(broken), Error);
    expect_same_state(before, set_state(resumed->set));
  }
  TensorFile loaded = load_safetensors(path);
  for (auto& p : resumed->params) p.value.copy_from(loaded.tensors.at("model." + p.name));
  resumed->set.load_state(loaded);
  for (int t = 6; t < 12; ++t) {
    fill_grads(*resumed, t);
    resumed->set.set_lr_factor(schedule.factor(t));
    ASSERT_TRUE(resumed->set.step());
  }
  for (std::size_t i = 0; i < straight->params.size(); ++i)
    EXPECT_TRUE(bitwise_equal(straight->params[i].value, resumed->params[i].value))
        << straight->params[i].name;
  expect_same_state(set_state(straight->set), set_state(resumed->set));
}
