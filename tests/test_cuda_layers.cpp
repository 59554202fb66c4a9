// The GPU decoder layers (include/pion/cuda/layers.h) against the CPU float layers
// (include/pion/model/layers.h) on random inputs: forward outputs, and backward gradients
// added into random (non-zero) starting gradients, so the "backward adds" convention is
// checked too. fp32 paths to ~1e-5 of the reference's largest magnitude; TF32 / bf16 GEMMs to
// looser bounds, their errors printed. Deterministic paths (embedding and RMSNorm weight
// gradients, the cross-entropy mean) are run twice and compared bit for bit. Every test
// skips with a clear message when this build has no CUDA back end or the machine has no CUDA
// device; scripts/gpu-check.sh runs them on a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "pion/core/error.h"
#include "pion/core/random.h"
#include "pion/model/layers.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/layers.h"
#endif

#ifndef PION_HAVE_CUDA

TEST(CudaLayers, NeedsCudaBuild) {
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

std::vector<float> randn(i64 count, std::uint64_t seed, double std = 1.0, double mean = 0.0) {
  pion::Rng rng(seed);
  std::vector<float> v(static_cast<std::size_t>(count));
  for (float& x : v) x = static_cast<float>(mean + std * rng.normal());
  return v;
}

std::vector<std::int32_t> random_ids(i64 count, i64 below, std::uint64_t seed) {
  pion::Rng rng(seed);
  std::vector<std::int32_t> v(static_cast<std::size_t>(count));
  for (std::int32_t& x : v)
    x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(below)));
  return v;
}

// A device copy of a host vector.
struct Dev {
  DeviceBuffer buf;
  explicit Dev(const std::vector<float>& host) : buf(host.size()) {
    buf.upload(host.data(), host.size());
  }
  explicit Dev(i64 count) : buf(static_cast<std::size_t>(count)) {}
  float* get() { return buf.data(); }
  // Waits for the whole device (DeviceBuffer::download synchronises) and copies back.
  std::vector<float> host() const {
    std::vector<float> h(buf.size());
    buf.download(h.data(), h.size());
    return h;
  }
};

struct DevIds {
  pion::cuda::DeviceInt32Buffer buf;
  explicit DevIds(const std::vector<std::int32_t>& host) : buf(host.size()) {
    buf.upload(host.data(), host.size());
  }
  std::int32_t* get() { return buf.data(); }
};

// max |gpu - cpu| / max |cpu|, printed; fails above tol, on a size mismatch, on a non-finite
// value, or when the reference is all zeros (a vacuous comparison).
double expect_close(const std::string& what, const std::vector<float>& gpu,
                    const std::vector<float>& cpu, double tol) {
  EXPECT_EQ(gpu.size(), cpu.size()) << what;
  if (gpu.size() != cpu.size()) return INFINITY;
  double max_diff = 0.0, max_ref = 0.0;
  bool finite = true;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    finite = finite && std::isfinite(gpu[i]);
    max_diff = std::max(max_diff, std::abs(static_cast<double>(gpu[i]) - cpu[i]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(cpu[i])));
  }
  const double rel = max_ref > 0.0 ? max_diff / max_ref : INFINITY;
  std::printf("  %-36s vs cpu: max|gpu - cpu| / max|cpu| = %.3e (bound %.0e)\n", what.c_str(), rel,
              tol);
  EXPECT_TRUE(finite) << what << ": the GPU result holds a NaN or Inf";
  EXPECT_GT(max_ref, 0.0) << what << ": the CPU reference is all zeros";
  EXPECT_LE(rel, tol) << what;
  return rel;
}

constexpr double kFp32 = 1e-5;
// Chained fp32 GEMMs and reductions summed in a different order than the CPU's.
constexpr double kFp32Chain = 3e-5;

TEST(CudaLayers, EmbeddingMatchesCpuBitForBit) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 v = 50, c = 300, n = 257;  // c > one block of columns; many repeated tokens
  const auto tokens = random_ids(n, v, 1);
  const auto table = randn(v * c, 2);
  const auto dout = randn(n * c, 3);
  const auto dtable0 = randn(v * c, 4);

  std::vector<float> out(static_cast<std::size_t>(n * c)), dtable = dtable0;
  hl::embedding_forward(out.data(), tokens.data(), table.data(), n, c);
  hl::embedding_backward(dtable.data(), dout.data(), tokens.data(), n, c);

  DevIds d_tokens(tokens);
  Dev d_table(table), d_dout(dout), d_out(n * c), d_dtable(dtable0);
  cl::embedding_forward(ctx, d_out.get(), d_tokens.get(), d_table.get(), n, c);
  cl::embedding_backward(ctx, d_dtable.get(), d_dout.get(), d_tokens.get(), n, c);
  EXPECT_EQ(d_out.host(), out);
  // Same additions in the same order per element: identical bits.
  EXPECT_EQ(d_dtable.host(), dtable);
  expect_close("embedding dtable", d_dtable.host(), dtable, 0.0);
}

// NaN poison: what a first writer that assigns must never read.
std::vector<float> nans(i64 count) {
  return std::vector<float>(static_cast<std::size_t>(count), std::nanf(""));
}

// n = 37: one row chunk of the weight gradient's 2-D grid; n = 1000: 16 chunks, the last
// partial (1000 = 15 x 64 + 40); c = 300: the last column block partial.
TEST(CudaLayers, RmsNormMatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  for (const i64 n : {i64{37}, i64{1000}}) {
    const i64 c = 300;  // c > threads per block: the strided row loop runs twice
    const double eps = 1e-5;
    const std::string at = " n=" + std::to_string(n);
    const auto x = randn(n * c, 10);
    const auto w = randn(c, 11, 0.3, 1.0);
    const auto dout = randn(n * c, 12);
    const auto dx0 = randn(n * c, 13), dw0 = randn(c, 14);

    std::vector<float> out(static_cast<std::size_t>(n * c)), rstd(static_cast<std::size_t>(n));
    std::vector<float> dx = dx0, dw = dw0;
    hl::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), n, c, eps);
    hl::rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), n, c);

    const i64 scratch = static_cast<i64>(cl::rmsnorm_backward_scratch_elements(n, c));
    EXPECT_EQ(scratch, (n + cl::kRmsNormChunkRows - 1) / cl::kRmsNormChunkRows * c);
    Dev d_x(x), d_w(w), d_dout(dout), d_out(n * c), d_rstd(n), d_dx(dx0), d_dw(dw0);
    Dev d_scratch(nans(scratch));  // overwritten before it is read
    cl::rmsnorm_forward(ctx, d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), n, c, eps);
    cl::rmsnorm_backward(ctx, d_dx.get(), d_dw.get(), d_scratch.get(), d_dout.get(), d_x.get(),
                         d_w.get(), d_rstd.get(), n, c);
    expect_close("rmsnorm out" + at, d_out.host(), out, kFp32);
    expect_close("rmsnorm rstd" + at, d_rstd.host(), rstd, kFp32);
    expect_close("rmsnorm dx" + at, d_dx.host(), dx, kFp32Chain);
    expect_close("rmsnorm dweight" + at, d_dw.host(), dw, kFp32Chain);

    // The weight gradient has no atomics and a fixed summation order: a second run from the
    // same start gives the same bits (and, by construction, so does any block or thread
    // order: tools/cuda-emu/run.sh --orders runs this under reverse and random orders).
    const auto first = d_dw.host();
    Dev d_dw2(dw0), d_dx2(dx0);
    cl::rmsnorm_backward(ctx, d_dx2.get(), d_dw2.get(), d_scratch.get(), d_dout.get(), d_x.get(),
                         d_w.get(), d_rstd.get(), n, c);
    EXPECT_EQ(d_dw2.host(), first);
    std::uint64_t hash = 1469598103934665603ull;  // FNV-1a over the bits, to compare orders
    for (float v : first) {
      std::uint32_t bits = 0;
      std::memcpy(&bits, &v, sizeof bits);
      hash = (hash ^ bits) * 1099511628211ull;
    }
    std::printf("  rmsnorm dweight%s bits: fnv1a %016llx\n", at.c_str(),
                static_cast<unsigned long long>(hash));

    // Assign: dx = the gradient, whatever dx held (NaN here), as the CPU's from zero.
    std::vector<float> dx_from_zero(static_cast<std::size_t>(n * c), 0.0f), dw_unused = dw0;
    hl::rmsnorm_backward(dx_from_zero.data(), dw_unused.data(), dout.data(), x.data(), w.data(),
                         rstd.data(), n, c);
    Dev d_dx3(nans(n * c)), d_dw3(dw0);
    cl::rmsnorm_backward(ctx, d_dx3.get(), d_dw3.get(), d_scratch.get(), d_dout.get(), d_x.get(),
                         d_w.get(), d_rstd.get(), n, c, cl::GradWrite::Assign);
    expect_close("rmsnorm dx (assign)" + at, d_dx3.host(), dx_from_zero, kFp32Chain);
    EXPECT_EQ(d_dw3.host(), first);  // the weight gradient still adds
  }
  Dev dx(4), dw(4), g(4), x(4), w(4), r(1);
  EXPECT_THROW(cl::rmsnorm_backward(ctx, dx.get(), dw.get(), nullptr, g.get(), x.get(), w.get(),
                                    r.get(), 1, 4),
               pion::Error);
}

void check_linear(cl::MatmulPrecision precision, double tol, const std::string& label) {
  Context ctx;
  const i64 n = 33, d_in = 70, d_out = 50;
  const auto in = randn(n * d_in, 20);
  const auto w = randn(d_out * d_in, 21, 0.2);
  const auto dout = randn(n * d_out, 22);
  const auto din0 = randn(n * d_in, 23), dw0 = randn(d_out * d_in, 24);

  std::vector<float> out(static_cast<std::size_t>(n * d_out)), din = din0, dw = dw0;
  hl::linear_forward(out.data(), in.data(), w.data(), n, d_in, d_out);
  hl::linear_backward(din.data(), dw.data(), dout.data(), in.data(), w.data(), n, d_in, d_out);

  cl::Bf16Workspace ws(precision == cl::MatmulPrecision::Bf16
                           ? cl::linear_bf16_workspace_elements(n, d_in, d_out)
                           : 0);
  cl::Bf16Workspace* wsp = precision == cl::MatmulPrecision::Bf16 ? &ws : nullptr;
  Dev dev_in(in), dev_w(w), dev_dout(dout), dev_out(n * d_out), dev_din(din0), dev_dw(dw0);
  cl::linear_forward(ctx, dev_out.get(), dev_in.get(), dev_w.get(), n, d_in, d_out, precision, wsp);
  cl::linear_backward(ctx, dev_din.get(), dev_dw.get(), dev_dout.get(), dev_in.get(), dev_w.get(),
                      n, d_in, d_out, precision, wsp);
  expect_close(label + " out", dev_out.host(), out, tol);
  expect_close(label + " din", dev_din.host(), din, tol);
  expect_close(label + " dweight", dev_dw.host(), dw, tol);

  // din = nullptr: only the weight gradient.
  std::vector<float> dw_only = dw0;
  hl::linear_backward<float>(nullptr, dw_only.data(), dout.data(), in.data(), w.data(), n, d_in,
                             d_out);
  Dev dev_dw_only(dw0);
  cl::linear_backward(ctx, nullptr, dev_dw_only.get(), dev_dout.get(), dev_in.get(), dev_w.get(), n,
                      d_in, d_out, precision, wsp);
  expect_close(label + " dweight (no din)", dev_dw_only.host(), dw_only, tol);
}

TEST(CudaLayers, LinearFp32MatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  check_linear(cl::MatmulPrecision::Fp32, kFp32Chain, "linear fp32");
}

TEST(CudaLayers, LinearTf32AndBf16CloseToCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  // TF32 keeps 10 mantissa bits, bf16 7: errors of ~1e-3 and ~1e-2 of the output scale.
  check_linear(cl::MatmulPrecision::Tf32, 5e-3, "linear tf32");
  check_linear(cl::MatmulPrecision::Bf16, 3e-2, "linear bf16");
}

// A weight inside the workspace's bf16 mirror is read from it instead of converted per call:
// the GEMMs see the same bf16 values (both round to nearest even), so outputs and gradients
// are bit for bit those of the converting path, at any offset inside the mirrored buffer.
TEST(CudaLayers, LinearBf16WeightMirrorEqualsConversionBitForBit) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 33, d_in = 70, d_out = 50, before = 7, after = 11;
  const i64 wn = d_out * d_in;
  const auto in = randn(n * d_in, 25);
  const auto params = randn(before + wn + after, 26, 0.2);  // the weight sits inside a buffer
  const auto dout = randn(n * d_out, 27);
  const auto din0 = randn(n * d_in, 28), dw0 = randn(wn, 29);
  Dev d_params(params), d_input(in), d_dout(dout);
  const float* weight = d_params.get() + before;

  // Reference: the weight converted on every call.
  cl::Bf16Workspace plain(cl::linear_bf16_workspace_elements(n, d_in, d_out));
  Dev out1(n * d_out), din1(din0), dw1(dw0);
  cl::linear_forward(ctx, out1.get(), d_input.get(), weight, n, d_in, d_out,
                     cl::MatmulPrecision::Bf16, &plain);
  cl::linear_backward(ctx, din1.get(), dw1.get(), d_dout.get(), d_input.get(), weight, n, d_in,
                      d_out, cl::MatmulPrecision::Bf16, &plain);

  // Mirror of the whole buffer, converted once; the workspace needs no weight slice.
  cl::Bf16Workspace mirror(static_cast<std::size_t>(before + wn + after));
  cl::convert_to_bf16(ctx, mirror.data(), d_params.get(), before + wn + after);
  const std::size_t small = cl::linear_bf16_workspace_elements(n, d_in, d_out, true);
  EXPECT_LT(small, plain.size());
  cl::Bf16Workspace ws(small);
  // Without the mirror the small workspace is refused (the weight would need a slice).
  Dev out_x(n * d_out);
  EXPECT_THROW(cl::linear_forward(ctx, out_x.get(), d_input.get(), weight, n, d_in, d_out,
                                  cl::MatmulPrecision::Bf16, &ws),
               pion::Error);
  ws.set_weight_mirror(d_params.get(), mirror.data(),
                       static_cast<std::size_t>(before + wn + after));
  EXPECT_NE(ws.mirrored(weight, wn), nullptr);
  EXPECT_EQ(ws.mirrored(weight, wn + after + 1), nullptr);  // runs past the mirror's end
  EXPECT_EQ(ws.mirrored(d_input.get(), 1), nullptr);        // another buffer
  Dev out2(n * d_out), din2(din0), dw2(dw0);
  cl::linear_forward(ctx, out2.get(), d_input.get(), weight, n, d_in, d_out,
                     cl::MatmulPrecision::Bf16, &ws);
  cl::linear_backward(ctx, din2.get(), dw2.get(), d_dout.get(), d_input.get(), weight, n, d_in,
                      d_out, cl::MatmulPrecision::Bf16, &ws);
  EXPECT_EQ(out2.host(), out1.host());
  EXPECT_EQ(din2.host(), din1.host());
  EXPECT_EQ(dw2.host(), dw1.host());

  // And the mirrored path is the bf16 layer: close to the fp32 CPU layer at bf16's bound.
  std::vector<float> out(static_cast<std::size_t>(n * d_out));
  std::vector<float> w(params.begin() + before, params.begin() + before + wn);
  hl::linear_forward(out.data(), in.data(), w.data(), n, d_in, d_out);
  expect_close("linear bf16 out (mirrored weight)", out2.host(), out, 3e-2);
  ws.set_weight_mirror(nullptr, nullptr, 0);
  EXPECT_EQ(ws.mirrored(weight, wn), nullptr);
}

// GradWrite::Assign: din = dout W whatever din held (NaN here: a beta = 0 GEMM never reads
// it), equal to the CPU's gradient from zero; the weight gradient still adds.
TEST(CudaLayers, LinearBackwardAssignsDin) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 33, d_in = 70, d_out = 50;
  const auto in = randn(n * d_in, 20);
  const auto w = randn(d_out * d_in, 21, 0.2);
  const auto dout = randn(n * d_out, 22);
  const auto dw0 = randn(d_out * d_in, 24);
  std::vector<float> din(static_cast<std::size_t>(n * d_in), 0.0f), dw = dw0;
  hl::linear_backward(din.data(), dw.data(), dout.data(), in.data(), w.data(), n, d_in, d_out);
  for (auto [mp, tol, name] : {std::tuple{cl::MatmulPrecision::Fp32, kFp32Chain, "fp32"},
                               std::tuple{cl::MatmulPrecision::Bf16, 3e-2, "bf16"}}) {
    cl::Bf16Workspace ws(cl::linear_bf16_workspace_elements(n, d_in, d_out));
    Dev d_in_(in), d_w(w), d_dout(dout), d_din(nans(n * d_in)), d_dw(dw0);
    cl::linear_backward(ctx, d_din.get(), d_dw.get(), d_dout.get(), d_in_.get(), d_w.get(), n, d_in,
                        d_out, mp, &ws, cl::GradWrite::Assign);
    expect_close(std::string("linear din assigned (") + name + ")", d_din.host(), din, tol);
    expect_close(std::string("linear dweight added (") + name + ")", d_dw.host(), dw, tol);
  }
}

// linear_backward_bf16 reads a dout already in bf16 (cross_entropy_bf16's dlogits in CudaLlama)
// from the workspace's own dout slice: the same bf16 operands as linear_backward converting the
// fp32 dout into that slice, so din and dweight are bit for bit linear_backward's (weight
// converted or mirrored, din assigned or absent), and the slice is left as it was.
TEST(CudaLayers, LinearBackwardBf16DoutEqualsConversionBitForBit) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 33, d_in = 70, d_out = 50, wn = d_out * d_in;
  const auto in = randn(n * d_in, 30);
  const auto w = randn(wn, 31, 0.2);
  const auto dout = randn(n * d_out, 32);
  const auto dw0 = randn(wn, 34);
  Dev d_input(in), d_w(w), d_dout(dout);
  cl::Bf16Workspace mirror(static_cast<std::size_t>(wn));
  cl::convert_to_bf16(ctx, mirror.data(), d_w.get(), wn);
  for (const bool mirrored : {false, true}) {
    SCOPED_TRACE(mirrored ? "mirrored weight" : "converted weight");
    cl::Bf16Workspace ws(cl::linear_bf16_workspace_elements(n, d_in, d_out, mirrored));
    if (mirrored) ws.set_weight_mirror(d_w.get(), mirror.data(), static_cast<std::size_t>(wn));
    EXPECT_GE(cl::linear_bf16_dout_elements(n, d_out), static_cast<std::size_t>(n * d_out));
    // Reference: the fp32 dout converted by linear_backward.
    Dev din1(nans(n * d_in)), dw1(dw0), dw1_only(dw0);
    cl::linear_backward(ctx, din1.get(), dw1.get(), d_dout.get(), d_input.get(), d_w.get(), n, d_in,
                        d_out, cl::MatmulPrecision::Bf16, &ws, cl::GradWrite::Assign);
    cl::linear_backward(ctx, nullptr, dw1_only.get(), d_dout.get(), d_input.get(), d_w.get(), n,
                        d_in, d_out, cl::MatmulPrecision::Bf16, &ws);
    // The bf16 dout placed in the workspace's dout slice, then the bf16-dout backward.
    cl::convert_to_bf16(ctx, ws.data(), d_dout.get(), n * d_out);
    Dev slice_before(n * d_out);
    cl::convert_from_bf16(ctx, slice_before.get(), ws.data(), n * d_out);
    Dev din2(nans(n * d_in)), dw2(dw0), dw2_only(dw0);
    cl::linear_backward_bf16(ctx, din2.get(), dw2.get(), ws.data(), d_input.get(), d_w.get(), n,
                             d_in, d_out, ws, cl::GradWrite::Assign);
    cl::linear_backward_bf16(ctx, nullptr, dw2_only.get(), ws.data(), d_input.get(), d_w.get(), n,
                             d_in, d_out, ws);
    Dev slice_after(n * d_out);
    cl::convert_from_bf16(ctx, slice_after.get(), ws.data(), n * d_out);
    EXPECT_EQ(slice_after.host(), slice_before.host()) << "the call wrote into its dout";
    EXPECT_EQ(din2.host(), din1.host());
    EXPECT_EQ(dw2.host(), dw1.host());
    EXPECT_EQ(dw2_only.host(), dw1_only.host());
    // And it is the bf16 layer: close to the fp32 CPU gradients at the bf16 linear bound.
    std::vector<float> din(static_cast<std::size_t>(n * d_in), 0.0f), dw = dw0;
    hl::linear_backward(din.data(), dw.data(), dout.data(), in.data(), w.data(), n, d_in, d_out);
    expect_close("linear_backward_bf16 din", din2.host(), din, 3e-2);
    expect_close("linear_backward_bf16 dweight", dw2.host(), dw, 3e-2);
  }
  // A workspace too small for the input's slice is refused before anything is queued.
  cl::Bf16Workspace small(cl::linear_bf16_dout_elements(n, d_out));
  Dev dw3(dw0);
  EXPECT_THROW(cl::linear_backward_bf16(ctx, nullptr, dw3.get(), small.data(), d_input.get(),
                                        d_w.get(), n, d_in, d_out, small),
               pion::Error);
}

TEST(CudaLayers, LinearBf16NeedsWorkspace) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  Dev a(4 * 4), w(4 * 4), out(4 * 4);
  EXPECT_THROW(cl::linear_forward(ctx, out.get(), a.get(), w.get(), 4, 4, 4,
                                  cl::MatmulPrecision::Bf16, nullptr),
               pion::Error);
}

TEST(CudaLayers, RopeMatchesCpuInsideQkvRows) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 batch = 2, seq = 7, n_head = 3, head_dim = 8, d = n_head * head_dim;
  const i64 stride = 3 * d;  // q inside fused [q | k | v] rows: k and v must stay untouched
  const auto table = hl::make_rope_table<float>(10, head_dim, 10000.0);
  const cl::DeviceRopeTable d_table(table.cos, table.sin, table.seq_len, table.half);
  const auto x0 = randn(batch * seq * stride, 30);

  std::vector<float> x = x0;
  hl::rope_forward(x.data(), table, batch, seq, n_head, head_dim, stride);
  Dev d_x(x0);
  cl::rope_forward(ctx, d_x.get(), d_table, batch, seq, n_head, head_dim, stride);
  const auto gx = d_x.host();
  expect_close("rope forward", gx, x, kFp32);
  for (i64 r = 0; r < batch * seq; ++r)
    for (i64 j = d; j < stride; ++j)
      ASSERT_EQ(gx[static_cast<std::size_t>(r * stride + j)],
                x0[static_cast<std::size_t>(r * stride + j)])
          << "row " << r << " column " << j << " outside q changed";

  std::vector<float> g = x0;
  hl::rope_backward(g.data(), table, batch, seq, n_head, head_dim, stride);
  Dev d_g(x0);
  cl::rope_backward(ctx, d_g.get(), d_table, batch, seq, n_head, head_dim, stride);
  expect_close("rope backward", d_g.host(), g, kFp32);

  // A table too short for seq is a host-side error.
  EXPECT_THROW(cl::rope_forward(ctx, d_x.get(), d_table, 1, 11, n_head, head_dim, stride),
               pion::Error);
}

TEST(CudaLayers, AttentionMatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 batch = 2, seq = 13, n_head = 3, head_dim = 8, d = n_head * head_dim;
  const i64 nqkv = batch * seq * 3 * d, nout = batch * seq * d;
  const i64 nprobs = batch * n_head * seq * seq;
  const auto qkv = randn(nqkv, 40);
  const auto dout = randn(nout, 41);
  const auto dqkv0 = randn(nqkv, 42);

  std::vector<float> out(static_cast<std::size_t>(nout)), probs(static_cast<std::size_t>(nprobs));
  std::vector<float> scratch(probs.size()), dqkv = dqkv0;
  hl::attention_forward(out.data(), probs.data(), qkv.data(), batch, seq, n_head, head_dim);
  hl::attention_backward(dqkv.data(), scratch.data(), dout.data(), probs.data(), qkv.data(), batch,
                         seq, n_head, head_dim);

  Dev d_qkv(qkv), d_dout(dout), d_out(nout), d_probs(nprobs), d_scratch(nprobs), d_dqkv(dqkv0);
  cl::attention_forward(ctx, d_out.get(), d_probs.get(), d_qkv.get(), batch, seq, n_head, head_dim);
  cl::attention_backward(ctx, d_dqkv.get(), d_scratch.get(), d_dout.get(), d_probs.get(),
                         d_qkv.get(), batch, seq, n_head, head_dim);
  const auto gprobs = d_probs.host();
  expect_close("attention out", d_out.host(), out, kFp32Chain);
  expect_close("attention probs", gprobs, probs, kFp32Chain);
  expect_close("attention dqkv", d_dqkv.host(), dqkv, kFp32Chain);
  // The causal mask: exact zeros above the diagonal.
  for (i64 r = 0; r < batch * n_head * seq; ++r)
    for (i64 j = r % seq + 1; j < seq; ++j)
      ASSERT_EQ(gprobs[static_cast<std::size_t>(r * seq + j)], 0.0f) << "row " << r << " key " << j;

  // TF32 GEMMs: close at a loose bound (printed).
  Dev t_out(nout), t_probs(nprobs);
  cl::attention_forward(ctx, t_out.get(), t_probs.get(), d_qkv.get(), batch, seq, n_head, head_dim,
                        0, cl::MatmulPrecision::Tf32);
  expect_close("attention out (tf32)", t_out.host(), out, 1e-2);
  EXPECT_THROW(cl::attention_forward(ctx, t_out.get(), t_probs.get(), d_qkv.get(), batch, seq,
                                     n_head, head_dim, 0, cl::MatmulPrecision::Bf16),
               pion::Error);
  // n_kv_head must be >= 0 (0: n_head) and divide n_head.
  EXPECT_THROW(cl::attention_forward(ctx, t_out.get(), t_probs.get(), d_qkv.get(), batch, seq,
                                     n_head, head_dim, 2),
               pion::Error);
  EXPECT_THROW(cl::attention_backward(ctx, d_dqkv.get(), d_scratch.get(), d_dout.get(),
                                      d_probs.get(), d_qkv.get(), batch, seq, n_head, head_dim, -1),
               pion::Error);
}

// GradWrite::Assign: dqkv = the gradient whatever it held (NaN), multi-head and grouped-query
// (where dK and dV sum over a group: the first member's GEMM assigns, the others add).
TEST(CudaLayers, AttentionBackwardAssignsDqkv) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  for (const i64 kv_heads : {i64{0}, i64{2}}) {
    const i64 batch = 2, seq = 13, n_head = 4, head_dim = 8, d = n_head * head_dim;
    const i64 kv = (kv_heads == 0 ? n_head : kv_heads) * head_dim;
    const i64 nqkv = batch * seq * (d + 2 * kv), nout = batch * seq * d;
    const i64 nprobs = batch * n_head * seq * seq;
    const auto qkv = randn(nqkv, 43);
    const auto dout = randn(nout, 44);
    std::vector<float> out(static_cast<std::size_t>(nout)), probs(static_cast<std::size_t>(nprobs));
    std::vector<float> scratch(probs.size()), dqkv(static_cast<std::size_t>(nqkv), 0.0f);
    hl::attention_forward(out.data(), probs.data(), qkv.data(), batch, seq, n_head, head_dim,
                          kv_heads);
    hl::attention_backward(dqkv.data(), scratch.data(), dout.data(), probs.data(), qkv.data(),
                           batch, seq, n_head, head_dim, kv_heads);
    Dev d_qkv(qkv), d_dout(dout), d_out(nout), d_probs(nprobs), d_scratch(nprobs),
        d_dqkv(nans(nqkv));
    cl::attention_forward(ctx, d_out.get(), d_probs.get(), d_qkv.get(), batch, seq, n_head,
                          head_dim, kv_heads);
    cl::attention_backward(ctx, d_dqkv.get(), d_scratch.get(), d_dout.get(), d_probs.get(),
                           d_qkv.get(), batch, seq, n_head, head_dim, kv_heads,
                           cl::MatmulPrecision::Fp32, cl::GradWrite::Assign);
    expect_close("attention dqkv assigned, kv " + std::to_string(kv / head_dim), d_dqkv.host(),
                 dqkv, kFp32Chain);
  }
}

TEST(CudaLayers, SwigluMatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 19, f = 45;
  const auto gu = randn(n * 2 * f, 50, 2.0);
  const auto dout = randn(n * f, 51);
  const auto dgu0 = randn(n * 2 * f, 52);

  std::vector<float> out(static_cast<std::size_t>(n * f)), dgu = dgu0;
  hl::swiglu_forward(out.data(), gu.data(), n, f);
  hl::swiglu_backward(dgu.data(), dout.data(), gu.data(), n, f);

  Dev d_gu(gu), d_dout(dout), d_out(n * f), d_dgu(dgu0);
  cl::swiglu_forward(ctx, d_out.get(), d_gu.get(), n, f);
  cl::swiglu_backward(ctx, d_dgu.get(), d_dout.get(), d_gu.get(), n, f);
  expect_close("swiglu out", d_out.host(), out, kFp32);
  expect_close("swiglu dgu", d_dgu.host(), dgu, kFp32);

  // Assign: dgu = the gradient whatever it held (NaN), as the CPU's from zero.
  std::vector<float> dgu_from_zero(dgu0.size(), 0.0f);
  hl::swiglu_backward(dgu_from_zero.data(), dout.data(), gu.data(), n, f);
  Dev d_dgu2(nans(n * 2 * f));
  cl::swiglu_backward(ctx, d_dgu2.get(), d_dout.get(), d_gu.get(), n, f, cl::GradWrite::Assign);
  expect_close("swiglu dgu (assign)", d_dgu2.host(), dgu_from_zero, kFp32);
}

// ---- bf16 activations: the producers' bf16 copies and the linear layers reading them --------

// Device room for count bf16 values (a float buffer of half the count, read back as bits).
struct Dev16 {
  DeviceBuffer buf;
  i64 count;
  explicit Dev16(i64 n) : buf(static_cast<std::size_t>((n + 1) / 2)), count(n) {}
  void* get() { return buf.data(); }
  // The values widened to float (exact: a bf16 is the top half of a float's bits).
  std::vector<float> host() const {
    std::vector<float> raw(buf.size());
    buf.download(raw.data(), raw.size());
    std::vector<std::uint16_t> bits(raw.size() * 2);
    std::memcpy(bits.data(), raw.data(), raw.size() * sizeof(float));
    std::vector<float> out(static_cast<std::size_t>(count));
    for (std::size_t i = 0; i < out.size(); ++i) {
      const std::uint32_t wide = static_cast<std::uint32_t>(bits[i]) << 16;
      std::memcpy(&out[i], &wide, sizeof wide);
    }
    return out;
  }
};

// The bf16 copy that linear_* would make of a device fp32 tensor: convert_to_bf16.
std::vector<float> converted(Context& ctx, const float* d_values, i64 count) {
  Dev16 d16(count);
  cl::convert_to_bf16(ctx, d16.get(), d_values, count);
  return d16.host();
}

// A bf16 copy against the fp32 CPU value, element by element. bf16 keeps 8 significant bits,
// so rounding y to nearest even moves it by at most half a unit in the 8th bit: |bf16(y) - y|
// <= 2^-8 |y|. The GPU's fp32 y differs from the CPU's c by e (the fp32 path's own bound,
// fp32_rel times the reference's largest magnitude), so |bf16(y) - c| <= 2^-8 |y| + e <=
// 2^-8 |c| + (1 + 2^-8) e; the check allows 2^-8 |c| + 2 e. Also: at least one value must
// actually move by more than fp32 rounding (the copy is bf16, not a wider copy).
void expect_bf16_close(const std::string& what, const std::vector<float>& gpu16,
                       const std::vector<float>& cpu, double fp32_rel) {
  ASSERT_EQ(gpu16.size(), cpu.size()) << what;
  double max_ref = 0.0;
  for (float c : cpu) max_ref = std::max(max_ref, std::abs(static_cast<double>(c)));
  ASSERT_GT(max_ref, 0.0) << what << ": the CPU reference is all zeros";
  const double e = fp32_rel * max_ref;
  double worst = 0.0, max_moved = 0.0;
  std::size_t bad = 0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double c = cpu[i], diff = std::abs(gpu16[i] - c);
    const double bound = std::ldexp(std::abs(c), -8) + 2.0 * e;
    if (!(diff <= bound)) ++bad;  // NaN counts as bad
    worst = std::max(worst, diff / bound);
    max_moved = std::max(max_moved, diff);
  }
  std::printf("  %-36s vs cpu: worst |bf16 - cpu| / bound = %.3f\n", what.c_str(), worst);
  EXPECT_EQ(bad, 0u) << what << ": values beyond bf16 rounding of the CPU's";
  EXPECT_GT(max_moved, 2.0 * e) << what << ": no value shows bf16 rounding";
}

// RMSNorm's bf16 output (forward) and dx (backward, after the add) are the fp32 results
// rounded to nearest even, bit for bit what convert_to_bf16 makes of them, with or without the
// fp32 output, and within bf16 rounding of the CPU layer.
TEST(CudaLayers, RmsNormWritesBf16Copies) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 37, c = 300;
  const double eps = 1e-5;
  const auto x = randn(n * c, 10);
  const auto w = randn(c, 11, 0.3, 1.0);
  const auto dout = randn(n * c, 12);
  const auto dx0 = randn(n * c, 13), dw0 = randn(c, 14);
  std::vector<float> out(static_cast<std::size_t>(n * c)), rstd(static_cast<std::size_t>(n));
  std::vector<float> dx = dx0, dw = dw0, dx_from_zero(dx0.size(), 0.0f), dw_unused = dw0;
  hl::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), n, c, eps);
  hl::rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), n, c);
  hl::rmsnorm_backward(dx_from_zero.data(), dw_unused.data(), dout.data(), x.data(), w.data(),
                       rstd.data(), n, c);

  Dev d_x(x), d_w(w), d_dout(dout), d_out(n * c), d_rstd(n), d_rstd2(n);
  Dev d_scratch(nans(static_cast<i64>(cl::rmsnorm_backward_scratch_elements(n, c))));
  Dev16 out16(n * c), only16(n * c);
  cl::rmsnorm_forward(ctx, d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), n, c, eps, out16.get());
  // Only the bf16 copy (the model's path when a GEMM is the only reader).
  cl::rmsnorm_forward(ctx, nullptr, d_rstd2.get(), d_x.get(), d_w.get(), n, c, eps, only16.get());
  const auto got16 = out16.host();
  EXPECT_EQ(got16, converted(ctx, d_out.get(), n * c));
  EXPECT_EQ(only16.host(), got16);
  EXPECT_EQ(d_rstd2.host(), d_rstd.host());
  expect_close("rmsnorm out (with bf16 copy)", d_out.host(), out, kFp32);
  expect_bf16_close("rmsnorm out bf16", got16, out, kFp32);

  for (const auto write : {cl::GradWrite::Add, cl::GradWrite::Assign}) {
    const bool add = write == cl::GradWrite::Add;
    Dev d_dx(add ? dx0 : nans(n * c)), d_dw(dw0);
    Dev16 dx16(n * c);
    cl::rmsnorm_backward(ctx, d_dx.get(), d_dw.get(), d_scratch.get(), d_dout.get(), d_x.get(),
                         d_w.get(), d_rstd.get(), n, c, write, dx16.get());
    const auto got = dx16.host();
    EXPECT_EQ(got, converted(ctx, d_dx.get(), n * c)) << (add ? "add" : "assign");
    expect_close(add ? "rmsnorm dx (with bf16 copy)" : "rmsnorm dx assign (with bf16 copy)",
                 d_dx.host(), add ? dx : dx_from_zero, kFp32Chain);
    expect_bf16_close(add ? "rmsnorm dx bf16 (add)" : "rmsnorm dx bf16 (assign)", got,
                      add ? dx : dx_from_zero, kFp32Chain);
  }
  EXPECT_THROW(cl::rmsnorm_forward(ctx, nullptr, d_rstd.get(), d_x.get(), d_w.get(), n, c, eps),
               pion::Error);
}

// SwiGLU's bf16 output and gradient: the fp32 results rounded (bit for bit convert_to_bf16's),
// the gradient also without an fp32 dgu (Assign only), within bf16 rounding of the CPU.
TEST(CudaLayers, SwigluWritesBf16Copies) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 19, f = 45;
  const auto gu = randn(n * 2 * f, 50, 2.0);
  const auto dout = randn(n * f, 51);
  const auto dgu0 = randn(n * 2 * f, 52);
  std::vector<float> out(static_cast<std::size_t>(n * f)), dgu = dgu0;
  std::vector<float> dgu_from_zero(dgu0.size(), 0.0f);
  hl::swiglu_forward(out.data(), gu.data(), n, f);
  hl::swiglu_backward(dgu.data(), dout.data(), gu.data(), n, f);
  hl::swiglu_backward(dgu_from_zero.data(), dout.data(), gu.data(), n, f);

  Dev d_gu(gu), d_dout(dout), d_out(n * f), d_dgu(dgu0), d_dgu_a(nans(n * 2 * f));
  Dev16 out16(n * f), only16(n * f), dgu16(n * 2 * f), dgu16_a(n * 2 * f), dgu16_only(n * 2 * f);
  cl::swiglu_forward(ctx, d_out.get(), d_gu.get(), n, f, out16.get());
  cl::swiglu_forward(ctx, nullptr, d_gu.get(), n, f, only16.get());
  EXPECT_EQ(out16.host(), converted(ctx, d_out.get(), n * f));
  EXPECT_EQ(only16.host(), out16.host());
  expect_close("swiglu out (with bf16 copy)", d_out.host(), out, kFp32);
  expect_bf16_close("swiglu out bf16", out16.host(), out, kFp32);

  cl::swiglu_backward(ctx, d_dgu.get(), d_dout.get(), d_gu.get(), n, f, cl::GradWrite::Add,
                      dgu16.get());
  EXPECT_EQ(dgu16.host(), converted(ctx, d_dgu.get(), n * 2 * f));
  expect_close("swiglu dgu (with bf16 copy)", d_dgu.host(), dgu, kFp32);
  expect_bf16_close("swiglu dgu bf16 (add)", dgu16.host(), dgu, kFp32);
  cl::swiglu_backward(ctx, d_dgu_a.get(), d_dout.get(), d_gu.get(), n, f, cl::GradWrite::Assign,
                      dgu16_a.get());
  cl::swiglu_backward(ctx, nullptr, d_dout.get(), d_gu.get(), n, f, cl::GradWrite::Assign,
                      dgu16_only.get());
  EXPECT_EQ(dgu16_a.host(), converted(ctx, d_dgu_a.get(), n * 2 * f));
  EXPECT_EQ(dgu16_only.host(), dgu16_a.host());
  expect_bf16_close("swiglu dgu bf16 (assign)", dgu16_only.host(), dgu_from_zero, kFp32);
  // Adding needs the fp32 gradient to add to.
  EXPECT_THROW(cl::swiglu_backward(ctx, nullptr, d_dout.get(), d_gu.get(), n, f, cl::GradWrite::Add,
                                   dgu16.get()),
               pion::Error);
}

// The fused RoPE backward over [q | k | v] rows (GQA: 4 query heads, 2 K/V heads, and an MHA
// row) = the CPU's rope_backward of the query and the key heads, values untouched, rounded to
// bf16; the values bit for bit their conversion; dqkv itself is not written.
TEST(CudaLayers, RopeBackwardQkvBf16MatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 batch = 2, seq = 7, head_dim = 8;
  const auto table = hl::make_rope_table<float>(10, head_dim, 10000.0);
  const cl::DeviceRopeTable d_table(table.cos, table.sin, table.seq_len, table.half);
  for (auto [n_head, n_kv] : {std::pair<i64, i64>{4, 2}, std::pair<i64, i64>{3, 3}}) {
    const std::string at = " heads " + std::to_string(n_head) + "/" + std::to_string(n_kv);
    const i64 d = n_head * head_dim, width = d + 2 * n_kv * head_dim, rows = batch * seq;
    const auto g0 = randn(rows * width, 31);
    std::vector<float> g = g0;
    hl::rope_backward(g.data(), table, batch, seq, n_head, head_dim, width);
    hl::rope_backward(g.data() + d, table, batch, seq, n_kv, head_dim, width);
    Dev d_g(g0);
    Dev16 out16(rows * width);
    cl::rope_backward_qkv_bf16(ctx, out16.get(), d_g.get(), d_table, batch, seq, n_head, n_kv,
                               head_dim, width);
    const auto got = out16.host();
    EXPECT_EQ(d_g.host(), g0) << "dqkv was written" << at;
    expect_bf16_close("rope backward qkv bf16" + at, got, g, kFp32);
    const auto conv = converted(ctx, d_g.get(), rows * width);
    for (i64 r = 0; r < rows; ++r)
      for (i64 j = d + n_kv * head_dim; j < width; ++j)
        ASSERT_EQ(got[static_cast<std::size_t>(r * width + j)],
                  conv[static_cast<std::size_t>(r * width + j)])
            << "row " << r << " value column " << j << at;
  }
  Dev d_g(batch * 11 * 32);
  Dev16 out16(batch * 11 * 32);
  // A table too short for seq, and a row narrower than its heads: host-side errors.
  EXPECT_THROW(cl::rope_backward_qkv_bf16(ctx, out16.get(), d_g.get(), d_table, batch, 11, 2, 2,
                                          head_dim, 32),
               pion::Error);
  EXPECT_THROW(cl::rope_backward_qkv_bf16(ctx, out16.get(), d_g.get(), d_table, batch, 7, 3, 2,
                                          head_dim, 32),
               pion::Error);
}

// linear_* given bf16 operands (in_bf16, dout_bf16; the fp32 pointers null) give bit for bit
// what converting the fp32 operands gives: the same bf16 values reach the same GEMMs.
// Operands at other precisions are refused.
TEST(CudaLayers, LinearTakesBf16OperandsBitForBit) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 33, d_in = 70, d_out = 50;
  const auto in = randn(n * d_in, 60);
  const auto w = randn(d_out * d_in, 61, 0.2);
  const auto dout = randn(n * d_out, 62);
  const auto din0 = randn(n * d_in, 63), dw0 = randn(d_out * d_in, 64);
  const auto bf16 = cl::MatmulPrecision::Bf16;
  cl::Bf16Workspace ws(cl::linear_bf16_workspace_elements(n, d_in, d_out));
  Dev d_in_(in), d_w(w), d_dout(dout);
  Dev out1(n * d_out), din1(din0), dw1(dw0);
  cl::linear_forward(ctx, out1.get(), d_in_.get(), d_w.get(), n, d_in, d_out, bf16, &ws);
  cl::linear_backward(ctx, din1.get(), dw1.get(), d_dout.get(), d_in_.get(), d_w.get(), n, d_in,
                      d_out, bf16, &ws);

  Dev16 in16(n * d_in), dout16(n * d_out);
  cl::convert_to_bf16(ctx, in16.get(), d_in_.get(), n * d_in);
  cl::convert_to_bf16(ctx, dout16.get(), d_dout.get(), n * d_out);
  Dev out2(n * d_out), din2(din0), dw2(dw0), din3(din0), dw3(dw0);
  cl::linear_forward(ctx, out2.get(), nullptr, d_w.get(), n, d_in, d_out, bf16, &ws, in16.get());
  cl::linear_backward(ctx, din2.get(), dw2.get(), nullptr, nullptr, d_w.get(), n, d_in, d_out, bf16,
                      &ws, cl::GradWrite::Add, dout16.get(), in16.get());
  // One of the two pre-converted, the other converted by the layer.
  cl::linear_backward(ctx, din3.get(), dw3.get(), d_dout.get(), nullptr, d_w.get(), n, d_in, d_out,
                      bf16, &ws, cl::GradWrite::Add, nullptr, in16.get());
  EXPECT_EQ(out2.host(), out1.host());
  EXPECT_EQ(din2.host(), din1.host());
  EXPECT_EQ(dw2.host(), dw1.host());
  EXPECT_EQ(din3.host(), din1.host());
  EXPECT_EQ(dw3.host(), dw1.host());
  // And they are the bf16 layer: close to the fp32 CPU layer at the bound check_linear uses.
  std::vector<float> out(static_cast<std::size_t>(n * d_out));
  hl::linear_forward(out.data(), in.data(), w.data(), n, d_in, d_out);
  expect_close("linear bf16 out (bf16 operand)", out2.host(), out, 3e-2);

  const auto fp32 = cl::MatmulPrecision::Fp32;
  EXPECT_THROW(cl::linear_forward(ctx, out2.get(), d_in_.get(), d_w.get(), n, d_in, d_out, fp32,
                                  nullptr, in16.get()),
               pion::Error);
  EXPECT_THROW(cl::linear_backward(ctx, din2.get(), dw2.get(), d_dout.get(), d_in_.get(), d_w.get(),
                                   n, d_in, d_out, fp32, nullptr, cl::GradWrite::Add, dout16.get()),
               pion::Error);
  EXPECT_THROW(cl::linear_forward(ctx, out2.get(), nullptr, d_w.get(), n, d_in, d_out, bf16, &ws),
               pion::Error);  // no input at all
}

// A bf16 GEMM writing its output in bf16 (out_bf16): within one bf16 rounding of the same
// GEMM's fp32 output (2^-8 relative, plus 1e-6 of the largest magnitude for a different
// accumulation order in another cuBLAS kernel), and so within the bf16 layer's bound of the
// CPU. Exactly one output; Bf16 precision only.
TEST(CudaLayers, LinearWritesBf16Output) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 33, d_in = 70, d_out = 50;
  const auto in = randn(n * d_in, 65);
  const auto w = randn(d_out * d_in, 66, 0.2);
  const auto bf16 = cl::MatmulPrecision::Bf16;
  cl::Bf16Workspace ws(cl::linear_bf16_workspace_elements(n, d_in, d_out));
  Dev d_in_(in), d_w(w), out32(n * d_out);
  Dev16 out16(n * d_out);
  cl::linear_forward(ctx, out32.get(), d_in_.get(), d_w.get(), n, d_in, d_out, bf16, &ws);
  cl::linear_forward(ctx, nullptr, d_in_.get(), d_w.get(), n, d_in, d_out, bf16, &ws, nullptr,
                     out16.get());
  const auto got = out16.host(), wide = out32.host();
  double max_ref = 0.0, max_moved = 0.0;
  for (float v : wide) max_ref = std::max(max_ref, std::abs(static_cast<double>(v)));
  std::size_t bad = 0;
  for (std::size_t i = 0; i < wide.size(); ++i) {
    const double diff = std::abs(static_cast<double>(got[i]) - wide[i]);
    if (!(diff <= std::ldexp(std::abs(static_cast<double>(wide[i])), -8) + 1e-6 * max_ref)) ++bad;
    max_moved = std::max(max_moved, diff);
  }
  EXPECT_EQ(bad, 0u) << "bf16 output beyond one rounding of the fp32 output";
  EXPECT_GT(max_moved, 1e-6 * max_ref) << "no value shows bf16 rounding";
  std::vector<float> out(static_cast<std::size_t>(n * d_out));
  hl::linear_forward(out.data(), in.data(), w.data(), n, d_in, d_out);
  expect_close("linear bf16 out written in bf16", got, out, 3e-2);

  EXPECT_THROW(cl::linear_forward(ctx, out32.get(), d_in_.get(), d_w.get(), n, d_in, d_out, bf16,
                                  &ws, nullptr, out16.get()),
               pion::Error);  // two outputs
  EXPECT_THROW(cl::linear_forward(ctx, nullptr, d_in_.get(), d_w.get(), n, d_in, d_out, bf16, &ws),
               pion::Error);  // none
  EXPECT_THROW(cl::linear_forward(ctx, nullptr, d_in_.get(), d_w.get(), n, d_in, d_out,
                                  cl::MatmulPrecision::Fp32, nullptr, nullptr, out16.get()),
               pion::Error);
}

// SwiGLU reading gu in bf16 (a bf16 GEMM's output) = the CPU layer on those widened values,
// to the fp32 bound (the arithmetic is the same fp32; only the loads differ), forward and
// backward (add, assign, with the bf16 dgu copy).
TEST(CudaLayers, SwigluReadsBf16Gu) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 19, f = 45;
  const auto gu = randn(n * 2 * f, 70, 2.0);
  const auto dout = randn(n * f, 71);
  const auto dgu0 = randn(n * 2 * f, 72);
  Dev d_gu(gu), d_dout(dout), d_out(n * f), d_dgu(dgu0), d_dgu_a(nans(n * 2 * f));
  Dev16 gu16(n * 2 * f), dgu16(n * 2 * f);
  cl::convert_to_bf16(ctx, gu16.get(), d_gu.get(), n * 2 * f);
  const auto gu_rounded = gu16.host();
  EXPECT_NE(gu_rounded, gu);  // the rounding is visible
  std::vector<float> out(static_cast<std::size_t>(n * f)), dgu = dgu0;
  std::vector<float> dgu_from_zero(dgu0.size(), 0.0f);
  hl::swiglu_forward(out.data(), gu_rounded.data(), n, f);
  hl::swiglu_backward(dgu.data(), dout.data(), gu_rounded.data(), n, f);
  hl::swiglu_backward(dgu_from_zero.data(), dout.data(), gu_rounded.data(), n, f);

  cl::swiglu_forward(ctx, d_out.get(), nullptr, n, f, nullptr, gu16.get());
  cl::swiglu_backward(ctx, d_dgu.get(), d_dout.get(), nullptr, n, f, cl::GradWrite::Add, nullptr,
                      gu16.get());
  cl::swiglu_backward(ctx, d_dgu_a.get(), d_dout.get(), nullptr, n, f, cl::GradWrite::Assign,
                      dgu16.get(), gu16.get());
  expect_close("swiglu out (bf16 gu)", d_out.host(), out, kFp32);
  expect_close("swiglu dgu (bf16 gu)", d_dgu.host(), dgu, kFp32);
  expect_close("swiglu dgu assign (bf16 gu)", d_dgu_a.host(), dgu_from_zero, kFp32);
  EXPECT_EQ(dgu16.host(), converted(ctx, d_dgu_a.get(), n * 2 * f));
  EXPECT_THROW(cl::swiglu_forward(ctx, d_out.get(), d_gu.get(), n, f, nullptr, gu16.get()),
               pion::Error);  // both gu and gu_bf16
  EXPECT_THROW(cl::swiglu_backward(ctx, d_dgu.get(), d_dout.get(), nullptr, n, f), pion::Error);
}

// A bf16 din (din_bf16, Assign): within one bf16 rounding of the fp32 din (2^-8 relative plus
// 1e-6 of the largest magnitude for another accumulation order), the weight gradient the same
// bits as with the fp32 din; and SwiGLU's backward reading a bf16 dout = the CPU layer on the
// widened values, to the fp32 bound.
TEST(CudaLayers, Bf16DinFeedsSwigluBackward) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 19, f = 45, d = 30;  // the down-projection: d_in = f, d_out = d
  const auto act = randn(n * f, 80);
  const auto w = randn(d * f, 81, 0.2);
  const auto dout = randn(n * d, 82);
  const auto gu = randn(n * 2 * f, 83, 2.0);
  const auto dw0 = randn(d * f, 84);
  const auto bf16 = cl::MatmulPrecision::Bf16;
  cl::Bf16Workspace ws(cl::linear_bf16_workspace_elements(n, f, d));
  Dev d_act(act), d_w(w), d_dout(dout), d_gu(gu), din32(nans(n * f)), dw1(dw0), dw2(dw0);
  Dev16 din16(n * f);
  cl::linear_backward(ctx, din32.get(), dw1.get(), d_dout.get(), d_act.get(), d_w.get(), n, f, d,
                      bf16, &ws, cl::GradWrite::Assign);
  cl::linear_backward(ctx, nullptr, dw2.get(), d_dout.get(), d_act.get(), d_w.get(), n, f, d, bf16,
                      &ws, cl::GradWrite::Assign, nullptr, nullptr, din16.get());
  EXPECT_EQ(dw2.host(), dw1.host());
  const auto wide = din32.host(), got = din16.host();
  double max_ref = 0.0, max_moved = 0.0;
  for (float v : wide) max_ref = std::max(max_ref, std::abs(static_cast<double>(v)));
  std::size_t bad = 0;
  for (std::size_t i = 0; i < wide.size(); ++i) {
    const double diff = std::abs(static_cast<double>(got[i]) - wide[i]);
    if (!(diff <= std::ldexp(std::abs(static_cast<double>(wide[i])), -8) + 1e-6 * max_ref)) ++bad;
    max_moved = std::max(max_moved, diff);
  }
  EXPECT_EQ(bad, 0u) << "bf16 din beyond one rounding of the fp32 din";
  EXPECT_GT(max_moved, 1e-6 * max_ref) << "no value shows bf16 rounding";

  std::vector<float> dgu(static_cast<std::size_t>(n * 2 * f), 0.0f);
  hl::swiglu_backward(dgu.data(), got.data(), gu.data(), n, f);
  Dev d_dgu(nans(n * 2 * f));
  cl::swiglu_backward(ctx, d_dgu.get(), nullptr, d_gu.get(), n, f, cl::GradWrite::Assign, nullptr,
                      nullptr, din16.get());
  expect_close("swiglu dgu (bf16 dout)", d_dgu.host(), dgu, kFp32);

  Dev din_x(n * f);
  EXPECT_THROW(
      cl::linear_backward(ctx, din_x.get(), dw2.get(), d_dout.get(), d_act.get(), d_w.get(), n, f,
                          d, bf16, &ws, cl::GradWrite::Assign, nullptr, nullptr, din16.get()),
      pion::Error);  // both dins
  EXPECT_THROW(
      cl::linear_backward(ctx, nullptr, dw2.get(), d_dout.get(), d_act.get(), d_w.get(), n, f, d,
                          bf16, &ws, cl::GradWrite::Add, nullptr, nullptr, din16.get()),
      pion::Error);  // a bf16 din cannot be added to
  EXPECT_THROW(cl::swiglu_backward(ctx, d_dgu.get(), d_dout.get(), d_gu.get(), n, f,
                                   cl::GradWrite::Assign, nullptr, nullptr, din16.get()),
               pion::Error);  // both douts
}

// ---- bf16 GEMM outputs read by the next kernel: RoPE in place, the residual add, RMSNorm's
// backward. Each reads the bf16 values as the fp32 kernel reads their widened copies: the same
// bits (after one rounding where the output is bf16 too).

// A bf16 copy of a device tensor (convert_to_bf16) and its values widened back to fp32.
struct Rounded {
  Dev16 bf16;
  Dev wide;
  Rounded(Context& ctx, Dev& values, i64 count) : bf16(count), wide(count) {
    cl::convert_to_bf16(ctx, bf16.get(), values.get(), count);
    cl::convert_from_bf16(ctx, wide.get(), bf16.get(), count);
  }
};

// rope_forward_bf16 over the query and key heads of bf16 [q | k | v] rows (one head range, as
// CudaLlama calls it) = rope_forward on the widened values, rounded once: bit for bit. The value
// columns keep their bits, and the result is within bf16 rounding of the CPU's RoPE. The same
// for rope_backward_bf16 (applied to the rotated rows) against rope_backward.
TEST(CudaLayers, RopeForwardBf16InPlace) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 batch = 2, seq = 7, head_dim = 8;
  const auto table = hl::make_rope_table<float>(10, head_dim, 10000.0);
  const cl::DeviceRopeTable d_table(table.cos, table.sin, table.seq_len, table.half);
  for (auto [n_head, n_kv] : {std::pair<i64, i64>{4, 2}, std::pair<i64, i64>{3, 3}}) {
    const std::string at = " heads " + std::to_string(n_head) + "/" + std::to_string(n_kv);
    const i64 d = n_head * head_dim, width = d + 2 * n_kv * head_dim, count = batch * seq * width;
    Dev x(randn(count, 40));
    Rounded r(ctx, x, count);
    const auto before = r.bf16.host(), wide = r.wide.host();
    cl::rope_forward(ctx, r.wide.get(), d_table, batch, seq, n_head + n_kv, head_dim, width);
    cl::rope_forward_bf16(ctx, r.bf16.get(), d_table, batch, seq, n_head + n_kv, head_dim, width);
    const auto got = r.bf16.host();
    EXPECT_EQ(got, converted(ctx, r.wide.get(), count)) << at;
    std::vector<float> cpu = wide;
    hl::rope_forward(cpu.data(), table, batch, seq, n_head, head_dim, width);
    hl::rope_forward(cpu.data() + d, table, batch, seq, n_kv, head_dim, width);
    expect_bf16_close("rope forward bf16" + at, got, cpu, kFp32);
    for (i64 row = 0; row < batch * seq; ++row)
      for (i64 j = d + n_kv * head_dim; j < width; ++j)
        ASSERT_EQ(got[static_cast<std::size_t>(row * width + j)],
                  before[static_cast<std::size_t>(row * width + j)])
            << "row " << row << " value column " << j << at;
    // Backward in place on the bf16 result, against rope_backward on its widened values.
    Dev grad(count);
    cl::convert_from_bf16(ctx, grad.get(), r.bf16.get(), count);
    const auto grad_wide = grad.host();
    cl::rope_backward(ctx, grad.get(), d_table, batch, seq, n_head + n_kv, head_dim, width);
    cl::rope_backward_bf16(ctx, r.bf16.get(), d_table, batch, seq, n_head + n_kv, head_dim, width);
    const auto back = r.bf16.host();
    EXPECT_EQ(back, converted(ctx, grad.get(), count)) << "backward" << at;
    std::vector<float> cpu_back = grad_wide;
    hl::rope_backward(cpu_back.data(), table, batch, seq, n_head, head_dim, width);
    hl::rope_backward(cpu_back.data() + d, table, batch, seq, n_kv, head_dim, width);
    expect_bf16_close("rope backward bf16" + at, back, cpu_back, kFp32);
  }
  Dev16 x16(batch * 11 * 32);
  EXPECT_THROW(cl::rope_forward_bf16(ctx, x16.get(), d_table, batch, 11, 2, head_dim, 32),
               pion::Error);  // a table too short for seq
  EXPECT_THROW(cl::rope_forward_bf16(ctx, nullptr, d_table, batch, 7, 2, head_dim, 32),
               pion::Error);
}

// residual_forward with a bf16 delta = the fp32 add of its widened values, bit for bit, also
// in place; exactly one of delta and delta_bf16.
TEST(CudaLayers, ResidualReadsBf16Delta) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 count = 1000;
  const auto x = randn(count, 63);
  Dev d_x(x), d_delta(randn(count, 64)), out(count);
  Rounded delta(ctx, d_delta, count);
  const auto wide = delta.wide.host();
  std::vector<float> sum(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) sum[i] = x[i] + wide[i];
  cl::residual_forward(ctx, out.get(), d_x.get(), nullptr, count, delta.bf16.get());
  EXPECT_EQ(out.host(), sum);
  cl::residual_forward(ctx, d_x.get(), d_x.get(), nullptr, count, delta.bf16.get());
  EXPECT_EQ(d_x.host(), sum);
  EXPECT_NE(wide, d_delta.host()) << "the bf16 delta holds the fp32 values (no rounding)";
  EXPECT_THROW(
      cl::residual_forward(ctx, out.get(), d_x.get(), d_delta.get(), count, delta.bf16.get()),
      pion::Error);
  EXPECT_THROW(cl::residual_forward(ctx, out.get(), d_x.get(), nullptr, count), pion::Error);
}

// rmsnorm_backward reading dout in bf16 (a bf16 GEMM's din) = reading its widened values: dx,
// its bf16 copy and dweight bit for bit, adding and assigning; exactly one of dout and
// dout_bf16.
TEST(CudaLayers, RmsNormBackwardReadsBf16Dout) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 70, c = 96;  // two row chunks of the weight gradient
  const auto x = randn(n * c, 15), w = randn(c, 16, 0.3, 1.0), dx0 = randn(n * c, 17),
             dw0 = randn(c, 18);
  Dev d_x(x), d_w(w), d_rstd(n), d_out(n * c), d_dout(randn(n * c, 19));
  Dev d_scratch(nans(static_cast<i64>(cl::rmsnorm_backward_scratch_elements(n, c))));
  cl::rmsnorm_forward(ctx, d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), n, c, 1e-5);
  Rounded dout(ctx, d_dout, n * c);
  for (const auto write : {cl::GradWrite::Add, cl::GradWrite::Assign}) {
    const bool add = write == cl::GradWrite::Add;
    SCOPED_TRACE(add ? "add" : "assign");
    Dev dx_a(add ? dx0 : nans(n * c)), dx_b(add ? dx0 : nans(n * c)), dw_a(dw0), dw_b(dw0);
    Dev16 dx16_a(n * c), dx16_b(n * c);
    cl::rmsnorm_backward(ctx, dx_a.get(), dw_a.get(), d_scratch.get(), dout.wide.get(), d_x.get(),
                         d_w.get(), d_rstd.get(), n, c, write, dx16_a.get());
    cl::rmsnorm_backward(ctx, dx_b.get(), dw_b.get(), d_scratch.get(), nullptr, d_x.get(),
                         d_w.get(), d_rstd.get(), n, c, write, dx16_b.get(), dout.bf16.get());
    const auto dx = dx_b.host();
    EXPECT_EQ(dx, dx_a.host());
    EXPECT_EQ(dw_b.host(), dw_a.host());
    EXPECT_EQ(dx16_b.host(), dx16_a.host());
    for (float v : dx) ASSERT_TRUE(std::isfinite(v));
    EXPECT_NE(dw_b.host(), dw0);
  }
  Dev dx(n * c), dw(dw0);
  EXPECT_THROW(cl::rmsnorm_backward(ctx, dx.get(), dw.get(), d_scratch.get(), d_dout.get(),
                                    d_x.get(), d_w.get(), d_rstd.get(), n, c, cl::GradWrite::Add,
                                    nullptr, dout.bf16.get()),
               pion::Error);
  EXPECT_THROW(cl::rmsnorm_backward(ctx, dx.get(), dw.get(), d_scratch.get(), nullptr, d_x.get(),
                                    d_w.get(), d_rstd.get(), n, c),
               pion::Error);
}

// linear_backward_bf16 (dout already bf16, the LM head's) writing din in bf16: the same bits as
// linear_backward given that bf16 dout and asked for a bf16 din.
TEST(CudaLayers, LinearBackwardBf16WritesBf16Din) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 21, d_in = 40, d_out = 90;
  const auto bf16 = cl::MatmulPrecision::Bf16;
  cl::Bf16Workspace ws(cl::linear_bf16_workspace_elements(n, d_in, d_out));
  Dev d_in_(randn(n * d_in, 85)), d_w(randn(d_out * d_in, 86, 0.2)), d_dout(randn(n * d_out, 87));
  const auto dw0 = randn(d_out * d_in, 88);
  Dev dw_a(dw0), dw_b(dw0);
  Dev16 dout16(n * d_out), din_a(n * d_in), din_b(n * d_in);
  cl::convert_to_bf16(ctx, dout16.get(), d_dout.get(), n * d_out);
  cl::linear_backward(ctx, nullptr, dw_a.get(), nullptr, d_in_.get(), d_w.get(), n, d_in, d_out,
                      bf16, &ws, cl::GradWrite::Assign, dout16.get(), nullptr, din_a.get());
  cl::linear_backward_bf16(ctx, nullptr, dw_b.get(), dout16.get(), d_in_.get(), d_w.get(), n, d_in,
                           d_out, ws, cl::GradWrite::Assign, nullptr, din_b.get());
  const auto got = din_b.host();
  EXPECT_EQ(got, din_a.host());
  EXPECT_EQ(dw_b.host(), dw_a.host());
  EXPECT_TRUE(std::any_of(got.begin(), got.end(), [](float v) { return v != 0.0f; }));
  EXPECT_THROW(
      cl::linear_backward_bf16(ctx, nullptr, dw_b.get(), dout16.get(), d_in_.get(), d_w.get(), n,
                               d_in, d_out, ws, cl::GradWrite::Add, nullptr, din_b.get()),
      pion::Error);  // a bf16 din cannot be added to
}

TEST(CudaLayers, ResidualAddAndAccumulate) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 count = 1000;
  const auto x = randn(count, 60), delta = randn(count, 61), dst0 = randn(count, 62);
  std::vector<float> sum(x.size()), acc = dst0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sum[i] = x[i] + delta[i];
    acc[i] += delta[i];
  }
  Dev d_x(x), d_delta(delta), d_out(count), d_dst(dst0);
  cl::residual_forward(ctx, d_out.get(), d_x.get(), d_delta.get(), count);
  cl::accumulate(ctx, d_dst.get(), d_delta.get(), count);
  EXPECT_EQ(d_out.host(), sum);
  EXPECT_EQ(d_dst.host(), acc);
  // In place (out aliases x), as the residual stream does.
  cl::residual_forward(ctx, d_x.get(), d_x.get(), d_delta.get(), count);
  EXPECT_EQ(d_x.host(), sum);
}

TEST(CudaLayers, CrossEntropyMatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 29, v = 300;  // v > threads per block
  const double dloss = 1.7;
  const auto logits = randn(n * v, 70, 3.0);
  auto targets = random_ids(n, v, 71);
  for (i64 i = 0; i < n; i += 4) targets[static_cast<std::size_t>(i)] = -1;  // ignored rows
  const auto dlogits0 = randn(n * v, 72, 0.01);

  std::vector<float> lse(static_cast<std::size_t>(n)), dlogits = dlogits0;
  i64 count = 0;
  const double loss =
      hl::cross_entropy_forward(lse.data(), logits.data(), targets.data(), n, v, &count);
  hl::cross_entropy_backward(dlogits.data(), logits.data(), lse.data(), targets.data(), n, v,
                             dloss);

  cl::CrossEntropyResult result(n);
  DevIds d_targets(targets);
  Dev d_logits(logits), d_lse(n), d_dlogits(dlogits0);
  cl::cross_entropy(ctx, result, d_lse.get(), d_dlogits.get(), d_logits.get(), d_targets.get(), n,
                    v, dloss);
  const auto r = result.read(ctx);
  std::printf("  cross-entropy loss gpu %.9f vs cpu %.9f\n", r.loss, loss);
  EXPECT_EQ(r.count, count);
  EXPECT_EQ(r.bad_targets, 0);
  EXPECT_NEAR(r.loss, loss, 2e-6 * std::abs(loss));
  expect_close("cross-entropy lse", d_lse.host(), lse, kFp32);
  expect_close("cross-entropy dlogits", d_dlogits.host(), dlogits, kFp32Chain);

  // Same inputs, same bits (fixed reduction order).
  Dev d_dlogits2(dlogits0);
  cl::cross_entropy(ctx, result, nullptr, d_dlogits2.get(), d_logits.get(), d_targets.get(), n, v,
                    dloss);
  EXPECT_EQ(result.read(ctx).loss, r.loss);
  EXPECT_EQ(d_dlogits2.host(), d_dlogits.host());
}

TEST(CudaLayers, CrossEntropyIgnoredAndBadTargets) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const i64 n = 6, v = 40;
  const auto logits = randn(n * v, 80);
  const auto dlogits0 = randn(n * v, 81);
  cl::CrossEntropyResult result(n);
  Dev d_logits(logits);

  // No counted row: loss 0 and the gradient untouched (the CPU's convention, not NaN).
  {
    DevIds d_targets(std::vector<std::int32_t>(static_cast<std::size_t>(n), -1));
    Dev d_dlogits(dlogits0);
    cl::cross_entropy(ctx, result, nullptr, d_dlogits.get(), d_logits.get(), d_targets.get(), n, v,
                      1.0);
    const auto r = result.read(ctx);
    EXPECT_EQ(r.count, 0);
    EXPECT_EQ(r.loss, 0.0);
    EXPECT_EQ(d_dlogits.host(), dlogits0);
  }
  // A target >= v: counted in bad_targets and otherwise ignored, i.e. the CPU result with that
  // row's target set to -1 (the CPU itself throws for it).
  {
    auto targets = random_ids(n, v, 82);
    targets[2] = static_cast<std::int32_t>(v);
    auto cpu_targets = targets;
    cpu_targets[2] = -1;
    std::vector<float> lse(static_cast<std::size_t>(n)), dlogits = dlogits0;
    const double loss =
        hl::cross_entropy_forward(lse.data(), logits.data(), cpu_targets.data(), n, v);
    hl::cross_entropy_backward(dlogits.data(), logits.data(), lse.data(), cpu_targets.data(), n, v,
                               1.0);
    EXPECT_THROW(hl::cross_entropy_forward(lse.data(), logits.data(), targets.data(), n, v),
                 pion::Error);
    DevIds d_targets(targets);
    Dev d_dlogits(dlogits0);
    cl::cross_entropy(ctx, result, nullptr, d_dlogits.get(), d_logits.get(), d_targets.get(), n, v,
                      1.0);
    const auto r = result.read(ctx);
    EXPECT_EQ(r.bad_targets, 1);
    EXPECT_EQ(r.count, n - 1);
    EXPECT_NEAR(r.loss, loss, 2e-6 * std::abs(loss));
    expect_close("cross-entropy dlogits (bad row)", d_dlogits.host(), dlogits, kFp32Chain);
  }
}

// bf16 device memory read back as floats (the widening is exact).
std::vector<float> bf16_host(Context& ctx, const void* bf16, i64 count) {
  Dev out(count);
  cl::convert_from_bf16(ctx, out.get(), bf16, count);
  return out.host();
}

// Inputs shared by the assigning cross-entropy tests: some ignored rows.
struct CeCase {
  i64 n = 29, v = 300;  // v > threads per block
  double dloss = 1.7;
  std::vector<float> logits = randn(n * v, 90, 3.0);
  std::vector<std::int32_t> targets = [this] {
    auto t = random_ids(n, v, 91);
    for (i64 i = 1; i < n; i += 5) t[static_cast<std::size_t>(i)] = -1;
    return t;
  }();
};

// GradWrite::Assign: dlogits are written, never read, so a NaN-poisoned buffer ends up with
// the bits of the add into a zeroed buffer (ignored rows included: zeros), and loss and lse
// are those of the add.
TEST(CudaLayers, CrossEntropyAssignsDlogits) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const CeCase c;
  cl::CrossEntropyResult result(c.n);
  DevIds d_targets(c.targets);
  Dev d_logits(c.logits), lse_add(c.n), add(std::vector<float>(c.logits.size(), 0.0f));
  cl::cross_entropy(ctx, result, lse_add.get(), add.get(), d_logits.get(), d_targets.get(), c.n,
                    c.v, c.dloss);
  const auto r_add = result.read(ctx);
  Dev lse_assign(c.n), assign(nans(c.n * c.v));
  cl::cross_entropy(ctx, result, lse_assign.get(), assign.get(), d_logits.get(), d_targets.get(),
                    c.n, c.v, c.dloss, cl::GradWrite::Assign);
  const auto r_assign = result.read(ctx);
  EXPECT_EQ(r_assign.loss, r_add.loss);
  EXPECT_EQ(r_assign.count, r_add.count);
  EXPECT_EQ(lse_assign.host(), lse_add.host());
  const auto got = assign.host();
  EXPECT_EQ(got, add.host());
  for (i64 j = 0; j < c.v; ++j)  // row 1 is ignored
    ASSERT_EQ(got[static_cast<std::size_t>(c.v + j)], 0.0f) << "ignored row, column " << j;

  // The CPU's gradient from zero.
  std::vector<float> lse(static_cast<std::size_t>(c.n));
  std::vector<float> dlogits(c.logits.size(), 0.0f);
  hl::cross_entropy_forward(lse.data(), c.logits.data(), c.targets.data(), c.n, c.v);
  hl::cross_entropy_backward(dlogits.data(), c.logits.data(), lse.data(), c.targets.data(), c.n,
                             c.v, c.dloss);
  expect_close("cross-entropy dlogits assigned", got, dlogits, kFp32Chain);

  // No counted row: every element assigned 0 (the CPU's gradient), not left as it was.
  DevIds none(std::vector<std::int32_t>(static_cast<std::size_t>(c.n), -1));
  Dev poisoned(nans(c.n * c.v));
  cl::cross_entropy(ctx, result, nullptr, poisoned.get(), d_logits.get(), none.get(), c.n, c.v, 1.0,
                    cl::GradWrite::Assign);
  EXPECT_EQ(result.read(ctx).count, 0);
  EXPECT_EQ(poisoned.host(), std::vector<float>(c.logits.size(), 0.0f));
}

// cross_entropy_bf16: dlogits assigned in bf16 into a NaN-poisoned buffer. Each value is the
// fp32 assigned gradient rounded to nearest even (bit for bit what convert_to_bf16 gives of
// it), and against the fp32 CPU gradient g each value b obeys
//   |b - g| <= 2^-8 |g| + 2 kFp32Chain max|g|.
// Derivation: bf16 keeps 8 significant bits, so a value in [2^e, 2^(e+1)) has a unit in the
// last place of 2^(e-7) and rounding to nearest moves it by at most half of that, 2^(e-8),
// i.e. at most 2^-8 of its magnitude (the unit roundoff; normal values: the gradients here are
// far above bf16's smallest normal, 1e-38, except exact zeros). The fp32 value rounded is
// itself within kFp32Chain max|g| of g (the fp32 bound above), and its rounding adds at most
// 2^-8 of that difference, below another kFp32Chain max|g|.
TEST(CudaLayers, CrossEntropyBf16DlogitsMatchCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const CeCase c;
  const i64 count = c.n * c.v;
  cl::CrossEntropyResult result(c.n);
  DevIds d_targets(c.targets);
  Dev d_logits(c.logits), lse32(c.n), d32(nans(count));
  cl::cross_entropy(ctx, result, lse32.get(), d32.get(), d_logits.get(), d_targets.get(), c.n, c.v,
                    c.dloss, cl::GradWrite::Assign);
  const auto r32 = result.read(ctx);
  cl::Bf16Workspace rounded(static_cast<std::size_t>(count));
  cl::convert_to_bf16(ctx, rounded.data(), d32.get(), count);

  cl::Bf16Workspace d16(static_cast<std::size_t>(count));
  Dev nan_src(nans(count)), lse16(c.n);
  cl::convert_to_bf16(ctx, d16.data(), nan_src.get(), count);  // poison
  cl::cross_entropy_bf16(ctx, result, lse16.get(), d16.data(), d_logits.get(), d_targets.get(), c.n,
                         c.v, c.dloss);
  const auto r16 = result.read(ctx);
  EXPECT_EQ(r16.loss, r32.loss);
  EXPECT_EQ(r16.count, r32.count);
  EXPECT_EQ(lse16.host(), lse32.host());
  const auto got = bf16_host(ctx, d16.data(), count);
  EXPECT_EQ(got, bf16_host(ctx, rounded.data(), count));

  std::vector<float> lse(static_cast<std::size_t>(c.n));
  std::vector<float> ref(static_cast<std::size_t>(count), 0.0f);
  hl::cross_entropy_forward(lse.data(), c.logits.data(), c.targets.data(), c.n, c.v);
  hl::cross_entropy_backward(ref.data(), c.logits.data(), lse.data(), c.targets.data(), c.n, c.v,
                             c.dloss);
  double max_ref = 0.0;
  for (float g : ref) max_ref = std::max(max_ref, std::abs(static_cast<double>(g)));
  ASSERT_GT(max_ref, 0.0);
  double worst = 0.0;    // the largest error as a fraction of its bound
  i64 rounded_away = 0;  // values bf16 could not hold exactly: the test is not vacuous
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double g = ref[i], b = got[i];
    const double bound = std::ldexp(std::abs(g), -8) + 2 * kFp32Chain * max_ref;
    ASSERT_TRUE(std::isfinite(b)) << "element " << i;
    ASSERT_LE(std::abs(b - g), bound) << "element " << i << ": bf16 " << b << ", cpu " << g;
    worst = std::max(worst, std::abs(b - g) / bound);
    rounded_away += b != g ? 1 : 0;
  }
  std::printf(
      "  cross-entropy bf16 dlogits vs cpu: worst error %.2f of its bound, %lld of %lld "
      "values rounded\n",
      worst, static_cast<long long>(rounded_away), static_cast<long long>(count));
  EXPECT_GT(rounded_away, count / 2);

  // No counted row: zeros over the poison.
  DevIds none(std::vector<std::int32_t>(static_cast<std::size_t>(c.n), -1));
  cl::convert_to_bf16(ctx, d16.data(), nan_src.get(), count);
  cl::cross_entropy_bf16(ctx, result, nullptr, d16.data(), d_logits.get(), none.get(), c.n, c.v,
                         1.0);
  EXPECT_EQ(bf16_host(ctx, d16.data(), count), std::vector<float>(ref.size(), 0.0f));
  EXPECT_THROW(cl::cross_entropy_bf16(ctx, result, nullptr, nullptr, d_logits.get(),
                                      d_targets.get(), c.n, c.v, 1.0),
               pion::Error);
}

// RL's weighted cross-entropy gradient (CudaLlama::weighted_backward) assigns too: over NaN
// poison, fp32 dlogits within the fp32 bound of the CPU's add into zeros, exact zeros on rows
// that are ignored or have scale 0; the bf16 variant is that fp32 result rounded, bit for bit.
TEST(CudaLayers, WeightedCrossEntropyBackwardAssignsFp32AndBf16) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const CeCase c;
  const i64 count = c.n * c.v;
  const double dloss = 0.37;
  std::vector<double> weights(static_cast<std::size_t>(c.n));
  std::vector<float> row_scale(weights.size());
  pion::Rng rng(92);
  for (std::size_t i = 0; i < weights.size(); ++i) {
    weights[i] = i % 7 == 3 ? 0.0 : 2.0 * rng.uniform() - 1.0;  // some rows have weight 0
    row_scale[i] = static_cast<float>(dloss * weights[i]);      // the host's rounding
  }
  std::vector<float> lse(static_cast<std::size_t>(c.n));
  hl::cross_entropy_forward(lse.data(), c.logits.data(), c.targets.data(), c.n, c.v);
  std::vector<float> ref(static_cast<std::size_t>(count), 0.0f);
  hl::weighted_cross_entropy_backward(ref.data(), c.logits.data(), lse.data(), c.targets.data(),
                                      weights.data(), c.n, c.v, dloss);
  DevIds d_targets(c.targets);
  Dev d_logits(c.logits), d_lse(lse), d_scale(row_scale), d32(nans(count));
  cl::weighted_cross_entropy_backward(ctx, d32.get(), d_logits.get(), d_lse.get(), d_targets.get(),
                                      d_scale.get(), c.n, c.v);
  const auto got = d32.host();
  expect_close("weighted cross-entropy dlogits assigned", got, ref, kFp32Chain);
  for (i64 r = 0; r < c.n; ++r) {
    const auto i = static_cast<std::size_t>(r);
    if (c.targets[i] >= 0 && weights[i] != 0.0) continue;
    for (i64 j = 0; j < c.v; ++j)
      ASSERT_EQ(got[static_cast<std::size_t>(r * c.v + j)], 0.0f) << "row " << r << " col " << j;
  }

  cl::Bf16Workspace rounded(static_cast<std::size_t>(count)), d16(static_cast<std::size_t>(count));
  cl::convert_to_bf16(ctx, rounded.data(), d32.get(), count);
  Dev nan_src(nans(count));
  cl::convert_to_bf16(ctx, d16.data(), nan_src.get(), count);  // poison
  cl::weighted_cross_entropy_backward_bf16(ctx, d16.data(), d_logits.get(), d_lse.get(),
                                           d_targets.get(), d_scale.get(), c.n, c.v);
  EXPECT_EQ(bf16_host(ctx, d16.data(), count), bf16_host(ctx, rounded.data(), count));
  EXPECT_THROW(cl::weighted_cross_entropy_backward_bf16(ctx, nullptr, d_logits.get(), d_lse.get(),
                                                        d_targets.get(), d_scale.get(), c.n, c.v),
               pion::Error);
}

// The LM head's backward as CudaLlama runs it at Bf16: cross_entropy_bf16 writes the dlogits
// into the workspace's dout slice and linear_backward_bf16 reads them there; din and dweight
// against the CPU's cross_entropy_backward + linear_backward from fp32 dlogits, at the bf16
// linear bound (3e-2, as LinearTf32AndBf16CloseToCpu: bf16 operands, fp32 accumulation).
TEST(CudaLayers, LmHeadBackwardFromBf16DlogitsMatchesCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  Context ctx;
  const CeCase c;
  const i64 d = 40;
  const auto h = randn(c.n * d, 92);
  const auto w = randn(c.v * d, 93, 0.2);
  const auto dw0 = randn(c.v * d, 94, 0.01);
  std::vector<float> lse(static_cast<std::size_t>(c.n));
  std::vector<float> dlogits(c.logits.size(), 0.0f);
  std::vector<float> dh(static_cast<std::size_t>(c.n * d), 0.0f), dw = dw0;
  hl::cross_entropy_forward(lse.data(), c.logits.data(), c.targets.data(), c.n, c.v);
  hl::cross_entropy_backward(dlogits.data(), c.logits.data(), lse.data(), c.targets.data(), c.n,
                             c.v, c.dloss);
  hl::linear_backward(dh.data(), dw.data(), dlogits.data(), h.data(), w.data(), c.n, d, c.v);

  cl::Bf16Workspace ws(cl::linear_bf16_workspace_elements(c.n, d, c.v));
  Dev poison(nans(static_cast<i64>(ws.size())));
  cl::convert_to_bf16(ctx, ws.data(), poison.get(), static_cast<i64>(ws.size()));
  cl::CrossEntropyResult result(c.n);
  DevIds d_targets(c.targets);
  Dev d_logits(c.logits), d_h(h), d_w(w), d_dh(nans(c.n * d)), d_dw(dw0);
  cl::cross_entropy_bf16(ctx, result, nullptr, ws.data(), d_logits.get(), d_targets.get(), c.n, c.v,
                         c.dloss);
  cl::linear_backward_bf16(ctx, d_dh.get(), d_dw.get(), ws.data(), d_h.get(), d_w.get(), c.n, d,
                           c.v, ws, cl::GradWrite::Assign);
  expect_close("lm head dh from bf16 dlogits", d_dh.host(), dh, 3e-2);
  expect_close("lm head dweight from bf16 dlogits", d_dw.host(), dw, 3e-2);
}

}  // namespace

#endif  // PION_HAVE_CUDA
