// Every layer's backward against central finite differences in fp64, on random inputs, plus
// forward checks against naive loops. Each layer's scalar test loss is sum(out * R) for a fixed
// random R, so the gradient flowing into backward is R.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "grad_check.h"
#include "helpers.h"
#include "pion/core/error.h"
#include "pion/model/layers.h"

using namespace pion;
using namespace pion::layers;
using test::dot;
using test::fd_rel_error;
using test::random_ids;
using test::random_vector;

namespace {
constexpr double kTol = 1e-7;
}  // namespace

TEST(Layers, EmbeddingGradient) {
  const i64 v = 7, c = 5, n = 12;
  auto table = random_vector(v * c, 1);
  auto tokens = random_ids(n, v, 2);
  tokens[3] = tokens[7] = tokens[9];  // repeated tokens must accumulate
  auto r = random_vector(n * c, 3);
  std::vector<double> out(n * c);
  auto loss = [&] {
    embedding_forward(out.data(), tokens.data(), table.data(), n, c);
    return dot(out, r);
  };
  loss();
  for (i64 i = 0; i < n; ++i)
    for (i64 j = 0; j < c; ++j) EXPECT_EQ(out[i * c + j], table[tokens[i] * c + j]);
  std::vector<double> dtable(v * c, 0.0);
  embedding_backward(dtable.data(), r.data(), tokens.data(), n, c);
  double err = fd_rel_error(table, dtable, loss);
  EXPECT_LT(err, kTol);
  std::printf("[grad] embedding: %.2e\n", err);
}

TEST(Layers, RmsNormGradient) {
  const i64 n = 4, c = 6;
  auto x = random_vector(n * c, 10, 2.0);
  auto w = random_vector(c, 11);
  auto r = random_vector(n * c, 12);
  std::vector<double> out(n * c), rstd(n);
  auto loss = [&] {
    rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), n, c, 1e-5);
    return dot(out, r);
  };
  loss();
  for (i64 i = 0; i < n; ++i) {
    double ms = 0;
    for (i64 j = 0; j < c; ++j) ms += x[i * c + j] * x[i * c + j] / c;
    for (i64 j = 0; j < c; ++j)
      EXPECT_NEAR(out[i * c + j], w[j] * x[i * c + j] / std::sqrt(ms + 1e-5), 1e-12);
  }
  std::vector<double> dx(n * c, 0.0), dw(c, 0.0);
  rmsnorm_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), rstd.data(), n, c);
  double ex = fd_rel_error(x, dx, loss), ew = fd_rel_error(w, dw, loss);
  EXPECT_LT(ex, kTol);
  EXPECT_LT(ew, kTol);
  std::printf("[grad] rmsnorm: dx %.2e dweight %.2e\n", ex, ew);
}

TEST(Layers, LinearForwardAndGradient) {
  const i64 n = 5, din = 4, dout = 3;
  auto x = random_vector(n * din, 20);
  auto w = random_vector(dout * din, 21);
  auto r = random_vector(n * dout, 22);
  std::vector<double> out(n * dout);
  auto loss = [&] {
    linear_forward(out.data(), x.data(), w.data(), n, din, dout);
    return dot(out, r);
  };
  loss();
  for (i64 i = 0; i < n; ++i)
    for (i64 o = 0; o < dout; ++o) {
      double s = 0;
      for (i64 k = 0; k < din; ++k) s += x[i * din + k] * w[o * din + k];  // W is [out, in]
      EXPECT_NEAR(out[i * dout + o], s, 1e-12);
    }
  std::vector<double> dx(n * din, 0.0), dw(dout * din, 0.0);
  linear_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), n, din, dout);
  double ex = fd_rel_error(x, dx, loss), ew = fd_rel_error(w, dw, loss);
  EXPECT_LT(ex, kTol);
  EXPECT_LT(ew, kTol);
  std::printf("[grad] linear: dx %.2e dweight %.2e\n", ex, ew);
  // Backward accumulates: a second call doubles the gradients.
  std::vector<double> dx2 = dx;
  linear_backward(dx2.data(), dw.data(), r.data(), x.data(), w.data(), n, din, dout);
  for (std::size_t i = 0; i < dx.size(); ++i) EXPECT_NEAR(dx2[i], 2 * dx[i], 1e-12);
}

TEST(Layers, RopeMatchesRotateHalfAndIsRelative) {
  const i64 b = 2, t = 5, h = 2, hd = 6, stride = 3 * h * hd;  // q inside a fused qkv row
  const double theta = 10000.0;
  auto table = make_rope_table<double>(t, hd, theta);
  auto x = random_vector(b * t * stride, 30);
  auto y = x;
  rope_forward(y.data(), table, b, t, h, hd, stride);
  for (i64 row = 0; row < b * t; ++row) {
    const i64 pos = row % t;
    for (i64 j = 0; j < stride; ++j) {
      const i64 idx = row * stride + j;
      if (j >= h * hd) {  // k and v parts are not touched
        EXPECT_EQ(y[idx], x[idx]);
        continue;
      }
      const i64 i = j % hd, half = hd / 2, pair = i % half;
      const double angle = pos * std::pow(theta, -2.0 * pair / hd);
      // rotate_half(x) = [-x2, x1]: y = x cos + rotate_half(x) sin.
      const double partner = i < half ? -x[idx + half] : x[idx - half];
      EXPECT_NEAR(y[idx], x[idx] * std::cos(angle) + partner * std::sin(angle), 1e-12);
    }
  }
  // q(t) . k(s) after RoPE depends only on t - s.
  auto q = random_vector(hd, 31), k = random_vector(hd, 32);
  auto rotated_dot = [&](i64 tq, i64 tk) {
    std::vector<double> a(t * hd, 0.0), c(t * hd, 0.0);
    std::copy(q.begin(), q.end(), a.begin() + tq * hd);
    std::copy(k.begin(), k.end(), c.begin() + tk * hd);
    rope_forward(a.data(), table, 1, t, 1, hd, hd);
    rope_forward(c.data(), table, 1, t, 1, hd, hd);
    return dot(std::span(a).subspan(tq * hd, hd), std::span(c).subspan(tk * hd, hd));
  };
  EXPECT_NEAR(rotated_dot(3, 1), rotated_dot(4, 2), 1e-12);
  EXPECT_GT(std::abs(rotated_dot(3, 1) - rotated_dot(3, 2)), 1e-6);
}

TEST(Layers, RopeGradient) {
  const i64 b = 2, t = 4, h = 2, hd = 4, stride = h * hd;
  auto table = make_rope_table<double>(t, hd, 10000.0);
  auto x = random_vector(b * t * stride, 40);
  auto r = random_vector(b * t * stride, 41);
  auto loss = [&] {
    auto y = x;
    rope_forward(y.data(), table, b, t, h, hd, stride);
    return dot(y, r);
  };
  auto dx = r;
  rope_backward(dx.data(), table, b, t, h, hd, stride);
  double e = fd_rel_error(x, dx, loss);
  EXPECT_LT(e, kTol);
  std::printf("[grad] rope: %.2e\n", e);
  EXPECT_THROW(rope_forward(x.data(), table, 1, t + 1, h, hd, stride), Error);
}

namespace {
// Naive causal attention on one fused qkv buffer, for checking the GEMM version.
std::vector<double> naive_attention(const std::vector<double>& qkv, i64 b, i64 t, i64 h, i64 hd) {
  const i64 d = h * hd;
  std::vector<double> out(b * t * d, 0.0);
  for (i64 bb = 0; bb < b; ++bb)
    for (i64 hh = 0; hh < h; ++hh)
      for (i64 i = 0; i < t; ++i) {
        std::vector<double> s(i + 1);
        double mx = -1e300;
        for (i64 j = 0; j <= i; ++j) {
          double acc = 0;
          for (i64 e = 0; e < hd; ++e)
            acc += qkv[(bb * t + i) * 3 * d + hh * hd + e] *
                   qkv[(bb * t + j) * 3 * d + d + hh * hd + e];
          s[j] = acc / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (auto& v : s) z += (v = std::exp(v - mx));
        for (i64 j = 0; j <= i; ++j)
          for (i64 e = 0; e < hd; ++e)
            out[(bb * t + i) * d + hh * hd + e] +=
                s[j] / z * qkv[(bb * t + j) * 3 * d + 2 * d + hh * hd + e];
      }
  return out;
}
}  // namespace

TEST(Layers, AttentionForwardGradientAndCausality) {
  const i64 b = 2, t = 5, h = 2, hd = 4, d = h * hd;
  auto qkv = random_vector(b * t * 3 * d, 50);
  auto r = random_vector(b * t * d, 51);
  std::vector<double> out(b * t * d), probs(b * h * t * t);
  auto loss = [&] {
    attention_forward(out.data(), probs.data(), qkv.data(), b, t, h, hd);
    return dot(out, r);
  };
  loss();
  auto ref = naive_attention(qkv, b, t, h, hd);
  for (std::size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], ref[i], 1e-12);
  for (i64 m = 0; m < b * h; ++m)
    for (i64 i = 0; i < t; ++i)
      for (i64 j = i + 1; j < t; ++j) EXPECT_EQ(probs[(m * t + i) * t + j], 0.0);

  std::vector<double> dqkv(qkv.size(), 0.0), scratch(b * h * t * t);
  attention_backward(dqkv.data(), scratch.data(), r.data(), probs.data(), qkv.data(), b, t, h, hd);
  double e = fd_rel_error(qkv, dqkv, loss);
  EXPECT_LT(e, kTol);
  std::printf("[grad] attention: %.2e\n", e);

  // Causality: changing position 3's q, k, v changes no output at positions 0..2.
  loss();
  auto before = out;
  for (i64 j = 0; j < 3 * d; ++j) qkv[(0 * t + 3) * 3 * d + j] += 1.0;
  loss();
  for (i64 i = 0; i < 3; ++i)
    for (i64 j = 0; j < d; ++j) EXPECT_EQ(out[i * d + j], before[i * d + j]);
  double changed = 0;
  for (i64 j = 0; j < d; ++j) changed += std::abs(out[3 * d + j] - before[3 * d + j]);
  EXPECT_GT(changed, 1e-3);
  // ... and the gradient w.r.t. future keys and values is exactly zero for early outputs.
  std::vector<double> r_early(r.size(), 0.0);
  for (i64 j = 0; j < 2 * d; ++j) r_early[j] = r[j];  // only positions 0, 1 of batch 0
  std::fill(dqkv.begin(), dqkv.end(), 0.0);
  attention_backward(dqkv.data(), scratch.data(), r_early.data(), probs.data(), qkv.data(), b, t, h,
                     hd);
  for (i64 pos = 2; pos < t; ++pos)
    for (i64 j = 0; j < 3 * d; ++j) EXPECT_EQ(dqkv[pos * 3 * d + j], 0.0);
}

// Grouped-query attention: the fused row is [q (h heads) | k (g heads) | v (g heads)] and query
// head hh uses K/V head hh / (h / g). Checked against a direct triple loop and finite
// differences (the K/V gradient sums over the group's query heads).
TEST(Layers, GroupedQueryAttentionForwardAndGradient) {
  const i64 b = 2, t = 5, h = 4, hd = 4, d = h * hd;
  for (i64 g : {2, 1}) {
    const i64 kv = g * hd, w = d + 2 * kv, group = h / g;
    auto qkv = random_vector(b * t * w, 56 + g);
    auto r = random_vector(b * t * d, 58);
    std::vector<double> out(b * t * d), probs(b * h * t * t);
    auto loss = [&] {
      attention_forward(out.data(), probs.data(), qkv.data(), b, t, h, hd, g);
      return dot(out, r);
    };
    loss();
    double ferr = 0;
    for (i64 bb = 0; bb < b; ++bb)
      for (i64 hh = 0; hh < h; ++hh)
        for (i64 i = 0; i < t; ++i) {
          const i64 kh = hh / group;
          std::vector<double> s(static_cast<std::size_t>(i + 1));
          double mx = -1e300;
          for (i64 j = 0; j <= i; ++j) {
            double acc = 0;
            for (i64 e = 0; e < hd; ++e)
              acc += qkv[(bb * t + i) * w + hh * hd + e] * qkv[(bb * t + j) * w + d + kh * hd + e];
            s[j] = acc / std::sqrt(static_cast<double>(hd));
            mx = std::max(mx, s[j]);
          }
          double z = 0;
          for (auto& v : s) z += (v = std::exp(v - mx));
          for (i64 e = 0; e < hd; ++e) {
            double o = 0;
            for (i64 j = 0; j <= i; ++j)
              o += s[j] / z * qkv[(bb * t + j) * w + d + kv + kh * hd + e];
            ferr = std::max(ferr, std::abs(o - out[(bb * t + i) * d + hh * hd + e]));
          }
        }
    EXPECT_LT(ferr, 1e-12);
    std::vector<double> dqkv(qkv.size(), 0.0), scratch(b * h * t * t);
    attention_backward(dqkv.data(), scratch.data(), r.data(), probs.data(), qkv.data(), b, t, h, hd,
                       g);
    const double e = fd_rel_error(qkv, dqkv, loss);
    EXPECT_LT(e, kTol);
    std::printf("[grad] grouped-query attention, %lld K/V heads for 4: forward %.2e, grad %.2e\n",
                static_cast<long long>(g), ferr, e);
  }
  std::vector<double> x(1), p(1);
  EXPECT_THROW(attention_forward(x.data(), p.data(), x.data(), 1, 1, 4, 2, i64{3}), Error);
}

TEST(Layers, AttentionFloatMatchesDouble) {
  const i64 b = 3, t = 16, h = 4, hd = 8, d = h * hd;
  auto qkv = random_vector(b * t * 3 * d, 55);
  std::vector<float> qf(qkv.begin(), qkv.end());
  std::vector<double> out(b * t * d), probs(b * h * t * t);
  std::vector<float> outf(out.size()), probsf(probs.size());
  attention_forward(out.data(), probs.data(), qkv.data(), b, t, h, hd);
  attention_forward(outf.data(), probsf.data(), qf.data(), b, t, h, hd);
  for (std::size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(outf[i], out[i], 1e-5);
}

TEST(Layers, SwigluGradient) {
  const i64 n = 4, f = 5;
  auto gu = random_vector(n * 2 * f, 60, 2.0);
  auto r = random_vector(n * f, 61);
  std::vector<double> out(n * f);
  auto loss = [&] {
    swiglu_forward(out.data(), gu.data(), n, f);
    return dot(out, r);
  };
  loss();
  for (i64 i = 0; i < n; ++i)
    for (i64 j = 0; j < f; ++j) {
      const double g = gu[i * 2 * f + j], u = gu[i * 2 * f + f + j];
      EXPECT_NEAR(out[i * f + j], g / (1 + std::exp(-g)) * u, 1e-12);
    }
  std::vector<double> dgu(gu.size(), 0.0);
  swiglu_backward(dgu.data(), r.data(), gu.data(), n, f);
  double e = fd_rel_error(gu, dgu, loss);
  EXPECT_LT(e, kTol);
  std::printf("[grad] swiglu: %.2e\n", e);
}

TEST(Layers, DropoutMaskGradientAndDeterminism) {
  const i64 n = 20000;
  const double p = 0.3;
  std::vector<std::uint8_t> keep(n), keep2(n);
  Rng rng(7), rng2(7);
  make_dropout_mask(keep.data(), n, p, rng);
  make_dropout_mask(keep2.data(), n, p, rng2);
  EXPECT_EQ(keep, keep2);
  double kept = 0;
  for (auto k : keep) kept += k;
  EXPECT_NEAR(kept / n, 1 - p, 0.02);

  const i64 m = 50;
  auto x = random_vector(m, 70);
  auto r = random_vector(m, 71);
  std::vector<double> out(m);
  auto loss = [&] {
    dropout_forward(out.data(), x.data(), keep.data(), m, p);
    return dot(out, r);
  };
  loss();
  for (i64 i = 0; i < m; ++i) EXPECT_NEAR(out[i], keep[i] ? x[i] / (1 - p) : 0.0, 1e-15);
  std::vector<double> dx(m, 0.0);
  dropout_backward(dx.data(), r.data(), keep.data(), m, p);
  double e = fd_rel_error(x, dx, loss);
  EXPECT_LT(e, kTol);
  std::printf("[grad] dropout: %.2e\n", e);
}

TEST(Layers, CrossEntropyWithIgnoredTargets) {
  const i64 n = 7, v = 5;
  auto logits = random_vector(n * v, 80, 2.0);
  std::vector<std::int32_t> targets = {2, -1, 4, 0, -100, 1, 3};
  std::vector<double> lse(n);
  i64 count = 0;
  auto loss = [&] {
    return cross_entropy_forward(lse.data(), logits.data(), targets.data(), n, v, &count);
  };
  const double l = loss();
  EXPECT_EQ(count, 5);
  double ref = 0;
  for (i64 i = 0; i < n; ++i) {
    if (targets[i] < 0) continue;
    double z = 0;
    for (i64 j = 0; j < v; ++j) z += std::exp(logits[i * v + j]);
    ref += std::log(z) - logits[i * v + targets[i]];
  }
  EXPECT_NEAR(l, ref / 5, 1e-12);

  std::vector<double> dl(n * v, 0.0);
  cross_entropy_backward(dl.data(), logits.data(), lse.data(), targets.data(), n, v, 1.0);
  double e = fd_rel_error(logits, dl, loss);
  EXPECT_LT(e, kTol);
  std::printf("[grad] cross-entropy: %.2e\n", e);
  for (i64 j = 0; j < v; ++j) {
    EXPECT_EQ(dl[1 * v + j], 0.0);  // ignored rows get no gradient
    EXPECT_EQ(dl[4 * v + j], 0.0);
  }
  // dloss scales the gradient linearly (recompute lse: the difference loop left it perturbed).
  loss();
  std::vector<double> dl3(n * v, 0.0);
  cross_entropy_backward(dl3.data(), logits.data(), lse.data(), targets.data(), n, v, 3.0);
  for (std::size_t i = 0; i < dl.size(); ++i) EXPECT_NEAR(dl3[i], 3 * dl[i], 1e-14);

  std::vector<std::int32_t> none(n, -1);
  EXPECT_EQ(cross_entropy_forward(lse.data(), logits.data(), none.data(), n, v, &count), 0.0);
  EXPECT_EQ(count, 0);
  std::vector<std::int32_t> bad = targets;
  bad[2] = static_cast<std::int32_t>(v);
  EXPECT_THROW(cross_entropy_forward(lse.data(), logits.data(), bad.data(), n, v), Error);
}

TEST(Layers, FastExpIsAccurate) {
  double worst = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f + 175.0f * static_cast<float>(i) / 200000.0f;
    const double ref = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(fast_exp(x) - ref) / ref);
  }
  EXPECT_LT(worst, 3e-7);
  EXPECT_EQ(fast_exp(-100.0f), 0.0f);
  EXPECT_EQ(fast_exp(0.0f), 1.0f);
  EXPECT_TRUE(std::isnan(fast_exp(std::nanf(""))));
  EXPECT_TRUE(std::isfinite(fast_exp(1000.0f)));
  EXPECT_GT(fast_exp(1000.0f), 1e38f);
  std::printf("[fast_exp] worst relative error on [-87, 88]: %.2e\n", worst);
}

TEST(Layers, AttentionParallelPathMatchesSerial) {
  // Big enough to take the OpenMP path (work >= 2^24); one thread vs several must agree
  // bit for bit, since every (batch, head) task writes its own slice.
  const i64 b = 5, t = 128, h = 4, hd = 64, d = h * hd;
  auto qkv64 = random_vector(b * t * 3 * d, 90);
  auto r64 = random_vector(b * t * d, 91);
  std::vector<float> qkv(qkv64.begin(), qkv64.end()), r(r64.begin(), r64.end());
  auto run = [&](int threads, std::vector<float>& out, std::vector<float>& dqkv) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> probs(b * h * t * t), scratch(probs.size());
    out.assign(b * t * d, 0.0f);
    dqkv.assign(qkv.size(), 0.0f);
    attention_forward(out.data(), probs.data(), qkv.data(), b, t, h, hd);
    attention_backward(dqkv.data(), scratch.data(), r.data(), probs.data(), qkv.data(), b, t, h,
                       hd);
    omp_set_num_threads(saved);
  };
  std::vector<float> out1, d1, out2, d2;
  run(1, out1, d1);
  run(3, out2, d2);
  EXPECT_EQ(out1, out2);
  EXPECT_EQ(d1, d2);
}
