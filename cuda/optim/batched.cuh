#pragma once
// Building blocks shared by the GPU optimizers: RAII device arrays, device arrays of matrix
// pointers (one per matrix of a shape group), row-major batched GEMMs (cuda/gemm.cuh), the
// device-side step scalars (learning rate, counters, the non-finite-gradient flag) and a
// deterministic per-matrix sum of squares. Batched kernels take the matrix index from
// blockIdx.y and walk their matrix with a grid-stride loop over blockIdx.x.
//
// The kernels used by more than one optimizer live in batched.cu behind the queue_*
// functions below (a __global__ defined in a header would give every .cu its own host stub
// with the same external name).
#include <cstdint>
#include <utility>
#include <vector>

#include "../check.cuh"
#include "../gemm.cuh"

namespace pion::cuda::detail {

constexpr int kThreads = 256;
// Blocks per matrix for elementwise passes and for the partial sums of a reduction. A fixed
// partition (not one derived from the device) keeps reductions bit-reproducible anywhere.
constexpr int kBlocksPerMatrix = 64;

// Matrices of a batch sit in one buffer at this stride (in elements): 128-byte aligned
// slices for fp32 and 64-byte for bf16, which tensor-core GEMM kernels want.
inline std::size_t padded(std::size_t count) {
  return (count + 31) / 32 * 32;
}

inline dim3 batch_grid(std::size_t batch) {
  return dim3(kBlocksPerMatrix, static_cast<unsigned>(batch));
}

// Grid of an elementwise pass (no reduction, so its partition does not affect any result):
// blocks per matrix from the element count, kVecWidth elements per thread (one float4), at
// most kMaxElementwiseBlocks (a grid-stride loop covers the rest), so a 38M-element
// embedding gets enough threads to fill a GPU and a 768-element norm weight one block.
constexpr int kVecWidth = 4;
constexpr std::int64_t kMaxElementwiseBlocks = 8192;
// Blocks per matrix of elementwise_grid (0 for count 0: a pass over two arrays of a matrix,
// one of which may be empty, adds the two).
inline unsigned elementwise_blocks(std::int64_t count) {
  constexpr std::int64_t per_block = static_cast<std::int64_t>(kThreads) * kVecWidth;
  const std::int64_t blocks = (count + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks > kMaxElementwiseBlocks ? kMaxElementwiseBlocks : blocks);
}
inline dim3 elementwise_grid(std::int64_t count, std::size_t batch) {
  const unsigned blocks = elementwise_blocks(count);
  return dim3(blocks < 1 ? 1 : blocks, static_cast<unsigned>(batch));
}

// Whether every pointer is 16-byte aligned: float4 loads and stores are allowed on all.
template <class... P>
__device__ inline bool aligned16(const P*... p) {
  return ((reinterpret_cast<std::uintptr_t>(p) % 16 == 0) && ...);
}

// W consecutive values of T, aligned so that one load or store moves them all (a float4 for
// W = 4 floats, 8 bytes for 4 bf16s), the way PyTorch's aligned_vector does it.
template <class T, int W>
struct alignas(sizeof(T) * W) Lanes {
  T v[W];
};
template <int W, class T>
__device__ inline Lanes<T, W> load_lanes(const T* p, std::int64_t i) {
  return *reinterpret_cast<const Lanes<T, W>*>(p + i);
}
template <int W, class T>
__device__ inline void store_lanes(T* p, std::int64_t i, const Lanes<T, W>& x) {
  *reinterpret_cast<Lanes<T, W>*>(p + i) = x;
}

// The lane count of one call of an elementwise body (a type, so the body can size arrays
// and unroll by it).
template <int W>
struct Width {
  static constexpr int value = W;
};

// The loop of an elementwise pass over count values, shared by the optimizers' kernels so
// the vector and scalar paths cannot drift apart: body(Width<kVecWidth>{}, i) for every
// i = 4 q when `vectorised` (the caller checked aligned16 on every array the body touches),
// then body(Width<1>{}, i) for the count % 4 tail (every i when not vectorised). This thread
// is thread `block * blockDim.x + threadIdx.x` of `blocks * blockDim.x` (by default the x
// grid). Which thread takes which value changes nothing for a body that reads and writes
// only index i..i+W-1 with per-element arithmetic: same bits whatever the grid or path.
template <class Body>
__device__ inline void for_each_lanes(std::int64_t count, bool vectorised, std::int64_t block,
                                      std::int64_t blocks, Body&& body) {
  const std::int64_t first = block * blockDim.x + threadIdx.x;
  const std::int64_t stride = blocks * blockDim.x;
  const std::int64_t vectors = vectorised ? count / kVecWidth : 0;
  for (std::int64_t q = first; q < vectors; q += stride) body(Width<kVecWidth>{}, kVecWidth * q);
  for (std::int64_t i = kVecWidth * vectors + first; i < count; i += stride) body(Width<1>{}, i);
}
template <class Body>
__device__ inline void for_each_lanes(std::int64_t count, bool vectorised, Body&& body) {
  for_each_lanes(count, vectorised, blockIdx.x, gridDim.x, static_cast<Body&&>(body));
}

// Owns count values of T in device memory (uninitialised). Movable, not copyable.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(std::size_t count) : count_(count) {
    if (count == 0) return;
    void* p = nullptr;
    PION_CUDA_CHECK(cudaMalloc(&p, count * sizeof(T)));
    ptr_ = static_cast<T*>(p);
  }
  // A device copy of host values (synchronous; set-up only).
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    if (!host.empty())
      PION_CUDA_CHECK(
          cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFree(ptr_);  // no throw from a destructor
  }
  DeviceArray(DeviceArray&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      if (ptr_ != nullptr) cudaFree(ptr_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, 0);
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* data() const { return ptr_; }
  std::size_t size() const { return count_; }

 private:
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

// A device array of matrix pointers: what cuBLAS batched calls and our kernels read.
// Stored untyped (cuBLAS wants void* arrays); kernels view it typed through as<T>(). When the
// matrices sit evenly spaced (each one a fixed number of bytes after the one before: the
// slices of one buffer, or a shape group of a model laid out by shape), it also keeps the
// first pointer and that spacing, so a GEMM over the batch can be strided-batched.
class DevicePointers {
 public:
  DevicePointers() = default;
  template <class T>
  explicit DevicePointers(const std::vector<T*>& host) {
    std::vector<void*> raw(host.begin(), host.end());
    array_ = DeviceArray<void*>(raw);
    if (raw.empty()) return;
    first_ = raw[0];
    const auto at = [&](std::size_t i) { return reinterpret_cast<std::uintptr_t>(raw[i]); };
    const long long step =
        raw.size() > 1 ? static_cast<long long>(at(1)) - static_cast<long long>(at(0)) : 0;
    even_ = raw.size() == 1 || step > 0;
    for (std::size_t i = 1; even_ && i < raw.size(); ++i)
      even_ = static_cast<long long>(at(i)) - static_cast<long long>(at(i - 1)) == step;
    byte_stride_ = step;
  }
  void* const* get() const { return array_.data(); }
  template <class T>
  T* const* as() const {
    return reinterpret_cast<T* const*>(array_.data());
  }
  std::size_t size() const { return array_.size(); }
  // Evenly spaced (one matrix counts as evenly spaced, at stride 0).
  bool even() const { return even_; }
  void* first() const { return first_; }
  long long byte_stride() const { return byte_stride_; }

 private:
  DeviceArray<void*> array_;
  void* first_ = nullptr;
  bool even_ = false;
  long long byte_stride_ = 0;
};

// Pointers to batch consecutive slices of a buffer, stride elements apart.
template <class T>
DevicePointers slice_pointers(T* base, std::size_t batch, std::size_t stride) {
  std::vector<T*> out(batch);
  for (std::size_t b = 0; b < batch; ++b) out[b] = base + b * stride;
  return DevicePointers(out);
}

// Row-major C = alpha op(A) op(B) + beta C for each of the `batch` matrices of a shape group.
// When A, B and C are each evenly spaced (DevicePointers::even) at a whole number of elements,
// one gemm_rm_strided (cublasGemmStridedBatchedEx: cuBLAS reads no pointer array and picks
// its kernel knowing the layout); otherwise, or when strided is false, gemm_rm_batched over
// the pointer arrays. Each product's arithmetic is the same either way.
inline void gemm_group(cublasHandle_t h, const GemmTypes& types, bool trans_a, bool trans_b,
                       std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                       const DevicePointers& a, std::int64_t lda, const DevicePointers& b,
                       std::int64_t ldb, float beta, const DevicePointers& c, std::int64_t ldc,
                       std::size_t batch, bool strided = true) {
  const auto ab = static_cast<long long>(bytes_per_element(types.ab));
  const auto cb = static_cast<long long>(bytes_per_element(types.c));
  if (strided && a.even() && b.even() && c.even() && a.byte_stride() % ab == 0 &&
      b.byte_stride() % ab == 0 && c.byte_stride() % cb == 0) {
    gemm_rm_strided(h, types, trans_a, trans_b, m, n, k, alpha, a.first(), lda,
                    a.byte_stride() / ab, b.first(), ldb, b.byte_stride() / ab, beta, c.first(),
                    ldc, c.byte_stride() / cb, static_cast<std::int64_t>(batch));
    return;
  }
  gemm_rm_batched(h, types, trans_a, trans_b, m, n, k, alpha, a.get(), lda, b.get(), ldb, beta,
                  c.get(), ldc, static_cast<std::int64_t>(batch));
}

// What a step reads and writes on the device besides the matrices.
struct StepScalars {
  double lr;          // set by set_lr (a kernel argument), read by the step
  long long steps;    // applied steps (AdamW's bias corrections read it)
  long long skipped;  // steps skipped for non-finite gradients
  int bad_grad;       // this step's gradients hold a NaN or Inf
  float grad_scale;   // set by set_grad_scale; the step reads every gradient times it
};

void queue_set_lr(cudaStream_t stream, StepScalars* scalars, double lr);
void queue_set_grad_scale(cudaStream_t stream, StepScalars* scalars, float scale);
// g <- g * grad_scale in place over count values of each matrix of the batch, for an
// optimizer whose GEMMs read the gradients (so the scale cannot be folded into an
// elementwise pass). Reads no gradient when the scale is 1, the usual unclipped step.
void queue_scale_gradients(cudaStream_t stream, const DevicePointers& g, std::int64_t count,
                           std::size_t batch, const StepScalars* scalars);
// bad_grad <- 0: the start of every step.
void queue_begin_step(cudaStream_t stream, StepScalars* scalars);
// bad_grad <- 1 when any of count values of any matrix of the batch is NaN or Inf.
void queue_flag_non_finite(cudaStream_t stream, const DevicePointers& x, std::int64_t count,
                           std::size_t batch, StepScalars* scalars);
// steps += 1, or skipped += 1 when bad_grad: after every flag_non_finite of a step, before
// anything that reads steps.
void queue_count_step(cudaStream_t stream, StepScalars* scalars);

// partial[b * kBlocksPerMatrix + i] = block i's share of sum over matrix b of (x + y)^2 in
// double (y may be null: then x^2). Fixed partition, fixed tree order: the same inputs give
// the same bits on every run.
void queue_sum_squares(cudaStream_t stream, const DevicePointers& x, const DevicePointers* y,
                       std::int64_t count, std::size_t batch, double* partial);

// sqrt of the sum of matrix b's partials, summed in a fixed order.
__device__ inline double norm_from_partials(const double* partial, unsigned b) {
  double s = 0.0;
  for (int i = 0; i < kBlocksPerMatrix; ++i) s += partial[b * kBlocksPerMatrix + i];
  return sqrt(s);
}

}  // namespace pion::cuda::detail
