// cuDNN's fused attention (include/pion/cuda/cudnn_attention.h) against our bf16 tensor-core
// flash attention (flash_attention_forward_tc / _backward_tc), which test_cuda_flash_attention
// holds to the CPU attention: the same bf16 q, k, v (after RoPE, packed [q | k | v] rows) and
// the same bf16 dout, multi-head and grouped-query, seq not a multiple of any tile.
// - out: both are fp32 accumulations of bf16 products rounded to bf16 once; they differ by the
//   probabilities' rounding and the order of sums: within 2^-6 of max |v| (about four bf16
//   roundings of the largest value; each kernel alone is within 2^-9 of the exact attention).
// - stats against our lse (both the natural logsumexp of the scaled, masked scores): 1e-3.
// - dq, dk, dv (cuDNN rounds them to bf16; ours are fp32): within 2^-5 of the largest gradient.
// - the same calls inside a CUDA graph capture, replayed, give the eager values (cuDNN may sum
//   in another order on another launch: compared within bf16 rounding, not bit for bit).
// - bad shapes throw pion::Error before cuDNN is asked.
// - without a GPU: cuDNN finalises both operation graphs (GraphsAreWellFormedWithoutGpu).
// Skips with a message without a CUDA device or where the build has no cuDNN (the CPU emulator
// has none: this file runs only on a GPU, scripts/gpu-check.sh).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "pion/core/error.h"
#include "pion/core/random.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/cudnn_attention.h"
#include "pion/cuda/flash_attention.h"
#include "pion/cuda/layers.h"
#endif

#ifndef PION_HAVE_CUDA

TEST(CudaCudnnAttention, NeedsCudaBuild) {
  GTEST_SKIP() << "CUDA back end not compiled (PION_CUDA=OFF or no nvcc); configure with "
                  "-DPION_CUDA=ON and run scripts/gpu-check.sh on a GPU machine";
}

#else

namespace {

using i64 = std::int64_t;
namespace cl = pion::cuda::layers;
using pion::cuda::Context;
using pion::cuda::DeviceBuffer;

#define PION_REQUIRE_CUDNN_ATTENTION()                                                          \
  if (pion::cuda::device_count() == 0)                                                          \
    GTEST_SKIP() << "no CUDA device: cudaGetDeviceCount reports none (this build has the CUDA " \
                    "back end; run scripts/gpu-check.sh on a machine with an NVIDIA GPU)";      \
  if (const std::string why = cl::cudnn_attention_unavailable(); !why.empty()) GTEST_SKIP() << why

std::vector<float> randn(i64 count, std::uint64_t seed) {
  pion::Rng rng(seed);
  std::vector<float> v(static_cast<std::size_t>(count));
  for (float& x : v) x = static_cast<float>(rng.normal());
  return v;
}

std::vector<float> download(const DeviceBuffer& buf, i64 count) {
  std::vector<float> h(buf.size());
  buf.download(h.data(), h.size());
  h.resize(static_cast<std::size_t>(count));
  return h;
}

// A bf16 device tensor of count values (DeviceBuffer storage: two per float).
struct Dev16 {
  DeviceBuffer buf;
  explicit Dev16(i64 count) : buf(static_cast<std::size_t>((count + 1) / 2)) {}
  void* get() { return buf.data(); }
};

// bf16 values widened to fp32 on the device and copied back.
std::vector<float> widened(Context& ctx, Dev16& x, i64 count) {
  DeviceBuffer wide(static_cast<std::size_t>(count));
  cl::convert_from_bf16(ctx, wide.data(), x.get(), count);
  return download(wide, count);
}

Dev16 to_bf16(Context& ctx, const std::vector<float>& host) {
  const auto count = static_cast<i64>(host.size());
  DeviceBuffer wide(host.size());
  wide.upload(host.data(), host.size());
  Dev16 out(count);
  cl::convert_to_bf16(ctx, out.get(), wide.data(), count);
  ctx.synchronize();
  return out;
}

// max |got - ref| / max |ref|, printed; fails above tol or on a non-finite value.
void expect_close(const std::string& what, const std::vector<float>& got,
                  const std::vector<float>& ref, double tol) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double worst = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << ": element " << i << " is " << got[i];
    worst = std::max(worst, std::abs(static_cast<double>(got[i]) - ref[i]));
    scale = std::max(scale, std::abs(static_cast<double>(ref[i])));
  }
  const double rel = worst / std::max(scale, 1e-30);
  std::printf("%s: cudnn vs flash_tc max |diff| / max |ref| = %.3g (tol %.3g)\n", what.c_str(), rel,
              tol);
  EXPECT_LE(rel, tol) << what;
}

struct Shape {
  i64 batch, seq, n_head, head_dim, n_kv_head;
  i64 d() const { return n_head * head_dim; }
  i64 width() const { return (n_head + 2 * n_kv_head) * head_dim; }
  std::string name() const {
    return "batch " + std::to_string(batch) + " seq " + std::to_string(seq) + " heads " +
           std::to_string(n_head) + "/" + std::to_string(n_kv_head) + " head_dim " +
           std::to_string(head_dim);
  }
};

struct Results {
  std::vector<float> out, stats, dqkv;
};

// cuDNN's forward and backward on qkv16 / dout16, eagerly or captured and replayed.
Results run_cudnn(Context& ctx, const Shape& s, Dev16& qkv16, Dev16& dout16, bool graph) {
  const i64 n = s.batch * s.seq;
  cl::CudnnAttention attention(ctx, s.batch, s.seq, s.n_head, s.head_dim, s.n_kv_head);
  std::printf("%s: %s, workspace %zu bytes\n", s.name().c_str(), attention.description().c_str(),
              attention.workspace_bytes());
  DeviceBuffer workspace((attention.workspace_bytes() + 3) / 4);
  Dev16 out16(n * s.d()), dqkv16(n * s.width());
  DeviceBuffer stats(static_cast<std::size_t>(s.batch * s.n_head * s.seq));
  auto queue = [&] {
    attention.forward(out16.get(), stats.data(), qkv16.get(), workspace.data());
    attention.backward(dqkv16.get(), dout16.get(), out16.get(), stats.data(), qkv16.get(),
                       workspace.data());
  };
  if (graph) {
    queue();  // eager first: CUDA loads kernels lazily, which a capture must not do
    pion::cuda::Graph replay = pion::cuda::Graph::capture(ctx, queue);
    replay.launch(ctx);
  } else {
    queue();
  }
  ctx.synchronize();
  return {widened(ctx, out16, n * s.d()), download(stats, s.batch * s.n_head * s.seq),
          widened(ctx, dqkv16, n * s.width())};
}

// Our tensor-core flash attention on the same bf16 inputs.
Results run_flash_tc(Context& ctx, const Shape& s, Dev16& qkv16, Dev16& dout16) {
  const i64 n = s.batch * s.seq;
  Dev16 out16(n * s.d());
  DeviceBuffer lse(cl::flash_attention_lse_elements(s.batch, s.seq, s.n_head));
  DeviceBuffer scratch(cl::flash_attention_scratch_elements(s.batch, s.seq, s.n_head));
  DeviceBuffer dqkv(static_cast<std::size_t>(n * s.width()));
  cl::flash_attention_forward_tc(ctx, nullptr, lse.data(), nullptr, s.batch, s.seq, s.n_head,
                                 s.head_dim, s.n_kv_head, out16.get(), qkv16.get());
  cl::flash_attention_backward_tc(ctx, dqkv.data(), scratch.data(), nullptr, nullptr, lse.data(),
                                  nullptr, s.batch, s.seq, s.n_head, s.head_dim, s.n_kv_head,
                                  cl::GradWrite::Assign, out16.get(), dout16.get(), qkv16.get());
  ctx.synchronize();
  return {widened(ctx, out16, n * s.d()), download(lse, s.batch * s.n_head * s.seq),
          download(dqkv, n * s.width())};
}

void check_shape(const Shape& s, std::uint64_t seed) {
  Context ctx;
  const i64 n = s.batch * s.seq;
  Dev16 qkv16 = to_bf16(ctx, randn(n * s.width(), seed));
  Dev16 dout16 = to_bf16(ctx, randn(n * s.d(), seed + 1));
  const Results ref = run_flash_tc(ctx, s, qkv16, dout16);
  const Results got = run_cudnn(ctx, s, qkv16, dout16, false);
  const std::string at = " (" + s.name() + ")";
  expect_close("out" + at, got.out, ref.out, 1.0 / 64);
  expect_close("stats" + at, got.stats, ref.stats, 1e-3);
  expect_close("dqkv" + at, got.dqkv, ref.dqkv, 1.0 / 32);
  const Results replayed = run_cudnn(ctx, s, qkv16, dout16, true);
  expect_close("out, graph replay" + at, replayed.out, got.out, 1.0 / 128);
  expect_close("dqkv, graph replay" + at, replayed.dqkv, got.dqkv, 1.0 / 128);
}

TEST(CudaCudnnAttention, MultiHeadMatchesFlashTensorCore) {
  PION_REQUIRE_CUDNN_ATTENTION();
  check_shape({2, 100, 4, 64, 4}, 11);
}

TEST(CudaCudnnAttention, GroupedQueryHead128MatchesFlashTensorCore) {
  PION_REQUIRE_CUDNN_ATTENTION();
  check_shape({1, 77, 8, 128, 2}, 21);
}

// Needs no GPU: cuDNN finalises the operation graphs (shapes, types, connections) on the CPU.
// The shapes of the tests above and of GPT-2 small (16 x 1024, 12 heads of 64).
TEST(CudaCudnnAttention, GraphsAreWellFormedWithoutGpu) {
  if (const std::string why = cl::cudnn_attention_unavailable(); !why.empty()) GTEST_SKIP() << why;
  for (const Shape s :
       {Shape{2, 100, 4, 64, 4}, Shape{1, 77, 8, 128, 2}, Shape{16, 1024, 12, 64, 12}}) {
    EXPECT_NO_THROW(
        cl::cudnn_attention_validate_graphs(s.batch, s.seq, s.n_head, s.head_dim, s.n_kv_head))
        << s.name();
  }
  EXPECT_THROW(cl::cudnn_attention_validate_graphs(1, 16, 4, 60, 4), pion::Error);
}

// The shape checks come before cuDNN is asked (no GPU needed for the graphs' check; the
// constructor runs the same checks where there is a GPU).
TEST(CudaCudnnAttention, RejectsBadShapes) {
  if (const std::string why = cl::cudnn_attention_unavailable(); !why.empty()) GTEST_SKIP() << why;
  const std::vector<Shape> bad = {{1, 16, 4, 60, 4},    // head_dim % 8
                                  {1, 16, 4, 64, 3},    // 3 does not divide 4
                                  {0, 16, 4, 64, 4},    // no rows
                                  {1, 16, 4, 256, 4}};  // head_dim > 128
  for (const Shape& s : bad) {
    EXPECT_THROW(
        cl::cudnn_attention_validate_graphs(s.batch, s.seq, s.n_head, s.head_dim, s.n_kv_head),
        pion::Error)
        << s.name();
    if (pion::cuda::device_count() > 0) {
      Context ctx;
      EXPECT_THROW(cl::CudnnAttention(ctx, s.batch, s.seq, s.n_head, s.head_dim, s.n_kv_head),
                   pion::Error)
          << s.name();
    }
  }
}

}  // namespace

#endif
