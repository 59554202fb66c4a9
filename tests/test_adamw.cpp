// AdamW: parity with torch.optim.AdamW run in float64 (tests/reference/adamw_torch_ref.py), and
// its first step checked against the closed form. Resume, NaN/Inf and bad-state behaviour are
// tested for AdamW and Muon together in test_muon.cpp (OptimizerContract).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "compare.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/safetensors.h"
#include "pion/optim/adamw.h"

using namespace pion;
using test::diff_norm;

namespace {

// Whether /usr/bin/python3 can find the modules, without importing them: importing torch takes
// seconds, and ctest runs every parity case in its own process.
bool modules_installed(const std::string& modules) {
  const std::string code =
      "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) "
      "else 1)";
  return test::run_command(test::python() + " -c '" + code + "' " + modules).exit_code == 0;
}

struct AdamWCase {
  double lr, beta1, beta2, eps, weight_decay, init_std;
};

}  // namespace

class AdamWParity : public ::testing::TestWithParam<AdamWCase> {};

TEST_P(AdamWParity, MatchesTorchAdamWInFloat64) {
  if (!modules_installed("numpy torch"))
    GTEST_SKIP() << "/usr/bin/python3 lacks numpy or torch: cannot run adamw_torch_ref.py";
  const AdamWCase c = GetParam();
  const std::vector<Shape> shapes = {{64, 48}, {48, 96}, {33, 33}, {48}};
  const int steps = 20;
  const std::uint64_t seed = static_cast<std::uint64_t>(c.lr * 1e6) + 17;

  std::vector<Tensor> w0, values, grad_bufs;
  std::vector<Param> params;
  TensorFile in;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    w0.push_back(test::random_tensor(shapes[i], seed + i, c.init_std));
    values.push_back(w0.back().clone());
    grad_bufs.push_back(Tensor::zeros(shapes[i]));
    params.push_back({"p" + std::to_string(i), values.back(), grad_bufs.back()});
    in.tensors["W." + std::to_string(i)] = w0.back();
  }
  AdamW adamw;
  adamw.add_param_group(params, c.lr, {c.beta1, c.beta2, c.eps, c.weight_decay});
  for (int t = 0; t < steps; ++t) {
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      // Gradient scales differ per tensor (1, 0.1, 0.01, ...), as they do across a model.
      Tensor g = test::random_tensor(shapes[i], seed * 1000 + t * 10 + i,
                                     std::pow(10.0, -static_cast<double>(i)));
      in.tensors["g." + std::to_string(i) + "." + std::to_string(t)] = g;
      grad_bufs[i].copy_from(g);
    }
    ASSERT_TRUE(adamw.step());
  }

  const std::string dir = test::temp_dir("adamw_ref");
  save_safetensors(dir + "/in.safetensors", in);
  const nlohmann::json config = {{"lr", c.lr},
                                 {"beta1", c.beta1},
                                 {"beta2", c.beta2},
                                 {"eps", c.eps},
                                 {"weight_decay", c.weight_decay}};
  const std::string cmd = test::python() + " " + test::source_dir() +
                          "/tests/reference/adamw_torch_ref.py " + dir + "/in.safetensors " + dir +
                          "/out.safetensors --config '" + config.dump() + "'";
  auto r = test::run_command(cmd);
  ASSERT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
  TensorFile ref = load_safetensors(dir + "/out.safetensors");

  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const Tensor& w_ref = ref.tensors.at("W." + std::to_string(i));
    ASSERT_EQ(w_ref.shape(), shapes[i]);
    const double moved = diff_norm(w_ref, w0[i]);
    const double rel = diff_norm(values[i], w_ref) / moved;
    std::printf("adamw parity %s lr=%g wd=%g init_std=%g: ||W-W_ref||/||W_ref-W0|| = %.3e\n",
                shape_string(shapes[i]).c_str(), c.lr, c.weight_decay, c.init_std, rel);
    EXPECT_GT(moved, 1e-2);
    EXPECT_LE(rel, 1e-6) << shape_string(shapes[i]);
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, AdamWParity,
                         ::testing::Values(AdamWCase{1e-2, 0.9, 0.999, 1e-8, 0.1, 0.02},
                                           AdamWCase{3e-3, 0.8, 0.95, 1e-6, 0.0, 0.02},
                                           AdamWCase{2e-2, 0.9, 0.99, 1e-8, 0.01, 0.1}),
                         [](const auto& info) { return "Case" + std::to_string(info.index); });

TEST(AdamW, FirstStepMatchesTheClosedForm) {
  // With zero moments, m_hat = g and v_hat = g^2 after one step, so
  // W1 = W0 (1 - lr wd) - lr g / (|g| + eps): about lr * sign(g) per element.
  const double lr = 0.01, wd = 0.1, eps = 1e-3;  // a large eps so it visibly matters
  Tensor w = test::random_tensor({37, 5}, 61), w0 = w.clone();
  Tensor g = test::random_tensor({37, 5}, 62, 0.01);
  AdamW adamw;
  adamw.add_param_group({{"w", w, g}}, lr, {0.9, 0.999, eps, wd});
  ASSERT_TRUE(adamw.step());
  for (std::int64_t i = 0; i < w.numel(); ++i) {
    const double gi = g.data<float>()[i];
    const double expect = w0.data<float>()[i] * (1 - lr * wd) - lr * gi / (std::fabs(gi) + eps);
    EXPECT_NEAR(w.data<float>()[i], expect, 1e-6) << i;
  }
  ASSERT_NE(adamw.state("w"), nullptr);
  EXPECT_EQ(adamw.state("w")->size(), 2u);
}

TEST(AdamW, RejectsBadHyperparameters) {
  Tensor w = Tensor::zeros({4}), g = Tensor::zeros({4});
  AdamW adamw;
  EXPECT_THROW(adamw.add_param_group({{"w", w, g}}, 1e-3, {1.0, 0.999, 1e-8, 0.0}), Error);
  EXPECT_THROW(adamw.add_param_group({{"w", w, g}}, 1e-3, {0.9, 0.999, -1.0, 0.0}), Error);
  EXPECT_THROW(adamw.add_param_group({{"w", w, g}}, -1e-3, {}), Error);
  EXPECT_THROW(adamw.add_param_group({{"w", w, Tensor::zeros({5})}}, 1e-3, {}), Error);
  EXPECT_TRUE(adamw.groups().empty());
}
