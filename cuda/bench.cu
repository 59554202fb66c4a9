// Benchmark timing on the GPU (include/pion/cuda/bench.h): CUDA-event timers, timed graph
// replays, and cuBLAS GEMM rates measured through the same row-major GEMM the optimizers
// call (cuda/gemm.cuh), so a roofline compares like with like.
#include <cuda_bf16.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bf16.cuh"
#include "context.cuh"
#include "optim/batched.cuh"
#include "pion/cuda/bench.h"

namespace pion::cuda {

struct EventTimer::Impl {
  cudaStream_t stream = nullptr;
  std::vector<cudaEvent_t> starts, stops;
  std::size_t next = 0;  // intervals recorded
  bool open = false;     // start() called, stop() not yet
};

EventTimer::EventTimer(Context& ctx, std::size_t capacity) : impl_(std::make_unique<Impl>()) {
  check(capacity > 0, "cuda: EventTimer needs a capacity of at least one interval");
  Impl& t = *impl_;
  t.stream = ctx.impl().stream;
  t.starts.reserve(capacity);
  t.stops.reserve(capacity);
  for (std::size_t i = 0; i < capacity; ++i) {
    cudaEvent_t a = nullptr, b = nullptr;
    PION_CUDA_CHECK(cudaEventCreate(&a));
    t.starts.push_back(a);
    PION_CUDA_CHECK(cudaEventCreate(&b));
    t.stops.push_back(b);
  }
}

EventTimer::~EventTimer() {
  for (cudaEvent_t e : impl_->starts) cudaEventDestroy(e);  // no throw from a destructor
  for (cudaEvent_t e : impl_->stops) cudaEventDestroy(e);
}

void EventTimer::start() {
  Impl& t = *impl_;
  check(!t.open, "cuda: EventTimer::start twice without stop");
  check(t.next < t.starts.size(), "cuda: EventTimer holds " + std::to_string(t.starts.size()) +
                                      " intervals; read them with elapsed_ms() first");
  PION_CUDA_CHECK(cudaEventRecord(t.starts[t.next], t.stream));
  t.open = true;
}

void EventTimer::stop() {
  Impl& t = *impl_;
  check(t.open, "cuda: EventTimer::stop without start");
  PION_CUDA_CHECK(cudaEventRecord(t.stops[t.next], t.stream));
  ++t.next;
  t.open = false;
}

std::vector<double> EventTimer::elapsed_ms() {
  Impl& t = *impl_;
  check(!t.open, "cuda: EventTimer::elapsed_ms inside an interval (call stop first)");
  std::vector<double> out;
  if (t.next == 0) return out;
  PION_CUDA_CHECK(cudaEventSynchronize(t.stops[t.next - 1]));
  out.reserve(t.next);
  for (std::size_t i = 0; i < t.next; ++i) {
    float ms = 0.0f;
    PION_CUDA_CHECK(cudaEventElapsedTime(&ms, t.starts[i], t.stops[i]));
    out.push_back(static_cast<double>(ms));
  }
  t.next = 0;
  return out;
}

void discard_capture(Context& ctx) noexcept {
  cudaStream_t stream = ctx.impl().stream;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
      status != cudaStreamCaptureStatusNone) {
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream, &graph);  // an invalidated capture returns an error, no graph
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
  cudaGetLastError();  // clear what the failed capture left, so later checks start clean
}

std::vector<double> time_graph_replays(Context& ctx, int warmup, int reps) {
  check(warmup >= 0 && reps >= 1, "cuda: time_graph_replays needs warmup >= 0 and reps >= 1");
  for (int i = 0; i < warmup; ++i) ctx.launch_graph();
  EventTimer timer(ctx, static_cast<std::size_t>(reps));
  for (int i = 0; i < reps; ++i) {
    timer.start();
    ctx.launch_graph();
    timer.stop();
  }
  std::vector<double> out = timer.elapsed_ms();
  ctx.synchronize();  // reports an asynchronous error of the replays, if any
  return out;
}

namespace {

using detail::DeviceArray;
using detail::DevicePointers;

constexpr int kFillThreads = 256;

// x[i] = uniform in [-1, 1) from a hash of (seed, i): reproducible, never all zeros.
__device__ inline float hashed_uniform(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + i + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) * (2.0 / 16777216.0) - 1.0);
}

template <class T>
__global__ void fill_uniform_kernel(T* x, std::size_t count, std::uint64_t seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    x[i] = from_float<T>(hashed_uniform(seed, i));
}

template <class T>
void fill_uniform(cudaStream_t stream, DeviceArray<T>& x, std::uint64_t seed) {
  if (x.size() == 0) return;
  const auto blocks = static_cast<unsigned>(
      std::min<std::size_t>((x.size() + kFillThreads - 1) / kFillThreads, 4096));
  fill_uniform_kernel<T><<<blocks, kFillThreads, 0, stream>>>(x.data(), x.size(), seed);
  PION_CUDA_CHECK_LAUNCH("bench fill_uniform");
}

MatmulPrecision parse_gemm_precision(const std::string& precision) {
  if (precision == "fp32") return MatmulPrecision::Fp32;
  if (precision == "tf32") return MatmulPrecision::Tf32;
  if (precision == "bf16") return MatmulPrecision::Bf16;
  throw Error("cuda: unknown GEMM precision '" + precision + "' (choose fp32, tf32 or bf16)");
}

// One operand set of a timed GEMM: batch slices of A, B and C in one buffer each.
template <class T>
std::vector<double> time_gemm_typed(Context& ctx, const GemmShape& s, MatmulPrecision precision,
                                    int warmup, int reps) {
  cudaStream_t stream = ctx.impl().stream;
  cublasHandle_t blas = ctx.impl().blas;
  const auto batch = static_cast<std::size_t>(s.batch);
  const std::size_t a_stride = detail::padded(static_cast<std::size_t>(s.m * s.k));
  const std::size_t b_stride = detail::padded(static_cast<std::size_t>(s.k * s.n));
  const std::size_t c_stride = detail::padded(static_cast<std::size_t>(s.m * s.n));
  DeviceArray<T> a(batch * a_stride), b(batch * b_stride), c(batch * c_stride);
  fill_uniform(stream, a, 1);
  fill_uniform(stream, b, 2);
  fill_uniform(stream, c, 3);
  const DevicePointers pa = detail::slice_pointers(a.data(), batch, a_stride);
  const DevicePointers pb = detail::slice_pointers(b.data(), batch, b_stride);
  const DevicePointers pc = detail::slice_pointers(c.data(), batch, c_stride);
  // Row strides of the operands as stored: op(A) is m x k, op(B) is k x n.
  const std::int64_t lda = s.trans_a ? s.m : s.k;
  const std::int64_t ldb = s.trans_b ? s.k : s.n;
  // bf16: C is bf16 too, as in Muon's bf16 Newton-Schulz.
  const GemmTypes types = gemm_types(precision, true);
  const auto call = [&] {
    if (batch == 1)
      gemm_rm(blas, types, s.trans_a, s.trans_b, s.m, s.n, s.k, 1.0f, a.data(), lda, b.data(), ldb,
              0.0f, c.data(), s.n);
    else
      detail::gemm_group(blas, types, s.trans_a, s.trans_b, s.m, s.n, s.k, 1.0f, pa, lda, pb, ldb,
                         0.0f, pc, s.n, batch);
  };
  for (int i = 0; i < warmup; ++i) call();
  EventTimer timer(ctx, static_cast<std::size_t>(reps));
  for (int i = 0; i < reps; ++i) {
    timer.start();
    call();
    timer.stop();
  }
  std::vector<double> out = timer.elapsed_ms();
  ctx.synchronize();
  return out;
}

}  // namespace

std::vector<double> time_gemm(Context& ctx, const GemmShape& shape, const std::string& precision,
                              int warmup, int reps) {
  const MatmulPrecision p = parse_gemm_precision(precision);
  constexpr std::int64_t kMaxDim = 1 << 30;
  check(shape.m > 0 && shape.n > 0 && shape.k > 0 && shape.batch > 0 && shape.m <= kMaxDim &&
            shape.n <= kMaxDim && shape.k <= kMaxDim && shape.batch <= 65535,
        "cuda: time_gemm needs 0 < m, n, k < 2^30 and 0 < batch <= 65535");
  check(warmup >= 0 && reps >= 1, "cuda: time_gemm needs warmup >= 0 and reps >= 1");
  if (p == MatmulPrecision::Bf16)
    return time_gemm_typed<__nv_bfloat16>(ctx, shape, p, warmup, reps);
  return time_gemm_typed<float>(ctx, shape, p, warmup, reps);
}

}  // namespace pion::cuda
