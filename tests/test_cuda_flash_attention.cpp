// The fused causal attention (include/pion/cuda/flash_attention.h) against the CPU float
// attention (pion::layers::attention_forward / attention_backward) and the GPU's materialised
// attention (pion::cuda::layers::attention_forward / attention_backward), on random inputs:
// - out to ~1e-5 of the reference's largest magnitude, lse against a host fp64 logsumexp;
// - dqkv added into a random (non-zero) starting gradient, so "backward adds" is checked too,
//   both as the total and as the added part alone;
// - outputs, lse and scratch are NaN-filled before each run, so an element left unwritten
//   shows up as a non-finite value;
// - shapes cover seq not a multiple of the tile sizes (32 and 16), seq = 1, head_dim 16 / 32 /
//   64 / 128 and in-between sizes (masked columns), batch > 1 and n_head > 1;
// - grouped-query attention (n_kv_head < n_head, and n_kv_head 1): against the CPU's multi-head
//   attention on the same q with each K/V head repeated over its group (HF's repeat_kv), the
//   reference K/V gradient being the sum of the repeated heads' gradients; the GPU's
//   materialised attention is checked the same way on these shapes;
// - a second run gives identical bits (no atomics), a graph replay too, future tokens never
//   change earlier outputs, and bad arguments throw pion::Error before any launch.
// Every test prints its max relative errors and skips with a clear message when this build
// has no CUDA back end or the machine has no CUDA device (scripts/gpu-check.sh runs them).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "pion/core/error.h"
#include "pion/core/random.h"
#include "pion/model/layers.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/flash_attention.h"
#include "pion/cuda/layers.h"
#endif

#ifndef PION_HAVE_CUDA

TEST(CudaFlashAttention, NeedsCudaBuild) {
  GTEST_SKIP() << "CUDA back end not compiled (PION_CUDA=OFF or no nvcc); configure with "
                  "-DPION_CUDA=ON and run scripts/gpu-check.sh on a GPU machine";
}

#else

namespace {

using i64 = std::int64_t;
namespace cl = pion::cuda::layers;
namespace hl = pion::layers;
using pion::cuda::Context;
using pion::cuda::DeviceBuffer;

#define PION_REQUIRE_CUDA_DEVICE()                                                            \
  if (pion::cuda::device_count() == 0)                                                        \
  GTEST_SKIP() << "no CUDA device: cudaGetDeviceCount reports none (this build has the CUDA " \
                  "back end; run scripts/gpu-check.sh on a machine with an NVIDIA GPU)"

std::vector<float> randn(i64 count, std::uint64_t seed, double std = 1.0) {
  pion::Rng rng(seed);
  std::vector<float> v(static_cast<std::size_t>(count));
  for (float& x : v) x = static_cast<float>(std * rng.normal());
  return v;
}

// A device copy of a host vector, or count NaNs (poison: an unwritten element stays NaN).
struct Dev {
  DeviceBuffer buf;
  explicit Dev(const std::vector<float>& host) : buf(host.size()) {
    buf.upload(host.data(), host.size());
  }
  static Dev poisoned(i64 count) {
    return Dev(std::vector<float>(static_cast<std::size_t>(count),
                                  std::numeric_limits<float>::quiet_NaN()));
  }
  float* get() { return buf.data(); }
  // Waits for the whole device (DeviceBuffer::download synchronises) and copies back.
  std::vector<float> host() const {
    std::vector<float> h(buf.size());
    buf.download(h.data(), h.size());
    return h;
  }
};

// The first count bf16 values of a device buffer (a DeviceBuffer holds floats: two per float).
std::vector<std::uint16_t> bf16_bits(const DeviceBuffer& buf, i64 count) {
  std::vector<float> raw(buf.size());
  buf.download(raw.data(), raw.size());
  std::vector<std::uint16_t> bits(raw.size() * 2);
  std::memcpy(bits.data(), raw.data(), raw.size() * sizeof(float));
  bits.resize(static_cast<std::size_t>(count));
  return bits;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// max |got - ref| / max |ref|, printed; fails above tol, on a size mismatch, on a non-finite
// value (an unwritten, NaN-poisoned element), or when the reference is all zeros.
double expect_close(const std::string& what, const std::vector<float>& got,
                    const std::vector<float>& ref, double tol, const char* ref_name = "cpu") {
  EXPECT_EQ(got.size(), ref.size()) << what;
  if (got.size() != ref.size()) return INFINITY;
  double max_diff = 0.0, max_ref = 0.0;
  std::size_t non_finite = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) ++non_finite;
    max_diff = std::max(max_diff, std::abs(static_cast<double>(got[i]) - ref[i]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(ref[i])));
  }
  const double rel = max_ref > 0.0 ? max_diff / max_ref : INFINITY;
  std::printf("  %-44s vs %s: max|diff| / max|ref| = %.3e (bound %.0e)\n", what.c_str(), ref_name,
              rel, tol);
  EXPECT_EQ(non_finite, 0u) << what << ": NaN or Inf (unwritten elements?)";
  EXPECT_GT(max_ref, 0.0) << what << ": the reference is all zeros";
  EXPECT_LE(rel, tol) << what;
  return rel;
}

// The part a backward added: after - before, in double (for the "added gradient" check).
std::vector<float> added(const std::vector<float>& after, const std::vector<float>& before) {
  std::vector<float> d(after.size());
  for (std::size_t i = 0; i < after.size(); ++i)
    d[i] = static_cast<float>(static_cast<double>(after[i]) - before[i]);
  return d;
}

constexpr double kFp32 = 1e-5;
// Gradients: chained fp32 sums in a different order than the reference's.
constexpr double kFp32Chain = 3e-5;

struct Shape {
  i64 batch, seq, n_head, head_dim;
  i64 n_kv_head = 0;  // 0: n_head (multi-head attention)
  i64 kv_heads() const { return n_kv_head == 0 ? n_head : n_kv_head; }
  i64 group() const { return n_head / kv_heads(); }
  i64 d() const { return n_head * head_dim; }
  i64 kv() const { return kv_heads() * head_dim; }
  i64 width() const { return d() + 2 * kv(); }  // a qkv row: [q | k | v]
  i64 qkv_elements() const { return batch * seq * width(); }
  i64 out_elements() const { return batch * seq * d(); }
  i64 rows() const { return batch * n_head * seq; }
  // The multi-head shape the grouped one is checked against.
  Shape mha() const { return {batch, seq, n_head, head_dim}; }
  std::string label() const {
    return "B" + std::to_string(batch) + " T" + std::to_string(seq) + " H" +
           std::to_string(n_head) +
           (kv_heads() != n_head ? " KV" + std::to_string(kv_heads()) : "") + " hd" +
           std::to_string(head_dim);
  }
};

// Grouped qkv [.., d + 2 kv] -> multi-head qkv [.., 3 d]: query head h gets K/V head h / g
// (HF's repeat_kv). The identity when n_kv_head = n_head.
std::vector<float> repeat_kv(const std::vector<float>& qkv, const Shape& s) {
  const i64 d = s.d(), kv = s.kv(), hd = s.head_dim, g = s.group();
  std::vector<float> out(static_cast<std::size_t>(s.batch * s.seq * 3 * d));
  for (i64 row = 0; row < s.batch * s.seq; ++row) {
    const float* src = qkv.data() + row * s.width();
    float* dst = out.data() + row * 3 * d;
    std::copy(src, src + d, dst);
    for (i64 h = 0; h < s.n_head; ++h)
      for (i64 part = 0; part < 2; ++part)  // k, v
        std::copy_n(src + d + part * kv + (h / g) * hd, hd, dst + (1 + part) * d + h * hd);
  }
  return out;
}

// The transpose of repeat_kv on a gradient: multi-head dqkv [.., 3 d] -> grouped [.., d + 2 kv],
// each K/V head's gradient the sum (in double) of its g query heads' K/V gradients.
std::vector<double> sum_kv_groups(const std::vector<float>& dqkv, const Shape& s) {
  const i64 d = s.d(), kv = s.kv(), hd = s.head_dim, g = s.group();
  std::vector<double> out(static_cast<std::size_t>(s.qkv_elements()), 0.0);
  for (i64 row = 0; row < s.batch * s.seq; ++row) {
    const float* src = dqkv.data() + row * 3 * d;
    double* dst = out.data() + row * s.width();
    for (i64 c = 0; c < d; ++c) dst[c] = src[c];
    for (i64 h = 0; h < s.n_head; ++h)
      for (i64 part = 0; part < 2; ++part)
        for (i64 c = 0; c < hd; ++c)
          dst[d + part * kv + (h / g) * hd + c] += src[(1 + part) * d + h * hd + c];
  }
  return out;
}

// lse [batch, n_head, seq] of the scaled causal scores, in fp64 on the host.
std::vector<float> host_lse(const std::vector<float>& qkv, const Shape& s) {
  const i64 d = s.d(), stride = 3 * d;
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
  std::vector<float> lse(static_cast<std::size_t>(s.rows()));
  std::vector<double> scores(static_cast<std::size_t>(s.seq));
  for (i64 b = 0; b < s.batch; ++b)
    for (i64 h = 0; h < s.n_head; ++h)
      for (i64 i = 0; i < s.seq; ++i) {
        const float* q = qkv.data() + (b * s.seq + i) * stride + h * s.head_dim;
        double mx = -INFINITY;
        for (i64 j = 0; j <= i; ++j) {
          const float* k = qkv.data() + (b * s.seq + j) * stride + d + h * s.head_dim;
          double dot = 0.0;
          for (i64 c = 0; c < s.head_dim; ++c) dot += static_cast<double>(q[c]) * k[c];
          scores[static_cast<std::size_t>(j)] = scale * dot;
          mx = std::max(mx, scale * dot);
        }
        double sum = 0.0;
        for (i64 j = 0; j <= i; ++j) sum += std::exp(scores[static_cast<std::size_t>(j)] - mx);
        lse[static_cast<std::size_t>((b * s.n_head + h) * s.seq + i)] =
            static_cast<float>(mx + std::log(sum));
      }
  return lse;
}

// One flash forward + backward on fresh, NaN-poisoned out / lse / scratch, with dqkv starting
// at dqkv0 (the backward adds into it, or assigns it); results copied back.
struct FlashRun {
  std::vector<float> out, lse, dqkv;
};
FlashRun run_flash(Context& ctx, const Shape& s, Dev& qkv, Dev& dout,
                   const std::vector<float>& dqkv0, cl::GradWrite write = cl::GradWrite::Add) {
  Dev out = Dev::poisoned(s.out_elements());
  Dev lse =
      Dev::poisoned(static_cast<i64>(cl::flash_attention_lse_elements(s.batch, s.seq, s.n_head)));
  Dev scratch = Dev::poisoned(
      static_cast<i64>(cl::flash_attention_scratch_elements(s.batch, s.seq, s.n_head)));
  Dev dqkv(dqkv0);
  cl::flash_attention_forward(ctx, out.get(), lse.get(), qkv.get(), s.batch, s.seq, s.n_head,
                              s.head_dim, s.n_kv_head);
  cl::flash_attention_backward(ctx, dqkv.get(), scratch.get(), dout.get(), out.get(), lse.get(),
                               qkv.get(), s.batch, s.seq, s.n_head, s.head_dim, s.n_kv_head, write);
  return {out.host(), lse.host(), dqkv.host()};
}

// The same with the materialised attention (probs and scratch poisoned too).
FlashRun run_materialized(Context& ctx, const Shape& s, Dev& qkv, Dev& dout,
                          const std::vector<float>& dqkv0,
                          cl::GradWrite write = cl::GradWrite::Add) {
  const i64 nprobs = s.rows() * s.seq;
  Dev out = Dev::poisoned(s.out_elements()), probs = Dev::poisoned(nprobs),
      scratch = Dev::poisoned(nprobs), dqkv(dqkv0);
  cl::attention_forward(ctx, out.get(), probs.get(), qkv.get(), s.batch, s.seq, s.n_head,
                        s.head_dim, s.n_kv_head);
  cl::attention_backward(ctx, dqkv.get(), scratch.get(), dout.get(), probs.get(), qkv.get(),
                         s.batch, s.seq, s.n_head, s.head_dim, s.n_kv_head,
                         cl::MatmulPrecision::Fp32, write);
  return {out.host(), {}, dqkv.host()};
}

// Flash attention against the CPU float layers for one shape; qkv entries ~ N(0, std^2). A
// grouped shape is checked against the CPU multi-head attention on repeat_kv(qkv), its K/V
// gradients summed over each group (sum_kv_groups), and so is the GPU's materialised attention.
void check_against_cpu(const Shape& s, std::uint64_t seed, double std = 1.0) {
  SCOPED_TRACE(s.label());
  std::printf(" %s\n", s.label().c_str());
  const auto qkv = randn(s.qkv_elements(), seed, std);
  const auto dout = randn(s.out_elements(), seed + 1);
  const auto dqkv0 = randn(s.qkv_elements(), seed + 2);

  const bool grouped = s.kv_heads() != s.n_head;
  const Shape m = s.mha();
  const std::size_t nprobs = static_cast<std::size_t>(s.rows() * s.seq);
  std::vector<float> out(static_cast<std::size_t>(s.out_elements())), probs(nprobs),
      scratch(nprobs), dqkv;
  if (!grouped) {
    dqkv = dqkv0;  // the CPU adds into the same starting gradient
    hl::attention_forward(out.data(), probs.data(), qkv.data(), s.batch, s.seq, s.n_head,
                          s.head_dim);
    hl::attention_backward(dqkv.data(), scratch.data(), dout.data(), probs.data(), qkv.data(),
                           s.batch, s.seq, s.n_head, s.head_dim);
  } else {
    const auto wide = repeat_kv(qkv, s);
    std::vector<float> wide_dqkv(static_cast<std::size_t>(m.qkv_elements()), 0.0f);
    hl::attention_forward(out.data(), probs.data(), wide.data(), s.batch, s.seq, s.n_head,
                          s.head_dim);
    hl::attention_backward(wide_dqkv.data(), scratch.data(), dout.data(), probs.data(), wide.data(),
                           s.batch, s.seq, s.n_head, s.head_dim);
    const auto summed = sum_kv_groups(wide_dqkv, s);
    dqkv.resize(dqkv0.size());
    for (std::size_t i = 0; i < dqkv.size(); ++i)
      dqkv[i] = static_cast<float>(dqkv0[i] + summed[i]);
  }
  const auto lse = host_lse(grouped ? repeat_kv(qkv, s) : qkv, m);

  Context ctx;
  Dev d_qkv(qkv), d_dout(dout);
  const FlashRun first = run_flash(ctx, s, d_qkv, d_dout, dqkv0);
  expect_close("flash out", first.out, out, kFp32);
  expect_close("flash lse", first.lse, lse, kFp32, "host fp64");
  expect_close("flash dqkv (start + gradient)", first.dqkv, dqkv, kFp32Chain);
  expect_close("flash dqkv (added gradient)", added(first.dqkv, dqkv0), added(dqkv, dqkv0),
               kFp32Chain);

  // No atomics, fixed orders: the same inputs give the same bits.
  const FlashRun second = run_flash(ctx, s, d_qkv, d_dout, dqkv0);
  EXPECT_TRUE(same_bits(second.out, first.out)) << "out differs between two runs";
  EXPECT_TRUE(same_bits(second.lse, first.lse)) << "lse differs between two runs";
  EXPECT_TRUE(same_bits(second.dqkv, first.dqkv)) << "dqkv differs between two runs";

  // GradWrite::Assign: dqkv = the gradient, whatever it held (NaN: every element is written
  // and none is read).
  const std::vector<float> poison(dqkv0.size(), std::numeric_limits<float>::quiet_NaN());
  const FlashRun assigned = run_flash(ctx, s, d_qkv, d_dout, poison, cl::GradWrite::Assign);
  expect_close("flash dqkv (assigned)", assigned.dqkv, added(dqkv, dqkv0), kFp32Chain);

  if (grouped) {
    const FlashRun mat = run_materialized(ctx, s, d_qkv, d_dout, dqkv0);
    expect_close("materialized out", mat.out, out, kFp32Chain);
    expect_close("materialized dqkv (start + gradient)", mat.dqkv, dqkv, kFp32Chain);
    expect_close("materialized dqkv (added gradient)", added(mat.dqkv, dqkv0), added(dqkv, dqkv0),
                 kFp32Chain);
    const FlashRun again = run_materialized(ctx, s, d_qkv, d_dout, dqkv0);
    EXPECT_TRUE(same_bits(again.dqkv, mat.dqkv)) << "materialized dqkv differs between two runs";
    const FlashRun mat_assigned =
        run_materialized(ctx, s, d_qkv, d_dout, poison, cl::GradWrite::Assign);
    expect_close("materialized dqkv (assigned)", mat_assigned.dqkv, added(dqkv, dqkv0), kFp32Chain);
  }
}

TEST(CudaFlashAttention, RaggedSeqHead64MatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  // 77 and 33: neither a multiple of 32 (forward and backward tiles at head_dim 64).
  check_against_cpu({2, 77, 3, 64}, 100);
  check_against_cpu({1, 33, 2, 64}, 110);
}

TEST(CudaFlashAttention, SingleTokenMatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  check_against_cpu({3, 1, 2, 32}, 200);
  check_against_cpu({1, 1, 1, 128}, 210);
}

TEST(CudaFlashAttention, Head16And32MatchCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  check_against_cpu({2, 50, 2, 16}, 300);  // runs the 32-column kernels, half masked
  check_against_cpu({2, 64, 2, 32}, 310);  // exactly two tiles
}

TEST(CudaFlashAttention, Head128MatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  // head_dim 128: backward tiles of 16; 100 and 47 are multiples of neither 16 nor 32.
  check_against_cpu({1, 100, 2, 128}, 400);
  check_against_cpu({2, 47, 1, 128}, 410);
}

TEST(CudaFlashAttention, OtherHeadDimsMatchCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  // Between the compiled sizes: the unused columns are masked.
  check_against_cpu({2, 41, 3, 48}, 500);
  check_against_cpu({1, 70, 2, 80}, 510);
  check_against_cpu({1, 25, 2, 100}, 520);
  check_against_cpu({2, 19, 2, 7}, 530);
}

TEST(CudaFlashAttention, ManyTilesPeakySoftmaxMatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  // Ten key tiles per row at the end and larger scores (std 1.5: score std ~2.25), so the
  // running max moves often and the rescaling of the online softmax is exercised.
  check_against_cpu({1, 300, 2, 64}, 600, 1.5);
}

// The optional bf16 output (the wo GEMM's operand in a bf16 model): bit for bit
// convert_to_bf16 of the fp32 output, which is unchanged, and within bf16 rounding of the CPU
// layer: rounding to nearest even with 8 significant bits moves y by at most 2^-8 |y|, and the
// GPU's fp32 y differs from the CPU's c by at most e = kFp32 max|c| (checked above), so
// |bf16(y) - c| <= 2^-8 |c| + (1 + 2^-8) e; allowed: 2^-8 |c| + 2 e. Masked columns (head_dim
// 7) and a grouped shape included.
TEST(CudaFlashAttention, WritesBf16OutputCopy) {
  PION_REQUIRE_CUDA_DEVICE();
  for (const Shape s : {Shape{2, 45, 4, 32, 2}, Shape{1, 19, 3, 7}}) {
    SCOPED_TRACE(s.label());
    const auto qkv = randn(s.qkv_elements(), 1200);
    const Shape m = s.mha();
    const auto wide = s.kv_heads() != s.n_head ? repeat_kv(qkv, s) : qkv;
    std::vector<float> out(static_cast<std::size_t>(s.out_elements())),
        probs(static_cast<std::size_t>(m.rows() * s.seq));
    hl::attention_forward(out.data(), probs.data(), wide.data(), s.batch, s.seq, s.n_head,
                          s.head_dim);
    Context ctx;
    const i64 count = s.out_elements();
    Dev d_qkv(qkv), plain = Dev::poisoned(count), with16 = Dev::poisoned(count);
    Dev lse =
        Dev::poisoned(static_cast<i64>(cl::flash_attention_lse_elements(s.batch, s.seq, s.n_head)));
    DeviceBuffer out16((static_cast<std::size_t>(count) + 1) / 2), conv16(out16.size());
    cl::flash_attention_forward(ctx, plain.get(), lse.get(), d_qkv.get(), s.batch, s.seq, s.n_head,
                                s.head_dim, s.n_kv_head);
    cl::flash_attention_forward(ctx, with16.get(), lse.get(), d_qkv.get(), s.batch, s.seq, s.n_head,
                                s.head_dim, s.n_kv_head, out16.data());
    EXPECT_TRUE(same_bits(with16.host(), plain.host())) << "the fp32 output changed";
    cl::convert_to_bf16(ctx, conv16.data(), with16.get(), count);
    const auto got_bits = bf16_bits(out16, count);
    EXPECT_EQ(got_bits, bf16_bits(conv16, count));

    double max_ref = 0.0;
    for (float c : out) max_ref = std::max(max_ref, std::abs(static_cast<double>(c)));
    const double e = kFp32 * max_ref;
    std::size_t bad = 0;
    double max_moved = 0.0;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const std::uint32_t wide_bits = static_cast<std::uint32_t>(got_bits[i]) << 16;
      float g = 0.0f;
      std::memcpy(&g, &wide_bits, sizeof g);
      const double diff = std::abs(static_cast<double>(g) - out[i]);
      if (!(diff <= std::ldexp(std::abs(static_cast<double>(out[i])), -8) + 2.0 * e)) ++bad;
      max_moved = std::max(max_moved, diff);
    }
    EXPECT_EQ(bad, 0u) << "values beyond bf16 rounding of the CPU's";
    EXPECT_GT(max_moved, 2.0 * e) << "no value shows bf16 rounding";
  }
}

// Grouped-query attention (issue 14): groups of 2 and 3, multi-query (one K/V head), head
// sizes with 32- and 16-row backward tiles, ragged sequence lengths.
TEST(CudaFlashAttention, GroupedQueryMatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  check_against_cpu({2, 45, 4, 32, 2}, 1100);   // g = 2
  check_against_cpu({1, 70, 6, 64, 2}, 1110);   // g = 3, three backward key tiles
  check_against_cpu({1, 40, 4, 128, 1}, 1120);  // multi-query, 16-row backward tiles
  check_against_cpu({2, 19, 3, 7, 1}, 1130);    // masked columns
}

// The bf16 tensor-core forward (flash_attention_forward_tc) against the CPU float attention of
// the bf16-rounded q, k, v. What is left is the bf16 rounding of the probabilities before
// P V (relative 2^-9 each, while l sums them unrounded): |out - ref| <= 2^-9 sum_j p_j |v_j| / l
// <= 2^-9 max |v|, plus fp32 sums; allowed 2^-8 max |v| + 1e-5. lse has no rounded factor
// left (bf16 products are exact in fp32): within fp32 summation of the host's. Against the
// unrounded attention the error is bf16-sized, larger than fp32's by far (shows the rounding).
// The optional bf16 copy is bf16(out). Ragged lengths, several query and key tiles, head sizes
// 64, 128 and padded ones (48, 7), grouped-query, a peaky softmax; the same bits twice.
TEST(CudaFlashAttention, TensorCoreForwardMatchesCpuOfRoundedInputs) {
  PION_REQUIRE_CUDA_DEVICE();
  const auto round_bf16 = [](float x) {
    std::uint32_t bits = 0;
    std::memcpy(&bits, &x, sizeof bits);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;  // nearest even (finite x)
    float r = 0.0f;
    std::memcpy(&r, &bits, sizeof r);
    return r;
  };
  struct Case {
    Shape s;
    double std;
  };
  for (const Case c :
       {Case{{1, 150, 2, 64}, 1.0}, Case{{2, 70, 2, 128}, 1.0}, Case{{1, 45, 4, 48, 2}, 1.0},
        Case{{2, 19, 3, 7, 1}, 1.0}, Case{{1, 130, 2, 32}, 2.0}}) {
    const Shape& s = c.s;
    SCOPED_TRACE(s.label());
    std::printf(" %s (std %.1f)\n", s.label().c_str(), c.std);
    const auto qkv = randn(s.qkv_elements(), 1300 + static_cast<std::uint64_t>(s.seq), c.std);
    std::vector<float> rounded(qkv.size());
    std::transform(qkv.begin(), qkv.end(), rounded.begin(), round_bf16);
    const bool grouped = s.kv_heads() != s.n_head;
    const Shape m = s.mha();
    const auto attend = [&](const std::vector<float>& x) {
      const auto wide = grouped ? repeat_kv(x, s) : x;
      std::vector<float> out(static_cast<std::size_t>(s.out_elements())),
          probs(static_cast<std::size_t>(m.rows() * s.seq));
      hl::attention_forward(out.data(), probs.data(), wide.data(), s.batch, s.seq, s.n_head,
                            s.head_dim);
      return std::pair{out, host_lse(wide, m)};
    };
    const auto [ref, ref_lse] = attend(rounded);
    const auto [exact, exact_lse] = attend(qkv);
    double max_v = 0.0;
    for (i64 row = 0; row < s.batch * s.seq; ++row)
      for (i64 col = s.d() + s.kv(); col < s.width(); ++col)
        max_v = std::max(max_v, std::abs(static_cast<double>(rounded[row * s.width() + col])));

    Context ctx;
    const i64 count = s.out_elements();
    Dev d_qkv(qkv), out = Dev::poisoned(count);
    Dev lse =
        Dev::poisoned(static_cast<i64>(cl::flash_attention_lse_elements(s.batch, s.seq, s.n_head)));
    DeviceBuffer out16((static_cast<std::size_t>(count) + 1) / 2), conv16(out16.size());
    cl::flash_attention_forward_tc(ctx, out.get(), lse.get(), d_qkv.get(), s.batch, s.seq, s.n_head,
                                   s.head_dim, s.n_kv_head, out16.data());
    const auto got = out.host(), got_lse = lse.host();
    std::size_t bad = 0, non_finite = 0;
    double worst = 0.0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      if (!std::isfinite(got[i])) ++non_finite;
      const double diff = std::abs(static_cast<double>(got[i]) - ref[i]);
      worst = std::max(worst, diff);
      if (!(diff <= std::ldexp(max_v, -8) + 1e-5)) ++bad;
    }
    std::printf("  tc out vs cpu of rounded inputs: max|diff| = %.3e (bound %.3e)\n", worst,
                std::ldexp(max_v, -8) + 1e-5);
    EXPECT_EQ(non_finite, 0u) << "unwritten outputs";
    EXPECT_EQ(bad, 0u) << "outputs beyond the probabilities' bf16 rounding";
    expect_close("tc lse", got_lse, ref_lse, kFp32Chain, "host fp64 of rounded inputs");
    const double vs_exact = expect_close("tc out", got, exact, 2e-2, "cpu, unrounded inputs");
    EXPECT_GT(vs_exact, 1e-4) << "no bf16 rounding visible: are the inputs rounded?";

    // The bf16 copy is bf16(out), bit for bit.
    cl::convert_to_bf16(ctx, conv16.data(), out.get(), count);
    EXPECT_EQ(bf16_bits(out16, count), bf16_bits(conv16, count));

    Dev again = Dev::poisoned(count);
    cl::flash_attention_forward_tc(ctx, again.get(), lse.get(), d_qkv.get(), s.batch, s.seq,
                                   s.n_head, s.head_dim, s.n_kv_head);
    EXPECT_TRUE(same_bits(again.host(), got)) << "out differs between two runs";
  }
  Context ctx;
  Dev x = Dev::poisoned(10);
  EXPECT_THROW(cl::flash_attention_forward_tc(ctx, x.get(), x.get(), x.get(), 1, 2, 1, 129),
               pion::Error);
  EXPECT_THROW(cl::flash_attention_forward_tc(ctx, x.get(), x.get(), x.get(), 1, 2, 3, 8, 2),
               pion::Error);
}

// The bf16 tensor-core backward (flash_attention_backward_tc, after the tc forward) against a
// double reference of the bf16-rounded q, k, v and dout. Its remaining roundings: P to bf16 in
// dV = sum_i P_ij dO_i (relative 2^-9 per term), dS to bf16 in dK and dQ (2^-9 per term), and
// delta_i = dO_i . out_i read from the tc forward's out, which is off by at most 2^-9 max|v| per
// element, so delta by Delta_i = 2^-9 max|v| sum_c |dO_ic|. Allowed per element, 4x those:
// dV_jc: 2^-7 sum_i P_ij |dO_ic|; dK_jc: 2^-7 scale sum_i (|dS_ij| + P_ij Delta'_i) |q_ic| with
// Delta'_i = max|v| sum_c |dO_ic|; dQ_ic likewise over j with |k_jc|; plus 1e-6 of the largest
// reference gradient. Added into a random start and assigned over NaN; the same bits twice;
// against the fp32 kernels on the unrounded inputs, bf16-sized differences.
TEST(CudaFlashAttention, TensorCoreBackwardMatchesReferenceOfRoundedInputs) {
  PION_REQUIRE_CUDA_DEVICE();
  const auto round_bf16 = [](float x) {
    std::uint32_t bits = 0;
    std::memcpy(&bits, &x, sizeof bits);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    float r = 0.0f;
    std::memcpy(&r, &bits, sizeof r);
    return r;
  };
  for (const Shape s : {Shape{1, 150, 2, 64}, Shape{2, 70, 2, 128}, Shape{1, 45, 4, 48, 2},
                        Shape{2, 19, 3, 7, 1}, Shape{1, 100, 2, 32}}) {
    SCOPED_TRACE(s.label());
    std::printf(" %s\n", s.label().c_str());
    const auto qkv = randn(s.qkv_elements(), 1400 + static_cast<std::uint64_t>(s.seq));
    const auto dout = randn(s.out_elements(), 1500 + static_cast<std::uint64_t>(s.seq));
    const auto dqkv0 = randn(s.qkv_elements(), 1600);
    std::vector<float> rq(qkv.size()), rdo(dout.size());
    std::transform(qkv.begin(), qkv.end(), rq.begin(), round_bf16);
    std::transform(dout.begin(), dout.end(), rdo.begin(), round_bf16);

    // The reference, per (b, h): P, dS and the bounds' sums, in double.
    const i64 T = s.seq, hd = s.head_dim, W = s.width(), d = s.d();
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    double max_v = 0.0;
    for (i64 row = 0; row < s.batch * T; ++row)
      for (i64 c = d + s.kv(); c < W; ++c)
        max_v = std::max(max_v, std::abs(static_cast<double>(rq[row * W + c])));
    std::vector<double> ref(qkv.size(), 0.0), bound(qkv.size(), 0.0);
    std::vector<double> P(static_cast<std::size_t>(T * T)), dS(P.size()), delta_err(T);
    for (i64 b = 0; b < s.batch; ++b)
      for (i64 h = 0; h < s.n_head; ++h) {
        const i64 kvh = h / s.group();
        const auto q = [&](i64 i, i64 c) {
          return static_cast<double>(rq[(b * T + i) * W + h * hd + c]);
        };
        const auto k = [&](i64 j, i64 c) {
          return static_cast<double>(rq[(b * T + j) * W + d + kvh * hd + c]);
        };
        const auto v = [&](i64 j, i64 c) {
          return static_cast<double>(rq[(b * T + j) * W + d + s.kv() + kvh * hd + c]);
        };
        const auto g = [&](i64 i, i64 c) {
          return static_cast<double>(rdo[(b * T + i) * d + h * hd + c]);
        };
        for (i64 i = 0; i < T; ++i) {
          double mx = -INFINITY;
          for (i64 j = 0; j <= i; ++j) {
            double dot = 0.0;
            for (i64 c = 0; c < hd; ++c) dot += q(i, c) * k(j, c);
            P[i * T + j] = scale * dot;
            mx = std::max(mx, scale * dot);
          }
          double sum = 0.0;
          for (i64 j = 0; j <= i; ++j) sum += (P[i * T + j] = std::exp(P[i * T + j] - mx));
          double delta = 0.0, abs_do = 0.0;
          for (i64 c = 0; c < hd; ++c) {
            double o = 0.0;
            for (i64 j = 0; j <= i; ++j) o += P[i * T + j] / sum * v(j, c);
            delta += g(i, c) * o;
            abs_do += std::abs(g(i, c));
          }
          delta_err[i] = max_v * abs_do;
          for (i64 j = 0; j <= i; ++j) {
            P[i * T + j] /= sum;
            double dp = 0.0;
            for (i64 c = 0; c < hd; ++c) dp += g(i, c) * v(j, c);
            dS[i * T + j] = P[i * T + j] * (dp - delta);
          }
        }
        for (i64 i = 0; i < T; ++i)
          for (i64 j = 0; j <= i; ++j) {
            const double p = P[i * T + j], ds = dS[i * T + j];
            const double wk = std::abs(ds) + p * delta_err[i];
            for (i64 c = 0; c < hd; ++c) {
              const std::size_t iq = static_cast<std::size_t>((b * T + i) * W + h * hd + c);
              const std::size_t jk = static_cast<std::size_t>((b * T + j) * W + d + kvh * hd + c);
              const std::size_t jv = jk + static_cast<std::size_t>(s.kv());
              ref[iq] += scale * ds * k(j, c);
              bound[iq] += scale * wk * std::abs(k(j, c));
              ref[jk] += scale * ds * q(i, c);
              bound[jk] += scale * wk * std::abs(q(i, c));
              ref[jv] += p * g(i, c);
              bound[jv] += p * std::abs(g(i, c));
            }
          }
      }
    double max_ref = 0.0;
    for (double x : ref) max_ref = std::max(max_ref, std::abs(x));

    Context ctx;
    Dev d_qkv(qkv), d_dout(dout), out = Dev::poisoned(s.out_elements());
    Dev lse =
        Dev::poisoned(static_cast<i64>(cl::flash_attention_lse_elements(s.batch, s.seq, s.n_head)));
    Dev scratch = Dev::poisoned(
        static_cast<i64>(cl::flash_attention_scratch_elements(s.batch, s.seq, s.n_head)));
    cl::flash_attention_forward_tc(ctx, out.get(), lse.get(), d_qkv.get(), s.batch, s.seq, s.n_head,
                                   s.head_dim, s.n_kv_head);
    const auto run = [&](const std::vector<float>& start, cl::GradWrite write) {
      Dev dqkv(start);
      cl::flash_attention_backward_tc(ctx, dqkv.get(), scratch.get(), d_dout.get(), out.get(),
                                      lse.get(), d_qkv.get(), s.batch, s.seq, s.n_head, s.head_dim,
                                      s.n_kv_head, write);
      return dqkv.host();
    };
    const std::vector<float> poison(qkv.size(), std::numeric_limits<float>::quiet_NaN());
    const auto assigned = run(poison, cl::GradWrite::Assign);
    std::size_t bad = 0, non_finite = 0;
    double worst = 0.0;  // largest |diff| / allowed
    for (std::size_t e = 0; e < ref.size(); ++e) {
      if (!std::isfinite(assigned[e])) ++non_finite;
      const double allowed = std::ldexp(bound[e], -7) + 1e-6 * max_ref;
      const double diff = std::abs(assigned[e] - ref[e]);
      worst = std::max(worst, diff / allowed);
      if (!(diff <= allowed)) ++bad;
    }
    std::printf("  tc dqkv vs reference of rounded inputs: worst |diff| / allowed = %.3f\n", worst);
    EXPECT_EQ(non_finite, 0u) << "unwritten gradients";
    EXPECT_EQ(bad, 0u) << "gradients beyond the bf16 roundings' bound";

    // The bf16-only forward output (a bf16 model keeps no fp32 one): the same bf16 bits, and a
    // backward whose row dots read it stays within the same bounds (reading out rounded to
    // bf16 moves delta_i by at most 2^-9 sum_c |dO_ic| max|v|, inside Delta'_i's slack).
    {
      DeviceBuffer full16((qkv.size() + 1) / 2), only16(full16.size());
      Dev lse16 = Dev::poisoned(
          static_cast<i64>(cl::flash_attention_lse_elements(s.batch, s.seq, s.n_head)));
      cl::flash_attention_forward_tc(ctx, out.get(), lse.get(), d_qkv.get(), s.batch, s.seq,
                                     s.n_head, s.head_dim, s.n_kv_head, full16.data());
      cl::flash_attention_forward_tc(ctx, nullptr, lse16.get(), d_qkv.get(), s.batch, s.seq,
                                     s.n_head, s.head_dim, s.n_kv_head, only16.data());
      EXPECT_EQ(bf16_bits(only16, s.out_elements()), bf16_bits(full16, s.out_elements()));
      EXPECT_TRUE(same_bits(lse16.host(), lse.host()));
      Dev dqkv16(poison);
      cl::flash_attention_backward_tc(ctx, dqkv16.get(), scratch.get(), d_dout.get(), nullptr,
                                      lse.get(), d_qkv.get(), s.batch, s.seq, s.n_head, s.head_dim,
                                      s.n_kv_head, cl::GradWrite::Assign, only16.data());
      const auto from16 = dqkv16.host();
      std::size_t bad16 = 0;
      double worst16 = 0.0;
      for (std::size_t e = 0; e < ref.size(); ++e) {
        const double allowed = std::ldexp(bound[e], -7) + 1e-6 * max_ref;
        const double diff = std::abs(from16[e] - ref[e]);
        worst16 = std::max(worst16, diff / allowed);
        if (!(diff <= allowed)) ++bad16;
      }
      std::printf("  tc dqkv from the bf16 output: worst |diff| / allowed = %.3f\n", worst16);
      EXPECT_EQ(bad16, 0u) << "gradients from the bf16 output beyond the bound";
      EXPECT_FALSE(same_bits(from16, assigned)) << "the bf16 output was not read";
    }

    const auto added_to = run(dqkv0, cl::GradWrite::Add);
    expect_close("tc dqkv (added gradient)", added(added_to, dqkv0), assigned, kFp32Chain,
                 "tc assigned");
    EXPECT_TRUE(same_bits(run(poison, cl::GradWrite::Assign), assigned))
        << "dqkv differs between two runs";

    // Against the fp32 kernels on the unrounded inputs: bf16-sized, not fp32-sized, differences.
    const FlashRun fp32 = run_flash(ctx, s, d_qkv, d_dout, poison, cl::GradWrite::Assign);
    const double rel = expect_close("tc dqkv", assigned, fp32.dqkv, 5e-2, "fp32 flash");
    EXPECT_GT(rel, 1e-4) << "no bf16 rounding visible";
  }
  Context ctx;
  Dev x = Dev::poisoned(10);
  EXPECT_THROW(cl::flash_attention_backward_tc(ctx, x.get(), x.get(), x.get(), x.get(), x.get(),
                                               x.get(), 1, 2, 1, 129),
               pion::Error);
  EXPECT_THROW(cl::flash_attention_backward_tc(ctx, nullptr, x.get(), x.get(), x.get(), x.get(),
                                               x.get(), 1, 2, 1, 8),
               pion::Error);
  // Neither out nor out_bf16.
  EXPECT_THROW(cl::flash_attention_backward_tc(ctx, x.get(), x.get(), x.get(), nullptr, x.get(),
                                               x.get(), 1, 2, 1, 8),
               pion::Error);
  EXPECT_THROW(cl::flash_attention_forward_tc(ctx, nullptr, x.get(), x.get(), 1, 2, 1, 8),
               pion::Error);
}

TEST(CudaFlashAttention, MatchesCudaAttention) {
  PION_REQUIRE_CUDA_DEVICE();
  const Shape s{2, 90, 4, 64};
  std::printf(" %s\n", s.label().c_str());
  const auto qkv = randn(s.qkv_elements(), 700);
  const auto dout = randn(s.out_elements(), 701);
  const auto dqkv0 = randn(s.qkv_elements(), 702);

  Context ctx;
  Dev d_qkv(qkv), d_dout(dout);
  const i64 nprobs = s.rows() * s.seq;
  Dev ref_out = Dev::poisoned(s.out_elements()), probs = Dev::poisoned(nprobs),
      ref_scratch = Dev::poisoned(nprobs), ref_dqkv(dqkv0);
  cl::attention_forward(ctx, ref_out.get(), probs.get(), d_qkv.get(), s.batch, s.seq, s.n_head,
                        s.head_dim);
  cl::attention_backward(ctx, ref_dqkv.get(), ref_scratch.get(), d_dout.get(), probs.get(),
                         d_qkv.get(), s.batch, s.seq, s.n_head, s.head_dim);
  const auto want_out = ref_out.host(), want_dqkv = ref_dqkv.host();

  const FlashRun got = run_flash(ctx, s, d_qkv, d_dout, dqkv0);
  expect_close("flash out", got.out, want_out, kFp32, "cuda attention");
  expect_close("flash dqkv (start + gradient)", got.dqkv, want_dqkv, kFp32Chain, "cuda attention");
  expect_close("flash dqkv (added gradient)", added(got.dqkv, dqkv0), added(want_dqkv, dqkv0),
               kFp32Chain, "cuda attention");
}

TEST(CudaFlashAttention, FutureTokensDoNotChangeEarlierOutputs) {
  PION_REQUIRE_CUDA_DEVICE();
  const Shape s{2, 77, 2, 64};
  const i64 cut = 45;  // inside the second 32-row tile: the diagonal tile's mask is tested
  auto qkv = randn(s.qkv_elements(), 800);
  Context ctx;
  Dev out_a = Dev::poisoned(s.out_elements()), lse_a = Dev::poisoned(s.rows());
  Dev out_b = Dev::poisoned(s.out_elements()), lse_b = Dev::poisoned(s.rows());
  Dev qkv_a(qkv);
  cl::flash_attention_forward(ctx, out_a.get(), lse_a.get(), qkv_a.get(), s.batch, s.seq, s.n_head,
                              s.head_dim);
  // New q, k, v for positions >= cut of batch 0.
  const auto noise = randn(s.qkv_elements(), 801, 3.0);
  const i64 stride = 3 * s.d();
  for (i64 t = cut; t < s.seq; ++t)
    for (i64 c = 0; c < stride; ++c)
      qkv[static_cast<std::size_t>(t * stride + c)] =
          noise[static_cast<std::size_t>(t * stride + c)];
  Dev qkv_b(qkv);
  cl::flash_attention_forward(ctx, out_b.get(), lse_b.get(), qkv_b.get(), s.batch, s.seq, s.n_head,
                              s.head_dim);
  const auto oa = out_a.host(), ob = out_b.host(), la = lse_a.host(), lb = lse_b.host();
  // Masked keys enter as exp(-inf) = 0 times v: rows before the cut keep their exact bits.
  const std::size_t row = static_cast<std::size_t>(s.d());
  EXPECT_EQ(std::memcmp(oa.data(), ob.data(), static_cast<std::size_t>(cut) * row * sizeof(float)),
            0)
      << "out rows before position " << cut << " changed";
  // Batch 1 is untouched entirely.
  const std::size_t b1 = static_cast<std::size_t>(s.seq) * row;
  EXPECT_TRUE(std::equal(oa.begin() + static_cast<std::ptrdiff_t>(b1), oa.end(),
                         ob.begin() + static_cast<std::ptrdiff_t>(b1)))
      << "batch 1 changed";
  for (i64 h = 0; h < s.n_head; ++h)
    for (i64 i = 0; i < cut; ++i) {
      const std::size_t k = static_cast<std::size_t>(h * s.seq + i);
      ASSERT_EQ(la[k], lb[k]) << "lse of head " << h << " row " << i << " changed";
    }
  // And the later rows did change (the perturbation was real).
  EXPECT_NE(std::memcmp(oa.data() + cut * s.d(), ob.data() + cut * s.d(), row * sizeof(float)), 0);
  std::printf("  rows before the cut bit-identical after changing tokens %lld..%lld\n",
              static_cast<long long>(cut), static_cast<long long>(s.seq - 1));
}

TEST(CudaFlashAttention, GraphReplayMatchesEagerBits) {
  PION_REQUIRE_CUDA_DEVICE();
  const Shape s{2, 70, 3, 64};
  const auto qkv = randn(s.qkv_elements(), 900);
  const auto dout = randn(s.out_elements(), 901);
  const auto dqkv0 = randn(s.qkv_elements(), 902);
  Context ctx;
  Dev d_qkv(qkv), d_dout(dout);
  // Eager first (this also loads the kernels before the capture).
  const FlashRun eager = run_flash(ctx, s, d_qkv, d_dout, dqkv0);

  // Every buffer is created (uploads synchronise) before the capture starts.
  Dev out = Dev::poisoned(s.out_elements()), lse = Dev::poisoned(s.rows()),
      scratch = Dev::poisoned(s.rows()), dqkv(dqkv0);
  ctx.begin_capture();
  cl::flash_attention_forward(ctx, out.get(), lse.get(), d_qkv.get(), s.batch, s.seq, s.n_head,
                              s.head_dim);
  cl::flash_attention_backward(ctx, dqkv.get(), scratch.get(), d_dout.get(), out.get(), lse.get(),
                               d_qkv.get(), s.batch, s.seq, s.n_head, s.head_dim);
  ctx.end_capture();
  ctx.synchronize();
  EXPECT_TRUE(same_bits(dqkv.host(), dqkv0)) << "the capture ran the backward";
  ctx.launch_graph();
  ctx.synchronize();
  EXPECT_TRUE(same_bits(out.host(), eager.out)) << "graph replay out differs from eager";
  EXPECT_TRUE(same_bits(lse.host(), eager.lse)) << "graph replay lse differs from eager";
  EXPECT_TRUE(same_bits(dqkv.host(), eager.dqkv)) << "graph replay dqkv differs from eager";
  expect_close("graph replay dqkv", dqkv.host(), eager.dqkv, 0.0, "eager");
}

// The tensor-core pair reading q, k, v and dout in bf16 (qkv_bf16, dout_bf16: a bf16 model's
// GEMM outputs) gives bit for bit what it gives on the fp32 tensors those bf16 values widen
// to: the same bf16 operands reach the same products, and the row dots read the same values.
// Forward (fp32 and bf16 outputs), backward (add and assign, fp32 and bf16 forward output),
// grouped-query and padded head sizes. Mixing an fp32 dout with a bf16 qkv is refused.
TEST(CudaFlashAttention, TensorCoreReadsBf16InputsBitForBit) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  for (const Shape s : {Shape{2, 70, 2, 64}, Shape{1, 45, 4, 48, 2}, Shape{1, 33, 2, 128, 1}}) {
    SCOPED_TRACE(s.label());
    const i64 nq = s.qkv_elements(), no = s.out_elements();
    const auto half_of = [](i64 count) { return (static_cast<std::size_t>(count) + 1) / 2; };
    // bf16 copies of random q, k, v and dout, and their values widened back to fp32.
    Dev qkv(randn(nq, 1700 + static_cast<std::uint64_t>(s.seq))),
        dout(randn(no, 1800 + static_cast<std::uint64_t>(s.seq)));
    DeviceBuffer qkv16(half_of(nq)), dout16(half_of(no));
    cl::convert_to_bf16(ctx, qkv16.data(), qkv.get(), nq);
    cl::convert_to_bf16(ctx, dout16.data(), dout.get(), no);
    Dev qkv_w = Dev::poisoned(nq), dout_w = Dev::poisoned(no);
    cl::convert_from_bf16(ctx, qkv_w.get(), qkv16.data(), nq);
    cl::convert_from_bf16(ctx, dout_w.get(), dout16.data(), no);
    const i64 rows = static_cast<i64>(cl::flash_attention_lse_elements(s.batch, s.seq, s.n_head));

    Dev out_a = Dev::poisoned(no), out_b = Dev::poisoned(no), lse_a = Dev::poisoned(rows),
        lse_b = Dev::poisoned(rows);
    DeviceBuffer o16_a(half_of(no)), o16_b(half_of(no));
    cl::flash_attention_forward_tc(ctx, out_a.get(), lse_a.get(), qkv_w.get(), s.batch, s.seq,
                                   s.n_head, s.head_dim, s.n_kv_head, o16_a.data());
    cl::flash_attention_forward_tc(ctx, out_b.get(), lse_b.get(), nullptr, s.batch, s.seq, s.n_head,
                                   s.head_dim, s.n_kv_head, o16_b.data(), qkv16.data());
    EXPECT_TRUE(same_bits(out_b.host(), out_a.host())) << "forward out";
    EXPECT_TRUE(same_bits(lse_b.host(), lse_a.host())) << "forward lse";
    EXPECT_EQ(bf16_bits(o16_b, no), bf16_bits(o16_a, no)) << "forward bf16 out";
    for (const float x : out_a.host()) ASSERT_TRUE(std::isfinite(x));

    const auto dqkv0 = randn(nq, 1900);
    for (const auto write : {cl::GradWrite::Add, cl::GradWrite::Assign})
      for (const bool bf16_out : {false, true}) {
        const bool add = write == cl::GradWrite::Add;
        SCOPED_TRACE(std::string(add ? "add" : "assign") + (bf16_out ? ", bf16 out" : ""));
        Dev dq_a = add ? Dev(dqkv0) : Dev::poisoned(nq),
            dq_b = add ? Dev(dqkv0) : Dev::poisoned(nq);
        Dev scratch = Dev::poisoned(rows);
        float* o = bf16_out ? nullptr : out_a.get();
        const void* o16 = bf16_out ? o16_a.data() : nullptr;
        cl::flash_attention_backward_tc(ctx, dq_a.get(), scratch.get(), dout_w.get(), o,
                                        lse_a.get(), qkv_w.get(), s.batch, s.seq, s.n_head,
                                        s.head_dim, s.n_kv_head, write, o16);
        cl::flash_attention_backward_tc(ctx, dq_b.get(), scratch.get(), nullptr, o, lse_a.get(),
                                        nullptr, s.batch, s.seq, s.n_head, s.head_dim, s.n_kv_head,
                                        write, o16, dout16.data(), qkv16.data());
        const auto got = dq_b.host();
        EXPECT_TRUE(same_bits(got, dq_a.host())) << "backward dqkv";
        for (const float x : got) ASSERT_TRUE(std::isfinite(x));
        EXPECT_FALSE(same_bits(got, dqkv0)) << "backward wrote nothing";
      }
  }
  // One of qkv and qkv_bf16; dout and qkv both in bf16 or both not.
  const Shape s{1, 8, 2, 64};
  Dev qkv(randn(s.qkv_elements(), 1950)), dout(randn(s.out_elements(), 1951)),
      out = Dev::poisoned(s.out_elements()), lse = Dev::poisoned(s.rows()),
      scratch = Dev::poisoned(s.rows()), dqkv = Dev::poisoned(s.qkv_elements());
  DeviceBuffer qkv16((static_cast<std::size_t>(s.qkv_elements()) + 1) / 2);
  cl::convert_to_bf16(ctx, qkv16.data(), qkv.get(), s.qkv_elements());
  EXPECT_THROW(cl::flash_attention_forward_tc(ctx, out.get(), lse.get(), qkv.get(), 1, 8, 2, 64, 0,
                                              nullptr, qkv16.data()),
               pion::Error);
  EXPECT_THROW(cl::flash_attention_forward_tc(ctx, out.get(), lse.get(), nullptr, 1, 8, 2, 64),
               pion::Error);
  EXPECT_THROW(cl::flash_attention_backward_tc(
                   ctx, dqkv.get(), scratch.get(), dout.get(), out.get(), lse.get(), nullptr, 1, 8,
                   2, 64, 0, cl::GradWrite::Assign, nullptr, nullptr, qkv16.data()),
               pion::Error);  // fp32 dout with bf16 qkv
  const auto o = out.host();
  EXPECT_TRUE(std::all_of(o.begin(), o.end(), [](float x) { return std::isnan(x); }));
}

TEST(CudaFlashAttention, RejectsBadArguments) {
  PION_REQUIRE_CUDA_DEVICE();
  EXPECT_EQ(cl::flash_attention_lse_elements(2, 5, 3), 30u);
  EXPECT_EQ(cl::flash_attention_scratch_elements(2, 5, 3), 30u);
  EXPECT_THROW(cl::flash_attention_lse_elements(-1, 5, 3), pion::Error);

  Context ctx;
  const Shape s{1, 4, 2, 128};
  Dev qkv(randn(s.qkv_elements(), 1000)),
      out = Dev::poisoned(s.out_elements()), lse = Dev::poisoned(s.rows()),
      scratch = Dev::poisoned(s.rows()), dqkv(randn(s.qkv_elements(), 1001));
  auto forward = [&](i64 batch, i64 seq, i64 n_head, i64 head_dim, float* o, i64 n_kv_head = 0) {
    cl::flash_attention_forward(ctx, o, lse.get(), qkv.get(), batch, seq, n_head, head_dim,
                                n_kv_head);
  };
  auto backward = [&](i64 head_dim, float* sc, i64 n_kv_head = 0) {
    cl::flash_attention_backward(ctx, dqkv.get(), sc, out.get(), out.get(), lse.get(), qkv.get(), 1,
                                 4, 1, head_dim, n_kv_head);
  };
  EXPECT_THROW(forward(1, 4, 1, 129, out.get()), pion::Error);  // head_dim > 128
  EXPECT_THROW(forward(1, 4, 1, 0, out.get()), pion::Error);
  EXPECT_THROW(forward(1, 0, 1, 64, out.get()), pion::Error);
  EXPECT_THROW(forward(0, 4, 1, 64, out.get()), pion::Error);
  EXPECT_THROW(forward(1, 4, -2, 64, out.get()), pion::Error);
  EXPECT_THROW(forward(1, i64{1} << 21, 1, 64, out.get()), pion::Error);  // too many tiles
  EXPECT_THROW(forward(1, 4, 1, 64, nullptr), pion::Error);
  EXPECT_THROW(backward(200, scratch.get()), pion::Error);
  EXPECT_THROW(backward(64, nullptr), pion::Error);
  // n_kv_head must be >= 0 (0: n_head) and divide n_head.
  EXPECT_THROW(forward(1, 4, 2, 64, out.get(), 3), pion::Error);
  EXPECT_THROW(forward(1, 4, 2, 64, out.get(), -1), pion::Error);
  EXPECT_THROW(backward(64, scratch.get(), -1), pion::Error);
  EXPECT_THROW(backward(64, scratch.get(), 2), pion::Error);
  try {
    forward(1, 4, 1, 160, out.get());
    ADD_FAILURE() << "head_dim 160 was accepted";
  } catch (const pion::Error& e) {
    std::printf("  head_dim 160: %s\n", e.what());
    EXPECT_NE(std::string(e.what()).find("head_dim"), std::string::npos) << e.what();
  }
  // Nothing was queued: the poisoned output is still all NaN and dqkv unchanged.
  const auto o = out.host();
  EXPECT_TRUE(std::all_of(o.begin(), o.end(), [](float x) { return std::isnan(x); }));
  EXPECT_TRUE(same_bits(dqkv.host(), randn(s.qkv_elements(), 1001)));
}

}  // namespace

#endif  // PION_HAVE_CUDA
