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
inline dim3 elementwise_grid(std::int64_t count, std::size_t batch) {
  constexpr std::int64_t per_block = static_cast<std::int64_t>(kThreads) * kVecWidth;
  const std::int64_t blocks = (count + per_block - 1) / per_block;
  return dim3(static_cast<unsigned>(blocks < 1                       ? 1
                                    : blocks > kMaxElementwiseBlocks ? kMaxElementwiseBlocks
                                                                     : blocks),
              static_cast<unsigned>(batch));
}

// Whether every pointer is 16-byte aligned: float4 loads and stores are allowed on all.
template <class... P>
__device__ inline bool aligned16(const P*... p) {
  return ((reinterpret_cast<std::uintptr_t>(p) % 16 == 0) && ...);
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
// Stored untyped (cuBLAS wants void* arrays); kernels view it typed through as<T>().
class DevicePointers {
 public:
  DevicePointers() = default;
  template <class T>
  explicit DevicePointers(const std::vector<T*>& host) {
    std::vector<void*> raw(host.begin(), host.end());
    array_ = DeviceArray<void*>(raw);
  }
  void* const* get() const { return array_.data(); }
  template <class T>
  T* const* as() const {
    return reinterpret_cast<T* const*>(array_.data());
  }
  std::size_t size() const { return array_.size(); }

 private:
  DeviceArray<void*> array_;
};

// Pointers to batch consecutive slices of a buffer, stride elements apart.
template <class T>
DevicePointers slice_pointers(T* base, std::size_t batch, std::size_t stride) {
  std::vector<T*> out(batch);
  for (std::size_t b = 0; b < batch; ++b) out[b] = base + b * stride;
  return DevicePointers(out);
}

// gemm_rm_batched (cuda/gemm.cuh) over the pointer arrays of a shape group: row-major
// C = alpha op(A) op(B) + beta C for each of its `batch` matrices.
inline void gemm_group(cublasHandle_t h, const GemmTypes& types, bool trans_a, bool trans_b,
                       std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                       const DevicePointers& a, std::int64_t lda, const DevicePointers& b,
                       std::int64_t ldb, float beta, const DevicePointers& c, std::int64_t ldc,
                       std::size_t batch) {
  gemm_rm_batched(h, types, trans_a, trans_b, m, n, k, alpha, a.get(), lda, b.get(), ldb, beta,
                  c.get(), ldc, static_cast<std::int64_t>(batch));
}

// What a step reads and writes on the device besides the matrices.
struct StepScalars {
  double lr;          // set by set_lr (a kernel argument), read by the step
  long long steps;    // applied steps (AdamW's bias corrections read it)
  long long skipped;  // steps skipped for non-finite gradients
  int bad_grad;       // this step's gradients hold a NaN or Inf
};

void queue_set_lr(cudaStream_t stream, StepScalars* scalars, double lr);
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
