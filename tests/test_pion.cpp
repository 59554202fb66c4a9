// Tests of the Pion optimizer: the pure functions of pion_math.h against their definitions,
// the facts the spec states (skew generators, first-order RMS lr*c, descent, E2's upward
// spectral drift), exact retractions and re-anchoring keeping the spectrum, parity with the
// fp64 NumPy reference tests/reference/pion_ref.py, and the optimizer contract (NaN skip,
// bit-exact resume, state checks, 2-D only).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <iostream>
#include <sstream>

#include "compare.h"
#include "helpers.h"
#include "optim/pion_math.h"
#include "optim_fixtures.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/random.h"
#include "pion/core/safetensors.h"
#include "pion/optim/factory.h"
#include "pion/optim/options_json.h"
#include "pion/optim/pion.h"

using namespace pion;
namespace pm = pion::pion_math;
using namespace pion::test;  // compare.h, optim_fixtures.h

namespace {

template <class T>
T at(const Tensor& t, std::int64_t i, std::int64_t j) {
  return t.data<T>()[i * t.cols() + j];
}

// A random skew-symmetric d x d matrix R - R^T.
Tensor random_skew(std::int64_t d, std::uint64_t seed, DType dtype) {
  Tensor r = test::random_tensor({d, d}, seed, 1.0, DType::F64);
  Tensor a = Tensor::empty({d, d}, DType::F64);
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < d; ++j)
      a.data<double>()[i * d + j] = at<double>(r, i, j) - at<double>(r, j, i);
  return a.to(dtype);
}

// a + alpha * b in fp64.
Tensor axpy(const Tensor& a, double alpha, const Tensor& b) {
  Tensor x = a.to(DType::F64), y = b.to(DType::F64);
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data<double>()[i] += alpha * y.data<double>()[i];
  return x;
}

Tensor identity_minus(const Tensor& a) {  // I - a, fp64
  Tensor x = a.to(DType::F64);
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data<double>()[i] = -x.data<double>()[i];
  for (std::int64_t i = 0; i < x.rows(); ++i) x.data<double>()[i * x.cols() + i] += 1.0;
  return x;
}

double spectral_norm(const Tensor& a) {
  return singular_values(a.to(DType::F64)).data<double>()[0];
}

// The direction A = -m / (sqrt(v) + eps) from a parameter's saved moments, in fp64.
Tensor direction_from_state(const StateMap& s, const std::string& side, double eps) {
  Tensor m = s.at("m_" + side).to(DType::F64), v = s.at("v_" + side).to(DType::F64);
  for (std::int64_t i = 0; i < m.numel(); ++i)
    m.data<double>()[i] = -m.data<double>()[i] / (std::sqrt(v.data<double>()[i]) + eps);
  return m;
}

Pion::Options options_with(PionRetraction r, std::int64_t reanchor_every = 0) {
  Pion::Options o;
  o.retraction = r;
  o.reanchor_every = reanchor_every;
  return o;
}

// "W.3", "g.3.7": built with append, which sidesteps a GCC 12 -Wrestrict false positive on
// "literal" + std::to_string(i).
std::string indexed(std::string prefix, std::size_t i) {
  return prefix.append(std::to_string(i));
}
std::string indexed(std::string prefix, std::size_t i, int t) {
  return indexed(prefix, i).append(".").append(std::to_string(t));
}

const PionRetraction kAll[] = {PionRetraction::Taylor2, PionRetraction::Cayley,
                               PionRetraction::Exp};

}  // namespace

// ---- pure functions ---------------------------------------------------------------------

TEST(PionMath, GeneratorsAreExactlySkewAndMatchTheirDefinition) {
  for (auto [m, n] : {std::pair<std::int64_t, std::int64_t>{7, 5}, {5, 9}, {33, 33}}) {
    Tensor w = test::random_tensor({m, n}, 1), g = test::random_tensor({m, n}, 2);
    Tensor g_in = Tensor::empty({n, n}), g_out = Tensor::empty({m, m});
    pm::input_generator(w.data<float>(), g.data<float>(), m, n, g_in.data<float>());
    pm::output_generator(w.data<float>(), g.data<float>(), m, n, g_out.data<float>());
    for (const Tensor* gen : {&g_in, &g_out})
      for (std::int64_t i = 0; i < gen->rows(); ++i)
        for (std::int64_t j = 0; j < gen->cols(); ++j)
          ASSERT_EQ(at<float>(*gen, i, j), -at<float>(*gen, j, i)) << i << "," << j;
    // G_in = W^T g - g^T W and G_out = g W^T - W g^T, as four fp64 products.
    Tensor w64 = w.to(DType::F64), g64 = g.to(DType::F64);
    Tensor want_in = axpy(matmul(w64, g64, Trans::T), -1.0, matmul(g64, w64, Trans::T));
    Tensor want_out =
        axpy(matmul(g64, w64, Trans::N, Trans::T), -1.0, matmul(w64, g64, Trans::N, Trans::T));
    EXPECT_LT(rel_frobenius_diff(g_in, want_in), 1e-6);
    EXPECT_LT(rel_frobenius_diff(g_out, want_out), 1e-6);
    EXPECT_GT(frobenius_norm(want_in), 1.0);  // not vacuous
  }
}

TEST(PionMath, MomentPassMatchesFormulaAndKeepsSkewSymmetry) {
  const std::int64_t d = 70;  // not a multiple of the 32-wide tiles: edge tiles run too
  const pm::MomentCoefficients k{0.8, 0.95, 1e-8};
  Tensor x = test::random_tensor({d, d}, 3);
  Tensor m = random_skew(d, 4, DType::F32);
  Tensor v = Tensor::empty({d, d});
  for (std::int64_t i = 0; i < d; ++i)  // symmetric, positive: like a real second moment
    for (std::int64_t j = 0; j < d; ++j)
      v.data<float>()[i * d + j] = 0.5f + std::abs(at<float>(m, i, j) * at<float>(m, j, i));
  Tensor x0 = x.clone(), m0 = m.clone(), v0 = v.clone();
  pm::update_moments_and_direction(x.data<float>(), m.data<float>(), v.data<float>(), d, k);
  double worst = 0.0;
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < d; ++j) {
      ASSERT_EQ(at<float>(x, i, j), -at<float>(x, j, i));
      ASSERT_EQ(at<float>(m, i, j), -at<float>(m, j, i));
      ASSERT_EQ(at<float>(v, i, j), at<float>(v, j, i));
      const double g = static_cast<double>(at<float>(x0, i, j)) - at<float>(x0, j, i);
      const double mm = k.beta1 * at<float>(m0, i, j) + (1 - k.beta1) * g;
      const double vv = k.beta2 * at<float>(v0, i, j) + (1 - k.beta2) * g * g;
      const double a = -mm / (std::sqrt(vv) + k.eps);
      worst = std::max({worst, std::abs(at<float>(m, i, j) - mm) / (std::abs(mm) + 1e-3),
                        std::abs(at<float>(v, i, j) - vv) / vv,
                        std::abs(at<float>(x, i, j) - a) / (std::abs(a) + 1e-3)});
    }
  EXPECT_LT(worst, 1e-5);
}

TEST(PionMath, FastTaylor2MatchesTheFactorFormInBothOrders) {
  for (auto [m, n] : {std::pair<std::int64_t, std::int64_t>{12, 7}, {6, 11}}) {
    Tensor w = test::random_tensor({m, n}, 5, 1.0, DType::F64);
    Tensor a_out = random_skew(m, 6, DType::F64), a_in = random_skew(n, 7, DType::F64);
    const double s = 0.07;
    // Reference: E2 factors built as matrices and multiplied.
    Tensor f_out = Tensor::empty({m, m}, DType::F64), f_in = Tensor::empty({n, n}, DType::F64);
    std::vector<double> work;
    pm::retraction_factor(PionRetraction::Taylor2, a_out.data<double>(), m, s, f_out.data<double>(),
                          work);
    pm::retraction_factor(PionRetraction::Taylor2, a_in.data<double>(), n, s, f_in.data<double>(),
                          work);
    Tensor want = matmul(matmul(f_out, w), f_in);
    for (bool left_first : {true, false}) {
      Tensor got = w.clone();
      Tensor p = matmul(a_out, w), q = matmul(w, a_in);
      pm::apply_taylor2(got.data<double>(), m, n, a_out.data<double>(), a_in.data<double>(),
                        p.data<double>(), q.data<double>(), s, left_first);
      EXPECT_LT(rel_frobenius_diff(got, want), 1e-13) << "left_first " << left_first;
    }
    EXPECT_GT(rel_frobenius_diff(want, w), 1e-2);  // the update is not the identity
  }
  // The cheaper order goes first: left when d_out >= d_in.
  EXPECT_TRUE(pm::taylor2_left_first(2048, 768));
  EXPECT_FALSE(pm::taylor2_left_first(768, 2048));
}

TEST(PionMath, RetractionFactorsAreWhatTheySay) {
  const std::int64_t d = 20;
  for (DType dtype : {DType::F64, DType::F32}) {
    const bool fp64 = dtype == DType::F64;
    Tensor a = random_skew(d, 8, dtype);
    Tensor a64 = a.to(DType::F64);
    const double s = 3.0 / spectral_norm(a);  // ||sA|| = 3: exp needs squarings
    auto factor = [&](PionRetraction r, double scale) {
      Tensor out = Tensor::empty({d, d}, dtype);
      if (fp64) {
        std::vector<double> work;
        pm::retraction_factor(r, a.data<double>(), d, scale, out.data<double>(), work);
      } else {
        std::vector<float> work;
        pm::retraction_factor(r, a.data<float>(), d, static_cast<float>(scale), out.data<float>(),
                              work);
      }
      return out.to(DType::F64);
    };
    const double tol = fp64 ? 1e-12 : 2e-6;
    Tensor eye64 = eye(d, DType::F64);
    // Cayley and exp are orthogonal.
    for (PionRetraction r : {PionRetraction::Cayley, PionRetraction::Exp}) {
      Tensor f = factor(r, s);
      EXPECT_LT(max_abs_diff(matmul(f, f, Trans::T), eye64), tol) << retraction_name(r);
    }
    // E2 is not: E2^T E2 = I + (sA)^4 / 4 exactly.
    Tensor e2 = factor(PionRetraction::Taylor2, s);
    Tensor sa2 = matmul(a64, a64);
    Tensor want = axpy(eye64, s * s * s * s / 4.0, matmul(sa2, sa2));
    EXPECT_LT(max_abs_diff(matmul(e2, e2, Trans::T), want), fp64 ? 1e-10 : 1e-3);
    EXPECT_GT(max_abs_diff(want, eye64), 1.0);
    // exp(sA) against its Taylor series summed without scaling (||sA|| = 3 converges fast),
    // and exp(sA) exp(-sA) = I.
    Tensor term = eye64.clone(), series = eye64.clone();
    for (int k = 1; k < 60; ++k) {
      term = matmul(term, a64);
      for (std::int64_t i = 0; i < term.numel(); ++i) term.data<double>()[i] *= s / k;
      series = axpy(series, 1.0, term);
    }
    Tensor ex = factor(PionRetraction::Exp, s);
    EXPECT_LT(max_abs_diff(ex, series), fp64 ? 1e-12 : 5e-6);
    EXPECT_LT(max_abs_diff(matmul(ex, factor(PionRetraction::Exp, -s)), eye64), tol);
    // Cayley = (I - sA/2)^-1 (I + sA/2), through linalg's row-major solve.
    Tensor half = a64.clone();
    for (std::int64_t i = 0; i < half.numel(); ++i) half.data<double>()[i] *= s / 2;
    Tensor cay = solve(identity_minus(half), axpy(eye64, 1.0, half));
    EXPECT_LT(max_abs_diff(factor(PionRetraction::Cayley, s), cay), fp64 ? 1e-12 : 5e-6);
  }
}

// ---- the spec's facts, through the optimizer ----------------------------------------------

TEST(Pion, FirstOrderChangeHasRmsLrTimesCWhateverTheGradientScale) {
  const std::int64_t m = 24, n = 16;
  const double lr = 1e-3, c = 0.2;
  std::vector<double> ratios;
  for (double scale : {1e-6, 1.0, 1e6}) {
    Matrix x = random_matrix(m, n, 11);
    for (std::int64_t i = 0; i < x.g.numel(); ++i)
      x.g.data<float>()[i] *= static_cast<float>(scale);
    Tensor w0 = x.w.to(DType::F64);
    Pion opt;
    Pion::Options o;
    o.c = c;
    opt.add_param_group({x.param("w")}, lr, o);
    ASSERT_TRUE(opt.step());
    // First order: s (A_out W + W A_in), from the saved moments; alpha as the spec defines it.
    const StateMap& st = *opt.state("w");
    Tensor a_out = direction_from_state(st, "out", o.eps),
           a_in = direction_from_state(st, "in", o.eps);
    Tensor first = axpy(matmul(a_out, w0), 1.0, matmul(w0, a_in));
    const double alpha = c * std::sqrt(double(m * n)) / (frobenius_norm(first) + o.eps);
    const double first_norm = lr * alpha * frobenius_norm(first);
    EXPECT_NEAR(first_norm / std::sqrt(double(m * n)), lr * c, 1e-9 * lr * c) << scale;
    // The actual change differs from it only by the O(s^2) term.
    const double change = frobenius_norm(axpy(x.w, -1.0, w0));
    ratios.push_back(change / (lr * c * std::sqrt(double(m * n))));
    EXPECT_NEAR(ratios.back(), 1.0, 2e-2) << "gradient scale " << scale;
  }
  EXPECT_NEAR(ratios[0], ratios[2], 1e-3);  // the scale does not matter
}

TEST(Pion, DescendsOnAQuadraticWithTheSameSpectrum) {
  // L = 0.5 ||W - T||^2 with T = U_T diag(sigma(W0)) V_T^T: reachable by rotations alone.
  const std::int64_t m = 24, n = 16;
  Tensor w_init = test::random_tensor({m, n}, 21);
  Svd target_vectors = svd(test::random_tensor({m, n}, 22));
  Tensor sigma = singular_values(w_init);
  Tensor us = target_vectors.u.clone();
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) us.data<float>()[i * n + j] *= sigma.data<float>()[j];
  Tensor target = matmul(us, target_vectors.vt);
  auto loss = [&](const Tensor& w) {
    double f = frobenius_norm(axpy(w, -1.0, target));
    return 0.5 * f * f;
  };
  for (PionRetraction r : kAll) {
    Matrix x{w_init.clone(), Tensor::zeros({m, n})};
    Pion opt;
    opt.add_param_group({x.param("w")}, 0.05, options_with(r));
    const double start = loss(x.w);
    double after_one = 0.0;
    for (int t = 0; t < 300; ++t) {
      Tensor diff = axpy(x.w, -1.0, target).to(DType::F32);
      x.g.copy_from(diff);
      ASSERT_TRUE(opt.step());
      if (t == 0) after_one = loss(x.w);
    }
    const double end = loss(x.w);
    EXPECT_LT(after_one, start) << retraction_name(r);
    EXPECT_LT(end, 0.1 * start) << retraction_name(r) << ": " << start << " -> " << end;
  }
}

TEST(Pion, ExactRetractionsKeepTheSpectrumOver1000Steps) {
  for (PionRetraction r : {PionRetraction::Cayley, PionRetraction::Exp}) {
    for (auto [m, n] : {std::pair<std::int64_t, std::int64_t>{24, 16}, {16, 24}}) {
      const auto [drift, moved] = spectrum_run(options_with(r), m, n, 31);
      EXPECT_LT(drift, 1e-5) << retraction_name(r) << " " << m << "x" << n;
      EXPECT_GT(moved, 0.5) << "the weights should have turned far";
      std::cout << "[pion] " << retraction_name(r) << " " << m << "x" << n
                << " drift after 1000 steps: " << drift << "\n";
    }
  }
}

TEST(Pion, Taylor2DriftIsMeasuredAndWithinTheE2Bound) {
  // E2(sA)^T E2(sA) = I + (sA)^4/4 has eigenvalues in [1, 1 + x^4/4], x = s ||A||_2, so a
  // step can only scale each singular value by a factor in [1, sqrt((1 + x_out^4/4)(1 +
  // x_in^4/4))]. W has N(0, 1) entries, so lr * c is the relative change per step.
  const std::int64_t m = 64, n = 48;
  const int steps = 100;
  for (double lr : {0.05, 0.5}) {
    Matrix x = random_matrix(m, n, 41);
    Tensor sigma0 = singular_values(x.w.to(DType::F64));
    Pion opt;
    const Pion::Options o;
    opt.add_param_group({x.param("w")}, lr, o);
    Rng rng(42);
    double log_bound = 0.0;
    for (int t = 0; t < steps; ++t) {
      fill_normal(x.g, rng);
      Tensor w_before = x.w.to(DType::F64);
      ASSERT_TRUE(opt.step());
      const StateMap& st = *opt.state("w");
      Tensor a_out = direction_from_state(st, "out", o.eps),
             a_in = direction_from_state(st, "in", o.eps);
      const double norm =
          frobenius_norm(axpy(matmul(a_out, w_before), 1.0, matmul(w_before, a_in)));
      const double s = lr * o.c * std::sqrt(double(m * n)) / (norm + o.eps);
      const double x_out = s * spectral_norm(a_out), x_in = s * spectral_norm(a_in);
      log_bound += 0.5 * (std::log1p(std::pow(x_out, 4) / 4) + std::log1p(std::pow(x_in, 4) / 4));
    }
    const double drift = opt.spectrum_drift("w");
    const double bound = std::exp(log_bound);
    Tensor sigma = singular_values(x.w.to(DType::F64));
    const double top = sigma0.data<double>()[0];
    for (std::int64_t i = 0; i < sigma.numel(); ++i) {
      const double s_now = sigma.data<double>()[i], s_init = sigma0.data<double>()[i];
      EXPECT_GE(s_now, s_init - 1e-5 * top) << "E2 never shrinks a singular value; i = " << i;
      EXPECT_LE(s_now, s_init * bound + 1e-5 * top) << "i = " << i;
    }
    EXPECT_LT(drift, bound - 1.0 + 1e-5);
    if (lr >= 0.5) {
      EXPECT_GT(drift, 1e-4) << "E2 should drift measurably at lr " << lr;
    }
    std::ostringstream text;
    text << "taylor2 " << m << "x" << n << ", lr " << lr << ", c " << o.c << ", " << steps
         << " steps of N(0,1) gradients on N(0,1) weights: spectrum drift " << drift
         << " (E2 bound " << bound - 1.0 << ")";
    std::cout << "[pion] " << text.str() << "\n";
    ::testing::Test::RecordProperty(lr >= 0.5 ? "taylor2_drift_lr0.5" : "taylor2_drift_lr0.05",
                                    text.str());
  }
}

TEST(Pion, ReanchoringRestoresTheInitialSpectrum) {
  const std::int64_t m = 24, n = 16;
  const int every = 25;
  Matrix x = random_matrix(m, n, 51);
  Pion opt;
  // lr 1 with c 0.2 turns N(0, 1) weights by 20% per step: E2 drifts fast.
  opt.add_param_group({x.param("w")}, 1.0, options_with(PionRetraction::Taylor2, every));
  Rng rng(52);
  random_steps(opt, every - 1, rng);
  const double before = opt.spectrum_drift("w");
  random_steps(opt, 1, rng);  // step 25 re-anchors
  const double after = opt.spectrum_drift("w");
  random_steps(opt, every - 1, rng);
  const double drifted_again = opt.spectrum_drift("w");
  std::cout << "[pion] taylor2 lr 1 drift before re-anchor " << before << ", right after " << after
            << ", 24 steps later " << drifted_again << "\n";
  EXPECT_GT(before, 1e-3);
  EXPECT_LT(after, 3e-6);
  EXPECT_GT(drifted_again, 100 * after);  // it was the re-anchor, not luck
}

// ---- parity with the fp64 NumPy reference ----------------------------------------------------

TEST(Pion, MatchesTheNumpyReference) {
  if (!test::python_has("numpy")) GTEST_SKIP() << test::python() << " cannot import numpy";
  const std::vector<std::pair<std::int64_t, std::int64_t>> shapes = {{64, 48}, {48, 96}, {33, 33}};
  const int steps = 20;
  const double lr = 0.05;
  const std::string dir = test::temp_dir("pion_ref");
  TensorFile trace;
  Rng rng(61);
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    auto [m, n] = shapes[i];
    Tensor w = Tensor::empty({m, n});
    fill_normal(w, rng, 0.0, 1.0 / std::sqrt(double(n)));
    trace.tensors[indexed("W.", i)] = w;
    for (int t = 0; t < steps; ++t) {
      Tensor g = Tensor::empty({m, n});
      fill_normal(g, rng, 0.3, 1.0);  // a mean keeps the steps correlated, as in training
      trace.tensors[indexed("g.", i, t)] = g;
    }
  }
  save_safetensors(dir + "/trace.safetensors", trace);
  struct Case {
    PionRetraction r;
    std::int64_t reanchor_every;
  };
  for (Case cs : {Case{PionRetraction::Taylor2, 0}, Case{PionRetraction::Cayley, 0},
                  Case{PionRetraction::Exp, 0}, Case{PionRetraction::Taylor2, 7}}) {
    std::vector<Matrix> mats;
    std::vector<Param> params;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      mats.push_back({trace.tensors.at(indexed("W.", i)).clone(),
                      Tensor::empty(trace.tensors.at(indexed("W.", i)).shape())});
      params.push_back(mats.back().param(indexed("w", i)));
    }
    Pion opt;
    opt.add_param_group(params, lr, options_with(cs.r, cs.reanchor_every));
    for (int t = 0; t < steps; ++t) {
      for (std::size_t i = 0; i < shapes.size(); ++i)
        mats[i].g.copy_from(trace.tensors.at(indexed("g.", i, t)));
      ASSERT_TRUE(opt.step());
    }
    std::ostringstream config;
    config << "{\"lr\": " << lr << ", \"retraction\": \"" << retraction_name(cs.r)
           << "\", \"reanchor_every\": " << cs.reanchor_every << "}";
    const std::string out =
        dir + "/out_" + retraction_name(cs.r) + std::to_string(cs.reanchor_every) + ".safetensors";
    auto result = test::run_command(test::python() + " " + test::source_dir() +
                                    "/tests/reference/pion_ref.py " + dir + "/trace.safetensors " +
                                    out + " --config '" + config.str() + "'");
    ASSERT_EQ(result.exit_code, 0) << result.output;
    TensorFile ref = load_safetensors(out);
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const Tensor& w_ref = ref.tensors.at(indexed("W.", i));
      const Tensor& w0 = trace.tensors.at(indexed("W.", i));
      const double moved = frobenius_norm(axpy(w_ref, -1.0, w0));
      const double err = frobenius_norm(axpy(mats[i].w, -1.0, w_ref)) / moved;
      EXPECT_LT(err, 1e-5) << retraction_name(cs.r) << " reanchor " << cs.reanchor_every
                           << " shape " << shapes[i].first << "x" << shapes[i].second;
      EXPECT_GT(moved / frobenius_norm(w0.to(DType::F64)), 0.1);  // the steps did something
      std::cout << "[pion] parity " << retraction_name(cs.r) << " reanchor " << cs.reanchor_every
                << " " << shapes[i].first << "x" << shapes[i].second
                << ": ||W - W_ref|| / ||W_ref - W0|| = " << err << "\n";
    }
  }
}

// ---- optimizer contract -----------------------------------------------------------------

TEST(Pion, NonFiniteGradientSkipsTheStepAndTouchesNothing) {
  Matrix a = random_matrix(12, 8, 71), b = random_matrix(8, 10, 72);
  Pion opt;
  opt.add_param_group({a.param("a"), b.param("b")}, 0.05, Pion::Options{});
  ASSERT_TRUE(opt.step());  // state exists now
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    Tensor wa = a.w.clone(), wb = b.w.clone();
    std::map<std::string, StateMap> saved;
    for (const char* name : {"a", "b"})
      for (const auto& [key, t] : *opt.state(name)) saved[name][key] = t.clone();
    const std::int64_t skipped = opt.skipped_steps(), steps = opt.steps();
    b.g.data<float>()[17] = bad;
    EXPECT_FALSE(opt.step());
    EXPECT_EQ(opt.skipped_steps(), skipped + 1);
    EXPECT_EQ(opt.steps(), steps);
    EXPECT_TRUE(bitwise_equal(a.w, wa));
    EXPECT_TRUE(bitwise_equal(b.w, wb));
    for (const char* name : {"a", "b"})
      for (const auto& [key, t] : *opt.state(name))
        EXPECT_TRUE(bitwise_equal(t, saved[name][key])) << name << "." << key;
    b.g.data<float>()[17] = 0.5f;
  }
  Tensor wa = a.w.clone();
  EXPECT_TRUE(opt.step());
  EXPECT_FALSE(bitwise_equal(a.w, wa));  // a good gradient steps again
}

TEST(Pion, StateDictResumeIsBitExact) {
  const std::string dir = test::temp_dir("pion_state");
  auto make = [](std::vector<Matrix>& mats, Pion& opt) {
    mats = {random_matrix(20, 12, 81), random_matrix(12, 30, 82)};
    Pion::Options o = options_with(PionRetraction::Taylor2, 7);  // a re-anchor on each side
    opt.add_param_group({mats[0].param("a"), mats[1].param("b")}, 0.05, o);
    Pion::Options e = options_with(PionRetraction::Exp);
    e.c = 0.3;
    opt.add_param_group({}, 0.01, e);  // a second group round-trips its options
  };
  auto steps = [](std::vector<Matrix>& mats, Pion& opt, int from, int to) {
    for (int t = from; t < to; ++t) {
      Rng rng(1000 + static_cast<std::uint64_t>(t));  // the gradient depends on t only
      for (auto& x : mats) fill_normal(x.g, rng);
      ASSERT_TRUE(opt.step());
    }
  };
  std::vector<Matrix> straight;
  Pion opt_straight;
  make(straight, opt_straight);
  steps(straight, opt_straight, 0, 20);

  std::vector<Matrix> first;
  Pion opt_first;
  make(first, opt_first);
  steps(first, opt_first, 0, 10);
  TensorFile file;
  opt_first.save_state(file);
  for (std::size_t i = 0; i < first.size(); ++i) file.tensors[indexed("w", i)] = first[i].w;
  save_safetensors(dir + "/ckpt.safetensors", file);
  // Only the five state tensors per matrix are saved (scratch is not state).
  std::size_t state_tensors = 0;
  for (const auto& [key, t] : file.tensors) state_tensors += key.rfind("optim.", 0) == 0;
  EXPECT_EQ(state_tensors, 10u);

  TensorFile loaded = load_safetensors(dir + "/ckpt.safetensors");
  std::vector<Matrix> resumed;
  Pion opt_resumed;
  make(resumed, opt_resumed);
  opt_resumed.groups()[0].lr = 0.123;  // overwritten by the load
  for (std::size_t i = 0; i < resumed.size(); ++i)
    resumed[i].w.copy_from(loaded.tensors.at(indexed("w", i)));
  opt_resumed.load_state(loaded);
  EXPECT_EQ(opt_resumed.steps(), 10);
  EXPECT_EQ(opt_resumed.groups()[0].lr, 0.05);
  EXPECT_EQ(opt_resumed.options(1).retraction, PionRetraction::Exp);
  EXPECT_EQ(opt_resumed.options(1).c, 0.3);
  EXPECT_EQ(opt_resumed.options(0).reanchor_every, 7);
  steps(resumed, opt_resumed, 10, 20);
  for (std::size_t i = 0; i < straight.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(resumed[i].w, straight[i].w)) << "matrix " << i;
    for (const auto& [key, t] : *opt_straight.state(i == 0 ? "a" : "b"))
      EXPECT_TRUE(bitwise_equal(opt_resumed.state(i == 0 ? "a" : "b")->at(key), t)) << key;
  }
}

TEST(Pion, LoadingStateOfTheWrongShapeIsAnError) {
  Matrix x = random_matrix(10, 6, 91);
  Pion opt;
  opt.add_param_group({x.param("w")}, 0.05, Pion::Options{});
  ASSERT_TRUE(opt.step());
  TensorFile file;
  opt.save_state(file);
  // The same name, another shape.
  Matrix y = random_matrix(10, 7, 92);
  Pion other;
  other.add_param_group({y.param("w")}, 0.05, Pion::Options{});
  EXPECT_THROW(other.load_state(file), Error);
  EXPECT_EQ(other.state("w"), nullptr);  // a failed load changes nothing
  // A tampered tensor.
  for (const char* key : {"optim.w.m_in", "optim.w.v_out", "optim.w.sigma0"}) {
    TensorFile bad = file;
    bad.tensors[key] = Tensor::zeros({3, 3});
    try {
      Pion fresh;
      Matrix z = random_matrix(10, 6, 93);
      fresh.add_param_group({z.param("w")}, 0.05, Pion::Options{});
      fresh.load_state(bad);
      ADD_FAILURE() << "loading a wrong-shaped " << key << " did not throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("shape"), std::string::npos) << e.what();
    }
  }
}

TEST(Pion, RejectsWhatItCannotUpdate) {
  Tensor vec = test::random_tensor({16}, 1), cube = test::random_tensor({2, 3, 4}, 2);
  for (const Tensor& t : {vec, cube}) {
    Pion opt;
    try {
      opt.add_param_group({Param{"bias", t, t.clone()}}, 0.01, Pion::Options{});
      ADD_FAILURE() << "a " << t.ndim() << "-D parameter was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("2-D"), std::string::npos) << e.what();
    }
  }
  Matrix x = random_matrix(6, 4, 3);
  auto bad = [&](auto edit) {
    Pion::Options o;
    edit(o);
    Pion opt;
    EXPECT_THROW(opt.add_param_group({x.param("w")}, 0.01, o), Error);
  };
  bad([](Pion::Options& o) { o.beta1 = 1.0; });
  bad([](Pion::Options& o) { o.beta2 = -0.1; });
  bad([](Pion::Options& o) { o.eps = 0.0; });
  bad([](Pion::Options& o) { o.c = 0.0; });
  bad([](Pion::Options& o) { o.reanchor_every = -1; });
  EXPECT_THROW(parse_retraction("cayly"), Error);
  Pion opt;
  opt.add_param_group({x.param("w")}, 0.01, Pion::Options{});
  EXPECT_THROW(opt.spectrum_drift("nope"), Error);
  EXPECT_EQ(opt.spectrum_drift("w"), 0.0);  // before the first step W is its own reference
  nlohmann::json j = opt.group_options(0);
  EXPECT_EQ(j.at("retraction"), "taylor2");
  j["retraction"] = "cayley";
  j["reanchor_every"] = 5;
  opt.set_group_options(0, j);
  EXPECT_EQ(opt.options(0).retraction, PionRetraction::Cayley);
  EXPECT_EQ(opt.options(0).reanchor_every, 5);
  j["retraction"] = "bogus";
  EXPECT_THROW(opt.set_group_options(0, j), Error);
  j.erase("c");
  EXPECT_THROW(opt.set_group_options(0, j), Error);
}

// The one declaration of Pion's options (PionOptions::fields) drives the checkpoint JSON, the
// optim-trace config keys, the state shapes and the checks; these agree with each other.
TEST(Pion, OptionsDeclarationDrivesJsonKeysStateAndChecks) {
  std::vector<std::string> keys = {"lr"};
  for (const std::string& k : option_names<Pion::Options>()) keys.push_back(k);
  EXPECT_EQ(keys, optimizer_config_keys("pion"));

  Pion::Options o;
  o.c = 0.3;
  o.retraction = PionRetraction::Exp;
  o.reanchor_every = 7;
  const nlohmann::json j = options_to_json(o);
  EXPECT_EQ(j.size(), keys.size() - 1);
  EXPECT_EQ(j.at("retraction"), "exp");
  const Pion::Options back = options_from_group_json<Pion::Options>(j, "pion");
  EXPECT_EQ(back.c, 0.3);
  EXPECT_EQ(back.retraction, PionRetraction::Exp);
  EXPECT_EQ(back.reanchor_every, 7);

  o.beta2 = 1.0;
  try {
    validate_options(o, "pion");
    ADD_FAILURE() << "beta2 = 1 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("beta2 must be a finite number in [0, 1)"),
              std::string::npos)
        << e.what();
  }
  nlohmann::json bad = j;
  bad["reanchor_every"] = 2.5;
  EXPECT_THROW(options_from_group_json<Pion::Options>(bad, "pion"), Error);

  Pion opt;
  const std::vector<StateSlot> slots = opt.state_slots({6, 4});
  ASSERT_EQ(slots.size(), 5u);
  EXPECT_EQ(opt.state_shape("m_in", {6, 4}), (Shape{4, 4}));
  EXPECT_EQ(opt.state_shape("v_out", {6, 4}), (Shape{6, 6}));
  EXPECT_EQ(opt.state_shape("sigma0", {6, 4}), (Shape{4}));
  EXPECT_THROW(opt.state_shape("exp_avg", {6, 4}), Error);
}
