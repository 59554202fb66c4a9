// Linear layers through cuBLAS (fp32, TF32 or bf16 inputs with fp32 accumulation; the
// row-major GEMM of cuda/gemm.cuh) and the bf16 workspace with its optional weight mirror.
#include <cuda_bf16.h>

#include <cstdint>
#include <string>
#include <utility>

#include "common.cuh"

namespace pion::cuda::layers {

using namespace detail;

namespace {

__global__ void to_bf16_kernel(__nv_bfloat16* out, const float* in, i64 count) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<i64>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);  // round to nearest even
}

__global__ void from_bf16_kernel(float* out, const __nv_bfloat16* in, i64 count) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<i64>(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

// Slices of the workspace start on 64-element (128-byte) boundaries, which the tensor-core
// GEMM kernels want.
std::size_t padded(i64 count) {
  return (static_cast<std::size_t>(count) + 63) / 64 * 64;
}

// Queues a bf16 copy of count floats into the workspace at element offset `at`; returns it.
const __nv_bfloat16* to_bf16(Context& ctx, Bf16Workspace& ws, std::size_t at, const float* in,
                             i64 count) {
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(ws.data()) + at;
  to_bf16_kernel<<<blocks_for(count), kThreads, 0, stream_of(ctx)>>>(out, in, count);
  PION_CUDA_CHECK_LAUNCH("to_bf16_kernel");
  return out;
}

// Whether a Bf16 call reads weight from the workspace's mirror (and needs no weight slice).
bool weight_mirrored(MatmulPrecision precision, const Bf16Workspace* workspace, const float* weight,
                     i64 count) {
  return precision == MatmulPrecision::Bf16 && workspace != nullptr &&
         workspace->mirrored(weight, count) != nullptr;
}

void check_linear(i64 n, i64 d_in, i64 d_out, MatmulPrecision precision,
                  const Bf16Workspace* workspace, const float* weight, const std::string& who,
                  const void* bf16_a, const void* bf16_b) {
  require_positive(n, who, "n");
  require_positive(d_in, who, "d_in");
  require_positive(d_out, who, "d_out");
  // bf16_a, bf16_b: the call's bf16 operand or output pointers (null when not given).
  require(precision == MatmulPrecision::Bf16 || (bf16_a == nullptr && bf16_b == nullptr), who,
          "bf16 operands and outputs are for Bf16 precision only");
  if (precision == MatmulPrecision::Bf16) {
    const std::size_t need = linear_bf16_workspace_elements(
        n, d_in, d_out, weight_mirrored(precision, workspace, weight, d_out * d_in));
    require(workspace != nullptr && workspace->size() >= need, who,
            "Bf16 precision needs a Bf16Workspace of at least " + std::to_string(need) +
                " elements (linear_bf16_workspace_elements)");
  }
}

// The bf16 weight operand: the mirror's copy when the workspace has one, else a conversion
// into the workspace at element offset `at`.
const __nv_bfloat16* bf16_weight(Context& ctx, Bf16Workspace& ws, std::size_t at,
                                 const float* weight, i64 count) {
  if (const void* m = ws.mirrored(weight, count)) return static_cast<const __nv_bfloat16*>(m);
  return to_bf16(ctx, ws, at, weight, count);
}

}  // namespace

Bf16Workspace::Bf16Workspace(std::size_t elements) : count_(elements) {
  if (elements == 0) return;
  PION_CUDA_CHECK(cudaMalloc(&ptr_, elements * sizeof(__nv_bfloat16)));
}

Bf16Workspace::~Bf16Workspace() {
  if (ptr_ != nullptr) cudaFree(ptr_);  // no throw from a destructor
}

void Bf16Workspace::set_weight_mirror(const float* weights, const void* mirror, std::size_t count) {
  require(weights == nullptr || (mirror != nullptr && count > 0), "Bf16Workspace",
          "a weight mirror needs a bf16 buffer and a count > 0");
  mirror_of_ = weights;
  mirror_ = weights != nullptr ? mirror : nullptr;
  mirror_count_ = weights != nullptr ? count : 0;
}

const void* Bf16Workspace::mirrored(const float* weight, i64 count) const {
  if (mirror_of_ == nullptr || count < 0) return nullptr;
  // As integers: weight may point into any allocation, where pointer comparison with
  // mirror_of_ would be unspecified.
  const auto base = reinterpret_cast<std::uintptr_t>(mirror_of_);
  const auto at = reinterpret_cast<std::uintptr_t>(weight);
  if (at < base || (at - base) % sizeof(float) != 0) return nullptr;
  const std::size_t offset = (at - base) / sizeof(float);
  if (offset > mirror_count_ || static_cast<std::size_t>(count) > mirror_count_ - offset)
    return nullptr;
  return static_cast<const __nv_bfloat16*>(mirror_) + offset;
}

std::size_t linear_bf16_workspace_elements(i64 n, i64 d_in, i64 d_out, bool weight_mirrored) {
  // Backward needs dout, weight and in at once; forward uses the first two slices. A
  // mirrored weight needs no slice.
  return padded(n * d_out) + (weight_mirrored ? 0 : padded(d_out * d_in)) + padded(n * d_in);
}

void convert_to_bf16(Context& ctx, void* out, const float* in, i64 count) {
  require(count >= 0, "convert_to_bf16", "count must be >= 0");
  if (count == 0) return;
  to_bf16_kernel<<<blocks_for(count), kThreads, 0, stream_of(ctx)>>>(
      static_cast<__nv_bfloat16*>(out), in, count);
  PION_CUDA_CHECK_LAUNCH("to_bf16_kernel");
}

void convert_from_bf16(Context& ctx, float* out, const void* in, i64 count) {
  require(count >= 0, "convert_from_bf16", "count must be >= 0");
  if (count == 0) return;
  from_bf16_kernel<<<blocks_for(count), kThreads, 0, stream_of(ctx)>>>(
      out, static_cast<const __nv_bfloat16*>(in), count);
  PION_CUDA_CHECK_LAUNCH("from_bf16_kernel");
}

std::size_t linear_bf16_dout_elements(i64 n, i64 d_out) {
  return padded(n * d_out);
}

void linear_forward(Context& ctx, float* out, const float* in, const float* weight, i64 n, i64 d_in,
                    i64 d_out, MatmulPrecision precision, Bf16Workspace* workspace,
                    const void* in_bf16, void* out_bf16) {
  check_linear(n, d_in, d_out, precision, workspace, weight, "linear_forward", in_bf16, out_bf16);
  require(in != nullptr || in_bf16 != nullptr, "linear_forward", "needs in (or in_bf16)");
  require((out != nullptr) != (out_bf16 != nullptr), "linear_forward",
          "needs exactly one output (out or out_bf16)");
  // out [n, d_out] = in [n, d_in] W^T, W [d_out, d_in].
  if (precision == MatmulPrecision::Bf16) {
    // The producer's bf16 copy when there is one (the same bits the conversion would give).
    const __nv_bfloat16* in16 = in_bf16 != nullptr ? static_cast<const __nv_bfloat16*>(in_bf16)
                                                   : to_bf16(ctx, *workspace, 0, in, n * d_in);
    const __nv_bfloat16* w16 = bf16_weight(ctx, *workspace, padded(n * d_in), weight, d_out * d_in);
    // A bf16 C: cuBLAS rounds the fp32 accumulators once, in its epilogue.
    void* c = out_bf16 != nullptr ? out_bf16 : static_cast<void*>(out);
    gemm_rm_strided(blas_of(ctx), gemm_types(precision, out_bf16 != nullptr), false, true, n, d_out,
                    d_in, 1.0f, in16, d_in, 0, w16, d_in, 0, 0.0f, c, d_out, 0, 1);
    return;
  }
  gemm_rm_strided(blas_of(ctx), gemm_types(precision), false, true, n, d_out, d_in, 1.0f, in, d_in,
                  0, weight, d_in, 0, 0.0f, out, d_out, 0, 1);
}

void linear_backward(Context& ctx, float* din, float* dweight, const float* dout, const float* in,
                     const float* weight, i64 n, i64 d_in, i64 d_out, MatmulPrecision precision,
                     Bf16Workspace* workspace, GradWrite din_write, const void* dout_bf16,
                     const void* in_bf16, void* din_bf16) {
  check_linear(n, d_in, d_out, precision, workspace, weight, "linear_backward", in_bf16, dout_bf16);
  require((dout != nullptr || dout_bf16 != nullptr) && (in != nullptr || in_bf16 != nullptr),
          "linear_backward", "needs dout and in (or their bf16 copies)");
  require(din_bf16 == nullptr || (precision == MatmulPrecision::Bf16 && din == nullptr &&
                                  din_write == GradWrite::Assign),
          "linear_backward", "din_bf16 needs Bf16 precision, Assign and no fp32 din");
  const bool want_din = din != nullptr || din_bf16 != nullptr;
  const bool bf16 = precision == MatmulPrecision::Bf16;
  const void* dout_op = dout;
  const void* w_op = weight;
  const void* in_op = in;
  if (bf16) {
    // Operands already in bf16 (written by their producers) are read as they are; the others
    // are converted into their workspace slices, which stay where they were.
    dout_op = dout_bf16 != nullptr ? dout_bf16 : to_bf16(ctx, *workspace, 0, dout, n * d_out);
    const bool mirrored = weight_mirrored(precision, workspace, weight, d_out * d_in);
    const std::size_t w_at = padded(n * d_out);
    if (want_din) w_op = bf16_weight(ctx, *workspace, w_at, weight, d_out * d_in);
    in_op =
        in_bf16 != nullptr
            ? in_bf16
            : to_bf16(ctx, *workspace, w_at + (mirrored ? 0 : padded(d_out * d_in)), in, n * d_in);
  }
  // din [n, d_in] (+)= dout [n, d_out] W [d_out, d_in].
  const float din_beta = din_write == GradWrite::Assign ? 0.0f : 1.0f;
  // A bf16 din (beta = 0): cuBLAS rounds the fp32 accumulators once, in its epilogue.
  if (want_din)
    gemm_rm_strided(blas_of(ctx), gemm_types(precision, din_bf16 != nullptr), false, false, n, d_in,
                    d_out, 1.0f, dout_op, d_out, 0, w_op, d_in, 0, din_beta,
                    din_bf16 != nullptr ? din_bf16 : static_cast<void*>(din), d_in, 0, 1);
  // dW [d_out, d_in] += dout^T [d_out, n] in [n, d_in].
  gemm_rm_strided(blas_of(ctx), gemm_types(precision), true, false, d_out, d_in, n, 1.0f, dout_op,
                  d_out, 0, in_op, d_in, 0, 1.0f, dweight, d_in, 0, 1);
}

void linear_backward_bf16(Context& ctx, float* din, float* dweight, const void* dout_bf16,
                          const float* in, const float* weight, i64 n, i64 d_in, i64 d_out,
                          Bf16Workspace& workspace, GradWrite din_write, const void* in_bf16,
                          void* din_bf16) {
  require(dout_bf16 != nullptr, "linear_backward_bf16", "dout_bf16 must not be null");
  // linear_backward with its dout already in bf16 leaves the workspace's dout slice alone
  // (the weight and input go after it), so dout_bf16 may lie there.
  linear_backward(ctx, din, dweight, nullptr, in, weight, n, d_in, d_out, MatmulPrecision::Bf16,
                  &workspace, din_write, dout_bf16, in_bf16, din_bf16);
}

}  // namespace pion::cuda::layers
