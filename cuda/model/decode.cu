// Incremental decoding over a KV cache (include/pion/cuda/decode_layers.h): RoPE at per-row
// positions, storing keys and values into the cache, attention of each row over its own
// slot's positions, and gathering the rows whose logits are wanted. Each is the loop of the
// CPU Decoder (src/model/decode.cpp) on the device.
#include <cmath>

#include "common.cuh"
#include "pion/cuda/decode_layers.h"

namespace pion::cuda::layers {

using namespace detail;

namespace {

#define PION_FOR_EACH(i, count)                                                      \
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < (count); \
       i += static_cast<i64>(gridDim.x) * blockDim.x)

// Thread per (row, head, pair i): rotates (x_i, x_{i+half}) by the angle of (row_pos[row], i),
// rope_kernel's arithmetic (cuda/model/rowwise.cu).
__global__ void rope_rows_kernel(float* x, const float* cos_table, const float* sin_table,
                                 const std::int32_t* row_pos, i64 rows, i64 n_head, i64 head_dim,
                                 i64 half, i64 row_stride) {
  PION_FOR_EACH(e, rows * n_head * half) {
    const i64 i = e % half;
    const i64 h = (e / half) % n_head;
    const i64 row = e / (half * n_head);
    const i64 pos = row_pos[row];
    const float cs = cos_table[pos * half + i];
    const float s = sin_table[pos * half + i];
    float* a = x + row * row_stride + h * head_dim;
    const float xa = a[i], xb = a[i + half];
    a[i] = xa * cs - xb * s;
    a[i + half] = xb * cs + xa * s;
  }
}

// Thread per (row, K/V head, column).
__global__ void kv_cache_store_kernel(float* keys, float* values, const float* qkv,
                                      const std::int32_t* row_slot, const std::int32_t* row_pos,
                                      i64 rows, i64 qkv_stride, i64 n_kv_head, i64 head_dim,
                                      i64 capacity) {
  const i64 kv = n_kv_head * head_dim, d = qkv_stride - 2 * kv;
  PION_FOR_EACH(e, rows * kv) {
    const i64 r = e / kv, col = e - r * kv;  // col = head * head_dim + c
    const i64 head = col / head_dim, c = col - head * head_dim;
    const i64 at =
        ((static_cast<i64>(row_slot[r]) * n_kv_head + head) * capacity + row_pos[r]) * head_dim + c;
    const float* src = qkv + r * qkv_stride + d + col;
    keys[at] = src[0];
    values[at] = src[kv];
  }
}

// One warp (the whole block) per (row, query head). The keys 0..len-1 of the row's slot go
// by in tiles of 32: lane j scores key t0 + j (a dot over head_dim against the query, kept in
// shared memory), the tile's max updates the running max m (the sum l and the output
// accumulators are rescaled by exp(m_old - m_new)), and then each lane adds the tile's
// p_k V_k to the columns it owns (c = lane + 32 i, i < kPerLane), reading the tile's
// probabilities from shared memory. Every sum has a fixed order: deterministic.
template <int kPerLane>
__global__ void decode_attention_kernel(float* out, const float* qkv, const float* keys,
                                        const float* values, const std::int32_t* row_slot,
                                        const std::int32_t* row_pos, i64 qkv_stride, i64 n_head,
                                        i64 n_kv_head, i64 head_dim, i64 capacity, float scale) {
  __shared__ float q_s[32 * kPerLane];
  __shared__ float p_s[32];
  const i64 r = blockIdx.x / n_head, h = blockIdx.x % n_head;
  const int lane = static_cast<int>(threadIdx.x);
  const float* q = qkv + r * qkv_stride + h * head_dim;
  for (i64 c = lane; c < head_dim; c += 32) q_s[c] = q[c];
  __syncwarp();
  const i64 len = static_cast<i64>(row_pos[r]) + 1;
  const i64 kh = h / (n_head / n_kv_head);  // HF's repeat_kv grouping
  const i64 base = (static_cast<i64>(row_slot[r]) * n_kv_head + kh) * capacity * head_dim;
  const float* k = keys + base;
  const float* v = values + base;

  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (i64 t0 = 0; t0 < len; t0 += 32) {
    const i64 j = t0 + lane;
    float s = -INFINITY;
    if (j < len) {
      const float* kj = k + j * head_dim;
      float dot = 0.0f;
      for (i64 c = 0; c < head_dim; ++c) dot += q_s[c] * kj[c];
      s = dot * scale;
    }
    const float m_new = fmaxf(m, warp_max(s));  // finite: key t0 < len always scores
    const float p = j < len ? expf(s - m_new) : 0.0f;
    const float rescale = expf(m - m_new);  // 0 on the first tile (m = -inf), acc and l are 0
    l = l * rescale + warp_sum(p);
    m = m_new;
    p_s[lane] = p;
    __syncwarp();
    const i64 keys_here = len - t0 < 32 ? len - t0 : 32;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const i64 c = lane + 32 * i;
      if (c < head_dim) {
        float a = acc[i] * rescale;
        for (i64 kk = 0; kk < keys_here; ++kk) a += p_s[kk] * v[(t0 + kk) * head_dim + c];
        acc[i] = a;
      }
    }
    __syncwarp();  // p_s is rewritten by the next tile
  }
  const float inv = 1.0f / l;
  float* o = out + r * n_head * head_dim + h * head_dim;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const i64 c = lane + 32 * i;
    if (c < head_dim) o[c] = acc[i] * inv;
  }
}

struct DecodeAttentionArgs {
  float* out;
  const float *qkv, *keys, *values;
  const std::int32_t *row_slot, *row_pos;
  i64 qkv_stride, n_head, n_kv_head, head_dim, capacity;
  float scale;
};
template <int kPerLane>
void launch_decode_attention(Context& ctx, unsigned blocks, const DecodeAttentionArgs& a) {
  decode_attention_kernel<kPerLane><<<blocks, 32, 0, stream_of(ctx)>>>(
      a.out, a.qkv, a.keys, a.values, a.row_slot, a.row_pos, a.qkv_stride, a.n_head, a.n_kv_head,
      a.head_dim, a.capacity, a.scale);
}

__global__ void gather_rows_kernel(float* out, const float* in, const std::int32_t* index, i64 m,
                                   i64 c) {
  PION_FOR_EACH(e, m * c) {
    const i64 i = e / c, j = e - i * c;
    out[e] = in[static_cast<i64>(index[i]) * c + j];
  }
}

#undef PION_FOR_EACH

}  // namespace

void rope_rows_forward(Context& ctx, float* x, const DeviceRopeTable& table,
                       const std::int32_t* row_pos, i64 rows, i64 n_head, i64 head_dim,
                       i64 row_stride) {
  const std::string who = "rope_rows_forward";
  require_positive(rows, who, "rows");
  require_positive(n_head, who, "n_head");
  require(2 * table.half() == head_dim, who,
          "table built for head_dim " + std::to_string(2 * table.half()) + ", used with " +
              std::to_string(head_dim));
  require(row_stride >= n_head * head_dim, who,
          "row_stride " + std::to_string(row_stride) +
              " is less than n_head * head_dim = " + std::to_string(n_head * head_dim));
  rope_rows_kernel<<<blocks_for(rows * n_head * table.half()), kThreads, 0, stream_of(ctx)>>>(
      x, table.cos(), table.sin(), row_pos, rows, n_head, head_dim, table.half(), row_stride);
  PION_CUDA_CHECK_LAUNCH("rope_rows_kernel");
}

void kv_cache_store(Context& ctx, float* keys, float* values, const float* qkv,
                    const std::int32_t* row_slot, const std::int32_t* row_pos, i64 rows,
                    i64 qkv_stride, i64 n_kv_head, i64 head_dim, i64 capacity) {
  const std::string who = "kv_cache_store";
  require_positive(rows, who, "rows");
  require_positive(n_kv_head, who, "n_kv_head");
  require_positive(head_dim, who, "head_dim");
  require_positive(capacity, who, "capacity");
  require(qkv_stride > 2 * n_kv_head * head_dim, who,
          "qkv_stride " + std::to_string(qkv_stride) + " leaves no query columns");
  kv_cache_store_kernel<<<blocks_for(rows * n_kv_head * head_dim), kThreads, 0, stream_of(ctx)>>>(
      keys, values, qkv, row_slot, row_pos, rows, qkv_stride, n_kv_head, head_dim, capacity);
  PION_CUDA_CHECK_LAUNCH("kv_cache_store_kernel");
}

void decode_attention(Context& ctx, float* out, const float* qkv, const float* keys,
                      const float* values, const std::int32_t* row_slot,
                      const std::int32_t* row_pos, i64 rows, i64 qkv_stride, i64 n_head,
                      i64 n_kv_head, i64 head_dim, i64 capacity) {
  const std::string who = "decode_attention";
  require_positive(rows, who, "rows");
  require_positive(n_head, who, "n_head");
  require_positive(n_kv_head, who, "n_kv_head");
  require_positive(capacity, who, "capacity");
  require(n_head % n_kv_head == 0, who,
          "n_kv_head (" + std::to_string(n_kv_head) + ") must divide n_head (" +
              std::to_string(n_head) + ")");
  require(head_dim > 0 && head_dim <= kDecodeMaxHeadDim, who,
          "head_dim " + std::to_string(head_dim) + " outside [1, " +
              std::to_string(kDecodeMaxHeadDim) + "]");
  require(qkv_stride >= (n_head + 2 * n_kv_head) * head_dim, who,
          "qkv_stride " + std::to_string(qkv_stride) + " is less than (n_head + 2 n_kv_head) " +
              "head_dim");
  const unsigned blocks = static_cast<unsigned>(as_int(rows * n_head, who, "rows * n_head"));
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const DecodeAttentionArgs a{out,        qkv,    keys,      values,   row_slot, row_pos,
                              qkv_stride, n_head, n_kv_head, head_dim, capacity, scale};
  // Columns per lane: the smallest compiled count covering head_dim.
  if (head_dim <= 32)
    launch_decode_attention<1>(ctx, blocks, a);
  else if (head_dim <= 64)
    launch_decode_attention<2>(ctx, blocks, a);
  else if (head_dim <= 128)
    launch_decode_attention<4>(ctx, blocks, a);
  else
    launch_decode_attention<8>(ctx, blocks, a);
  PION_CUDA_CHECK_LAUNCH("decode_attention_kernel");
}

void gather_rows(Context& ctx, float* out, const float* in, const std::int32_t* index, i64 m,
                 i64 c) {
  require_positive(m, "gather_rows", "m");
  require_positive(c, "gather_rows", "c");
  gather_rows_kernel<<<blocks_for(m * c), kThreads, 0, stream_of(ctx)>>>(out, in, index, m, c);
  PION_CUDA_CHECK_LAUNCH("gather_rows_kernel");
}

void upload_async(Context& ctx, std::int32_t* device, const std::int32_t* host, std::size_t count) {
  if (count == 0) return;
  // From pageable memory the copy returns once the host data is staged: the caller may reuse it.
  PION_CUDA_CHECK(cudaMemcpyAsync(device, host, count * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, stream_of(ctx)));
}

void download_sync(Context& ctx, float* host, const float* device, std::size_t count) {
  if (count == 0) return;
  PION_CUDA_CHECK(
      cudaMemcpyAsync(host, device, count * sizeof(float), cudaMemcpyDeviceToHost, stream_of(ctx)));
  PION_CUDA_CHECK(cudaStreamSynchronize(stream_of(ctx)));
}

}  // namespace pion::cuda::layers
