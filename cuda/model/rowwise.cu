// Row-wise and elementwise layers: embedding, RMSNorm, RoPE, SwiGLU, the residual add, and
// the int32 device buffer for token ids. Each kernel is the CPU loop of src/model/layers.cpp
// with the same expression order (nvcc may still contract a * b + c into an FMA, so results
// differ from the CPU by rounding; the tests bound it).
#include <cuda_bf16.h>

#include <algorithm>
#include <utility>

#include "common.cuh"

namespace pion::cuda {

DeviceInt32Buffer::DeviceInt32Buffer(std::size_t count) : count_(count) {
  if (count == 0) return;
  void* p = nullptr;
  PION_CUDA_CHECK(cudaMalloc(&p, count * sizeof(std::int32_t)));
  ptr_ = static_cast<std::int32_t*>(p);
}

DeviceInt32Buffer::~DeviceInt32Buffer() {
  release();
}

// No throw (destructor, move): errors of the frees are ignored.
void DeviceInt32Buffer::release() noexcept {
  if (copied_ != nullptr) {
    // The staging buffer may still be read by a queued copy.
    cudaEventSynchronize(static_cast<cudaEvent_t>(copied_));
    cudaEventDestroy(static_cast<cudaEvent_t>(copied_));
  }
  if (staging_ != nullptr) cudaFreeHost(staging_);
  if (ptr_ != nullptr) cudaFree(ptr_);
  ptr_ = staging_ = nullptr;
  copied_ = nullptr;
  count_ = 0;
}

DeviceInt32Buffer::DeviceInt32Buffer(DeviceInt32Buffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)),
      count_(std::exchange(other.count_, 0)),
      staging_(std::exchange(other.staging_, nullptr)),
      copied_(std::exchange(other.copied_, nullptr)) {}

DeviceInt32Buffer& DeviceInt32Buffer::operator=(DeviceInt32Buffer&& other) noexcept {
  if (this != &other) {
    release();
    ptr_ = std::exchange(other.ptr_, nullptr);
    count_ = std::exchange(other.count_, 0);
    staging_ = std::exchange(other.staging_, nullptr);
    copied_ = std::exchange(other.copied_, nullptr);
  }
  return *this;
}

void DeviceInt32Buffer::upload(const std::int32_t* host, std::size_t count) {
  check(count == count_, "cuda: upload of " + std::to_string(count) +
                             " int32 values into a buffer of " + std::to_string(count_));
  if (count == 0) return;
  // Streams are non-blocking: wait for any work that may still read this buffer.
  PION_CUDA_CHECK(cudaDeviceSynchronize());
  PION_CUDA_CHECK(cudaMemcpy(ptr_, host, count * sizeof(std::int32_t), cudaMemcpyHostToDevice));
}

void DeviceInt32Buffer::upload_async(Context& ctx, const std::int32_t* host, std::size_t count) {
  check(count == count_, "cuda: upload of " + std::to_string(count) +
                             " int32 values into a buffer of " + std::to_string(count_));
  if (count == 0) return;
  const std::size_t bytes = count * sizeof(std::int32_t);
  if (staging_ == nullptr) {
    void* p = nullptr;
    PION_CUDA_CHECK(cudaMallocHost(&p, bytes));
    staging_ = static_cast<std::int32_t*>(p);
    cudaEvent_t e = nullptr;
    PION_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    copied_ = e;
  } else {
    // The previous copy must have read the staging buffer before it is refilled; the
    // trainer reads each step's loss before the next upload, so this rarely waits.
    PION_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(copied_)));
  }
  std::copy(host, host + count, staging_);
  const cudaStream_t stream = ctx.impl().stream;
  PION_CUDA_CHECK(cudaMemcpyAsync(ptr_, staging_, bytes, cudaMemcpyHostToDevice, stream));
  PION_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(copied_), stream));
}

void DeviceInt32Buffer::download(std::int32_t* host, std::size_t count) const {
  check(count == count_, "cuda: download of " + std::to_string(count) +
                             " int32 values from a buffer of " + std::to_string(count_));
  if (count == 0) return;
  PION_CUDA_CHECK(cudaDeviceSynchronize());
  PION_CUDA_CHECK(cudaMemcpy(host, ptr_, count * sizeof(std::int32_t), cudaMemcpyDeviceToHost));
}

}  // namespace pion::cuda

namespace pion::cuda::layers {

using namespace detail;

namespace {

// Grid-stride loop over [0, count).
#define PION_FOR_EACH(i, count)                                                      \
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < (count); \
       i += static_cast<i64>(gridDim.x) * blockDim.x)

// Vocabulary shards of embedding_backward: c * kEmbeddingShards threads share the work.
constexpr unsigned kEmbeddingShards = 64;

// A tensor in fp32, or in bf16 (a bf16 GEMM's output) widened to fp32 on load and rounded to
// nearest even on store: the kernels below do their arithmetic in fp32 either way.
__device__ inline float load(const float* p, i64 i) {
  return p[i];
}
__device__ inline float load(const __nv_bfloat16* p, i64 i) {
  return __bfloat162float(p[i]);
}
__device__ inline void store(float* p, i64 i, float v) {
  p[i] = v;
}
__device__ inline void store(__nv_bfloat16* p, i64 i, float v) {
  p[i] = __float2bfloat16(v);
}

__global__ void embedding_forward_kernel(float* out, const std::int32_t* tokens, const float* table,
                                         i64 n, i64 c) {
  PION_FOR_EACH(e, n * c) {
    const i64 i = e / c, j = e - i * c;
    out[e] = table[static_cast<i64>(tokens[i]) * c + j];
  }
}

// Thread (column j, shard blockIdx.y) adds, for i = 0..n-1 in order, every row whose token
// falls in its shard: each dtable element has exactly one writer, and rows with the same
// token are summed in row order like the CPU's serial loop.
__global__ void embedding_backward_kernel(float* dtable, const float* dout,
                                          const std::int32_t* tokens, i64 n, i64 c) {
  const i64 j = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (j >= c) return;
  const unsigned shard = blockIdx.y;
  for (i64 i = 0; i < n; ++i) {
    const std::int32_t t = tokens[i];  // the same address across the warp: one broadcast load
    if (static_cast<unsigned>(t) % kEmbeddingShards == shard)
      dtable[static_cast<i64>(t) * c + j] += dout[i * c + j];
  }
}

// One block per row: rstd = 1 / sqrt(mean(x^2) + eps), out = w * (x * rstd); out16 (when not
// null) the same value rounded to bf16, out (when not null) in fp32.
__global__ void rmsnorm_forward_kernel(float* out, __nv_bfloat16* out16, float* rstd,
                                       const float* x, const float* weight, i64 c, float eps) {
  const i64 row = blockIdx.x;
  const float* xi = x + row * c;
  float ss = 0.0f;
  for (i64 j = threadIdx.x; j < c; j += blockDim.x) ss += xi[j] * xi[j];
  ss = block_sum(ss);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(c) + eps);  // IEEE sqrt and divide
  if (threadIdx.x == 0) rstd[row] = r;
  for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
    const float y = weight[j] * (xi[j] * r);
    if (out != nullptr) out[row * c + j] = y;
    if (out16 != nullptr) out16[row * c + j] = __float2bfloat16(y);  // round to nearest even
  }
}

// One block per row: dx_j += r w_j dy_j - (r^3 / c) x_j sum_k w_k dy_k x_k (the CPU's
// derivation: y = w x r, r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / c). dout (G) in
// fp32, or in bf16 (a bf16 GEMM's din).
template <typename G>
__global__ void rmsnorm_backward_dx_kernel(float* dx, __nv_bfloat16* dx16, const G* dout,
                                           const float* x, const float* weight, const float* rstd,
                                           i64 c, bool assign) {
  const i64 row = blockIdx.x;
  const float* xi = x + row * c;
  const G* gi = dout + row * c;
  const float r = rstd[row];
  float dot = 0.0f;
  for (i64 j = threadIdx.x; j < c; j += blockDim.x) dot += weight[j] * load(gi, j) * xi[j];
  dot = block_sum(dot);
  const float coef = dot * r * r * r / static_cast<float>(c);
  float* dxi = dx + row * c;
  for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
    const float g = r * weight[j] * load(gi, j) - coef * xi[j];
    if (assign)
      dxi[j] = g;  // the first writer: dx is neither zeroed before nor read
    else
      dxi[j] += g;
    if (dx16 != nullptr) dx16[row * c + j] = __float2bfloat16(dxi[j]);  // the final value
  }
}

// dweight_j += sum_i dy_ij x_ij r_i in two passes. Partial pass, grid (column blocks, row
// chunks), block (32, kRowLanes): 32 adjacent columns (coalesced row reads) of the chunk's
// kRmsNormChunkRows rows; thread (x, y) sums rows y, y + kRowLanes, ... of the chunk in order,
// then one thread per column adds the kRowLanes sums in lane order into partial[chunk][j].
// Final pass: one thread per column adds the chunks' partials in chunk order. Every sum has a
// fixed order whatever order the blocks run in, and there are no atomics.
constexpr unsigned kRowLanes = 8;
template <typename G>
__global__ void rmsnorm_dweight_partial_kernel(float* partial, const G* dout, const float* x,
                                               const float* rstd, i64 n, i64 c) {
  __shared__ float lanes[kRowLanes][33];  // +1 column: no bank conflicts on the final pass
  const i64 j = blockIdx.x * static_cast<i64>(32) + threadIdx.x;
  const i64 begin = blockIdx.y * kRmsNormChunkRows;
  const i64 end = begin + kRmsNormChunkRows < n ? begin + kRmsNormChunkRows : n;
  float acc = 0.0f;
  if (j < c)
    for (i64 i = begin + threadIdx.y; i < end; i += kRowLanes)
      acc += load(dout, i * c + j) * x[i * c + j] * rstd[i];
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < c) {
    float sum = 0.0f;
    for (unsigned l = 0; l < kRowLanes; ++l) sum += lanes[l][threadIdx.x];
    partial[blockIdx.y * c + j] = sum;
  }
}

__global__ void rmsnorm_dweight_sum_kernel(float* dweight, const float* partial, i64 chunks,
                                           i64 c) {
  const i64 j = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x;
  if (j >= c) return;
  float sum = 0.0f;
  for (i64 k = 0; k < chunks; ++k) sum += partial[k * c + j];  // coalesced across the warp
  dweight[j] += sum;
}

i64 rmsnorm_chunks(i64 n) {
  return (n + kRmsNormChunkRows - 1) / kRmsNormChunkRows;
}

// Thread per (row, head, pair i): rotates (x_i, x_{i+half}) by sign * angle(pos, i). T: fp32,
// or bf16 (widened, rotated in fp32, rounded back).
template <typename T>
__global__ void rope_kernel(T* x, const float* cos_table, const float* sin_table, i64 rows, i64 seq,
                            i64 n_head, i64 head_dim, i64 half, i64 row_stride, float sign) {
  PION_FOR_EACH(e, rows * n_head * half) {
    const i64 i = e % half;
    const i64 h = (e / half) % n_head;
    const i64 row = e / (half * n_head);
    const i64 pos = row % seq;
    const float cs = cos_table[pos * half + i];
    const float s = sign * sin_table[pos * half + i];
    T* a = x + row * row_stride + h * head_dim;
    const float xa = load(a, i), xb = load(a, i + half);
    store(a, i, xa * cs - xb * s);
    store(a, i + half, xb * cs + xa * s);
  }
}

// RoPE's backward over whole [q | k | v] rows into bf16: thread per element of a row; the
// first `rotated` columns (query then key heads) are rotated by -angle with rope_kernel's
// expressions (sign -1), the rest copied.
__global__ void rope_backward_qkv_bf16_kernel(__nv_bfloat16* out, const float* dqkv,
                                              const float* cos_table, const float* sin_table,
                                              i64 rows, i64 seq, i64 rotated, i64 head_dim,
                                              i64 half, i64 width) {
  PION_FOR_EACH(e, rows * width) {
    const i64 row = e / width, col = e - row * width;
    float v = dqkv[e];
    if (col < rotated) {
      const i64 k = col % head_dim;  // column inside its head
      const i64 i = k < half ? k : k - half;
      const i64 pos = row % seq;
      const float cs = cos_table[pos * half + i];
      const float s = -1.0f * sin_table[pos * half + i];
      const float* a = dqkv + e - k;  // the head's first column
      const float xa = a[i], xb = a[i + half];
      v = k < half ? xa * cs - xb * s : xb * cs + xa * s;
    }
    out[e] = __float2bfloat16(v);
  }
}

template <typename G>
__global__ void swiglu_forward_kernel(float* out, __nv_bfloat16* out16, const G* gu, i64 n, i64 f) {
  PION_FOR_EACH(e, n * f) {
    const i64 i = e / f, j = e - i * f;
    const float g = load(gu, i * 2 * f + j);
    const float u = load(gu, i * 2 * f + f + j);
    const float y = g / (1.0f + expf(-g)) * u;
    if (out != nullptr) out[e] = y;
    if (out16 != nullptr) out16[e] = __float2bfloat16(y);
  }
}

// silu(g) = g s(g), silu'(g) = s(g) (1 + g (1 - s(g))).
// dout in fp32, or (dout16 not null) in bf16: a uniform branch.
template <typename G>
__global__ void swiglu_backward_kernel(float* dgu, __nv_bfloat16* dgu16, const float* dout,
                                       const __nv_bfloat16* dout16, const G* gu, i64 n, i64 f,
                                       bool assign) {
  PION_FOR_EACH(e, n * f) {
    const i64 i = e / f, j = e - i * f;
    const float g = load(gu, i * 2 * f + j);
    const float u = load(gu, i * 2 * f + f + j);
    const float go = dout16 != nullptr ? load(dout16, e) : dout[e];
    const float s = 1.0f / (1.0f + expf(-g));
    const float dg = go * u * s * (1.0f + g * (1.0f - s)), du = go * g * s;
    const i64 ig = i * 2 * f + j, iu = ig + f;
    if (dgu != nullptr) {
      if (assign) {  // the first writer: dgu is neither zeroed before nor read
        dgu[ig] = dg;
        dgu[iu] = du;
      } else {
        dgu[ig] += dg;
        dgu[iu] += du;
      }
    }
    if (dgu16 != nullptr) {  // the final values; dgu is null only with assign
      dgu16[ig] = __float2bfloat16(dgu != nullptr ? dgu[ig] : dg);
      dgu16[iu] = __float2bfloat16(dgu != nullptr ? dgu[iu] : du);
    }
  }
}

// delta (D) in fp32, or in bf16 (a bf16 GEMM's output).
template <typename D>
__global__ void residual_kernel(float* out, const float* x, const D* delta, i64 count) {
  PION_FOR_EACH(e, count) out[e] = x[e] + load(delta, e);
}

__global__ void accumulate_kernel(float* dst, const float* src, i64 count) {
  PION_FOR_EACH(e, count) dst[e] += src[e];
}

#undef PION_FOR_EACH

void check_rope(const DeviceRopeTable& table, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                i64 row_stride, const std::string& who) {
  require_positive(batch, who, "batch");
  require_positive(seq, who, "seq");
  require_positive(n_head, who, "n_head");
  require(seq <= table.seq_len() && 2 * table.half() == head_dim, who,
          "table built for seq_len " + std::to_string(table.seq_len()) + ", head_dim " +
              std::to_string(2 * table.half()) + " used with seq " + std::to_string(seq) +
              ", head_dim " + std::to_string(head_dim));
  require(row_stride >= n_head * head_dim, who,
          "row_stride " + std::to_string(row_stride) +
              " is less than n_head * head_dim = " + std::to_string(n_head * head_dim));
}

template <typename T>
void rope_apply(Context& ctx, T* x, const DeviceRopeTable& table, i64 batch, i64 seq, i64 n_head,
                i64 head_dim, i64 row_stride, float sign, const char* who) {
  check_rope(table, batch, seq, n_head, head_dim, row_stride, who);
  require(x != nullptr, who, "x must not be null");
  const i64 rows = batch * seq;
  rope_kernel<T><<<blocks_for(rows * n_head * table.half()), kThreads, 0, stream_of(ctx)>>>(
      x, table.cos(), table.sin(), rows, seq, n_head, head_dim, table.half(), row_stride, sign);
  PION_CUDA_CHECK_LAUNCH("rope_kernel");
}

}  // namespace

void embedding_forward(Context& ctx, float* out, const std::int32_t* tokens, const float* table,
                       i64 n, i64 c) {
  require_positive(n, "embedding_forward", "n");
  require_positive(c, "embedding_forward", "c");
  embedding_forward_kernel<<<blocks_for(n * c), kThreads, 0, stream_of(ctx)>>>(out, tokens, table,
                                                                               n, c);
  PION_CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

void embedding_backward(Context& ctx, float* dtable, const float* dout, const std::int32_t* tokens,
                        i64 n, i64 c) {
  require_positive(n, "embedding_backward", "n");
  require_positive(c, "embedding_backward", "c");
  const dim3 grid(static_cast<unsigned>((c + kThreads - 1) / kThreads), kEmbeddingShards);
  embedding_backward_kernel<<<grid, kThreads, 0, stream_of(ctx)>>>(dtable, dout, tokens, n, c);
  PION_CUDA_CHECK_LAUNCH("embedding_backward_kernel");
}

void rmsnorm_forward(Context& ctx, float* out, float* rstd, const float* x, const float* weight,
                     i64 n, i64 c, double eps, void* out_bf16) {
  require_positive(n, "rmsnorm_forward", "n");
  require_positive(c, "rmsnorm_forward", "c");
  require(out != nullptr || out_bf16 != nullptr, "rmsnorm_forward",
          "needs an output (out or out_bf16)");
  rmsnorm_forward_kernel<<<static_cast<unsigned>(as_int(n, "rmsnorm_forward", "n")), kThreads, 0,
                           stream_of(ctx)>>>(out, static_cast<__nv_bfloat16*>(out_bf16), rstd, x,
                                             weight, c, static_cast<float>(eps));
  PION_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

std::size_t rmsnorm_backward_scratch_elements(i64 n, i64 c) {
  require_positive(n, "rmsnorm_backward_scratch_elements", "n");
  require_positive(c, "rmsnorm_backward_scratch_elements", "c");
  return static_cast<std::size_t>(rmsnorm_chunks(n)) * static_cast<std::size_t>(c);
}

void rmsnorm_backward(Context& ctx, float* dx, float* dweight, float* scratch, const float* dout,
                      const float* x, const float* weight, const float* rstd, i64 n, i64 c,
                      GradWrite dx_write, void* dx_bf16, const void* dout_bf16) {
  require_positive(n, "rmsnorm_backward", "n");
  require_positive(c, "rmsnorm_backward", "c");
  require(scratch != nullptr, "rmsnorm_backward",
          "scratch must hold rmsnorm_backward_scratch_elements(n, c) floats");
  require((dout != nullptr) != (dout_bf16 != nullptr), "rmsnorm_backward",
          "needs exactly one of dout and dout_bf16");
  const unsigned rows = static_cast<unsigned>(as_int(n, "rmsnorm_backward", "n"));
  const auto* dout16 = static_cast<const __nv_bfloat16*>(dout_bf16);
  auto* dx16 = static_cast<__nv_bfloat16*>(dx_bf16);
  const bool assign = dx_write == GradWrite::Assign;
  if (dout16 != nullptr)
    rmsnorm_backward_dx_kernel<__nv_bfloat16>
        <<<rows, kThreads, 0, stream_of(ctx)>>>(dx, dx16, dout16, x, weight, rstd, c, assign);
  else
    rmsnorm_backward_dx_kernel<float>
        <<<rows, kThreads, 0, stream_of(ctx)>>>(dx, dx16, dout, x, weight, rstd, c, assign);
  PION_CUDA_CHECK_LAUNCH("rmsnorm_backward_dx_kernel");
  const i64 chunks = rmsnorm_chunks(n);
  const dim3 grid(static_cast<unsigned>(as_int((c + 31) / 32, "rmsnorm_backward", "c / 32")),
                  static_cast<unsigned>(as_int(chunks, "rmsnorm_backward", "n / 64")));
  if (dout16 != nullptr)
    rmsnorm_dweight_partial_kernel<__nv_bfloat16>
        <<<grid, dim3(32, kRowLanes), 0, stream_of(ctx)>>>(scratch, dout16, x, rstd, n, c);
  else
    rmsnorm_dweight_partial_kernel<float>
        <<<grid, dim3(32, kRowLanes), 0, stream_of(ctx)>>>(scratch, dout, x, rstd, n, c);
  PION_CUDA_CHECK_LAUNCH("rmsnorm_dweight_partial_kernel");
  rmsnorm_dweight_sum_kernel<<<blocks_for(c), kThreads, 0, stream_of(ctx)>>>(dweight, scratch,
                                                                             chunks, c);
  PION_CUDA_CHECK_LAUNCH("rmsnorm_dweight_sum_kernel");
}

DeviceRopeTable::DeviceRopeTable(const std::vector<float>& cos, const std::vector<float>& sin,
                                 i64 seq_len, i64 half)
    : cos_(cos.size()), sin_(sin.size()), seq_len_(seq_len), half_(half) {
  require(seq_len > 0 && half > 0 && cos.size() == static_cast<std::size_t>(seq_len * half) &&
              sin.size() == cos.size(),
          "DeviceRopeTable",
          "cos and sin must hold seq_len * half values each (build them with "
          "pion::layers::make_rope_table<float>)");
  cos_.upload(cos.data(), cos.size());
  sin_.upload(sin.data(), sin.size());
}

void rope_forward(Context& ctx, float* x, const DeviceRopeTable& table, i64 batch, i64 seq,
                  i64 n_head, i64 head_dim, i64 row_stride) {
  rope_apply(ctx, x, table, batch, seq, n_head, head_dim, row_stride, 1.0f, "rope_forward");
}

void rope_backward(Context& ctx, float* dx, const DeviceRopeTable& table, i64 batch, i64 seq,
                   i64 n_head, i64 head_dim, i64 row_stride) {
  // A rotation's transpose is the rotation by the opposite angle.
  rope_apply(ctx, dx, table, batch, seq, n_head, head_dim, row_stride, -1.0f, "rope_backward");
}

void rope_forward_bf16(Context& ctx, void* x_bf16, const DeviceRopeTable& table, i64 batch, i64 seq,
                       i64 n_head, i64 head_dim, i64 row_stride) {
  rope_apply(ctx, static_cast<__nv_bfloat16*>(x_bf16), table, batch, seq, n_head, head_dim,
             row_stride, 1.0f, "rope_forward_bf16");
}

void rope_backward_bf16(Context& ctx, void* dx_bf16, const DeviceRopeTable& table, i64 batch,
                        i64 seq, i64 n_head, i64 head_dim, i64 row_stride) {
  rope_apply(ctx, static_cast<__nv_bfloat16*>(dx_bf16), table, batch, seq, n_head, head_dim,
             row_stride, -1.0f, "rope_backward_bf16");
}

void rope_backward_qkv_bf16(Context& ctx, void* out_bf16, const float* dqkv,
                            const DeviceRopeTable& table, i64 batch, i64 seq, i64 n_head,
                            i64 n_kv_head, i64 head_dim, i64 row_width) {
  const char* who = "rope_backward_qkv_bf16";
  require_positive(n_kv_head, who, "n_kv_head");
  // The query and key heads are contiguous from the row's start: one head range.
  check_rope(table, batch, seq, n_head + n_kv_head, head_dim, row_width, who);
  require(out_bf16 != nullptr && dqkv != nullptr, who, "needs dqkv and out_bf16");
  const i64 rows = batch * seq;
  rope_backward_qkv_bf16_kernel<<<blocks_for(rows * row_width), kThreads, 0, stream_of(ctx)>>>(
      static_cast<__nv_bfloat16*>(out_bf16), dqkv, table.cos(), table.sin(), rows, seq,
      (n_head + n_kv_head) * head_dim, head_dim, table.half(), row_width);
  PION_CUDA_CHECK_LAUNCH("rope_backward_qkv_bf16_kernel");
}

void swiglu_forward(Context& ctx, float* out, const float* gu, i64 n, i64 f, void* out_bf16,
                    const void* gu_bf16) {
  require_positive(n, "swiglu_forward", "n");
  require_positive(f, "swiglu_forward", "f");
  require(out != nullptr || out_bf16 != nullptr, "swiglu_forward",
          "needs an output (out or out_bf16)");
  require((gu != nullptr) != (gu_bf16 != nullptr), "swiglu_forward",
          "needs exactly one of gu and gu_bf16");
  auto* out16 = static_cast<__nv_bfloat16*>(out_bf16);
  if (gu_bf16 != nullptr)
    swiglu_forward_kernel<__nv_bfloat16><<<blocks_for(n * f), kThreads, 0, stream_of(ctx)>>>(
        out, out16, static_cast<const __nv_bfloat16*>(gu_bf16), n, f);
  else
    swiglu_forward_kernel<float>
        <<<blocks_for(n * f), kThreads, 0, stream_of(ctx)>>>(out, out16, gu, n, f);
  PION_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
}

void swiglu_backward(Context& ctx, float* dgu, const float* dout, const float* gu, i64 n, i64 f,
                     GradWrite dgu_write, void* dgu_bf16, const void* gu_bf16,
                     const void* dout_bf16) {
  require_positive(n, "swiglu_backward", "n");
  require_positive(f, "swiglu_backward", "f");
  require(dgu != nullptr || (dgu_bf16 != nullptr && dgu_write == GradWrite::Assign),
          "swiglu_backward", "dgu may be null only with Assign and a dgu_bf16 output");
  require((gu != nullptr) != (gu_bf16 != nullptr), "swiglu_backward",
          "needs exactly one of gu and gu_bf16");
  require((dout != nullptr) != (dout_bf16 != nullptr), "swiglu_backward",
          "needs exactly one of dout and dout_bf16");
  auto* dgu16 = static_cast<__nv_bfloat16*>(dgu_bf16);
  const auto* dout16 = static_cast<const __nv_bfloat16*>(dout_bf16);
  const bool assign = dgu_write == GradWrite::Assign;
  if (gu_bf16 != nullptr)
    swiglu_backward_kernel<__nv_bfloat16><<<blocks_for(n * f), kThreads, 0, stream_of(ctx)>>>(
        dgu, dgu16, dout, dout16, static_cast<const __nv_bfloat16*>(gu_bf16), n, f, assign);
  else
    swiglu_backward_kernel<float><<<blocks_for(n * f), kThreads, 0, stream_of(ctx)>>>(
        dgu, dgu16, dout, dout16, gu, n, f, assign);
  PION_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
}

void residual_forward(Context& ctx, float* out, const float* x, const float* delta, i64 count,
                      const void* delta_bf16) {
  require_positive(count, "residual_forward", "count");
  require((delta != nullptr) != (delta_bf16 != nullptr), "residual_forward",
          "needs exactly one of delta and delta_bf16");
  if (delta_bf16 != nullptr)
    residual_kernel<__nv_bfloat16><<<blocks_for(count), kThreads, 0, stream_of(ctx)>>>(
        out, x, static_cast<const __nv_bfloat16*>(delta_bf16), count);
  else
    residual_kernel<float>
        <<<blocks_for(count), kThreads, 0, stream_of(ctx)>>>(out, x, delta, count);
  PION_CUDA_CHECK_LAUNCH("residual_kernel");
}

void accumulate(Context& ctx, float* dst, const float* src, i64 count) {
  require_positive(count, "accumulate", "count");
  accumulate_kernel<<<blocks_for(count), kThreads, 0, stream_of(ctx)>>>(dst, src, count);
  PION_CUDA_CHECK_LAUNCH("accumulate_kernel");
}

}  // namespace pion::cuda::layers
