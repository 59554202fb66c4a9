// Fused causal attention (include/pion/cuda/flash_attention.h), fp32 on CUDA cores.
//
// Per (batch, head) the work is split into square tiles of T query rows x T keys; with the
// causal mask only tiles with key tile <= query tile are visited, and only the diagonal tile
// (plus the ragged last tile, rows / keys >= seq) needs masking.
//
// Forward, one block per (query tile, batch * head): the query tile stays in shared memory,
// key tiles stream through; each query row keeps a running max m and sum l (online softmax)
// and its output accumulator in registers, rescaled by exp(m_old - m_new) when the max grows.
// lse = m + log(l) is written for backward.
//
// Backward (FlashAttention-2 style, recomputing P = exp(s - lse)), three kernels, none with
// atomics so every sum has one fixed order:
//   1. delta_i = sum_c dout[i, c] out[i, c] per row (one warp per row, into scratch);
//   2. dK, dV: one block per (key tile, batch * head), looping over the query tiles that see
//      it: dV_j += sum_i P_ij dO_i, dK_j += scale sum_i dS_ij Q_i, dS_ij = P_ij (dP_ij -
//      delta_i), dP_ij = dO_i . V_j;
//   3. dQ: one block per (query tile, batch * head), looping over key tiles:
//      dQ_i += scale sum_j dS_ij K_j.
//
// Thread layout, shared by every tile kernel: kFlashThreads threads per block, TPR = threads
// / T consecutive threads per tile row (a "row group", inside one warp). Thread (r, c) owns
// row r of the block's own tile; it computes the scores of keys (or queries) c, c + TPR, ...
// of the streamed tile and the output columns c, c + TPR, ... of its row. Strided columns and
// rows padded to D + 1 floats keep shared-memory reads free of bank conflicts.
//
// Kernels are compiled for D = 32, 64 and 128 columns; a head_dim below D is zero-padded in
// shared memory (zeros add nothing to the dot products) and the padding is never written.
//
// Grouped-query attention (n_kv_head < n_head, g = n_head / n_kv_head query heads per K/V
// head): the forward and dQ kernels of query head h simply read K/V head h / g. The dK / dV
// kernel runs one block per (key tile, batch * K/V head) and loops over the g query heads of
// the group (then over their query tiles), so a K/V head's gradient is summed over its group
// in one fixed order by one owner: still no atomics.
#include <cuda_bf16.h>

#include <cmath>

#include "common.cuh"
#include "flash_common.cuh"
#include "pion/cuda/flash_attention.h"

namespace pion::cuda::layers {

using namespace detail;
using namespace flash;

namespace {

constexpr int kFlashThreads = 256;  // 8 warps per block
constexpr int kMaxHeadDim = 128;    // the largest compiled D
// __launch_bounds__ minimum of resident blocks per SM: it caps registers at 64 per thread,
// which none of the tile kernels spills at (ptxas -v, sm_80 and sm_90). Left to itself ptxas
// picked 48 registers for the D = 128 forward and spilled; 4 blocks of <= 42 KiB of shared
// memory also fit an SM's shared memory.
constexpr int kMinBlocksPerSm = 4;
// Static shared memory is limited to 48 KiB per block without cudaFuncSetAttribute (which
// would be a host call to make before graph capture); the tile sizes below keep under it.
constexpr int kStaticSmemBytes = 48 * 1024;

// Tile size T (query rows = keys per tile) by compiled column count D. Backward holds four
// [T][D + 1] tiles (Q, dO, K, V) at once, so at D = 128 it takes T = 16 to stay under 48 KiB;
// forward holds two (Q and K-then-V) and keeps T = 32.
template <int D>
struct FlashTiles {
  static constexpr int kForward = 32;
  static constexpr int kBackward = D <= 64 ? 32 : 16;
};

template <int T, int D>
__host__ __device__ constexpr int forward_smem_bytes() {
  return static_cast<int>(sizeof(float)) * (2 * T * (D + 1) + T * (T + 1));
}
// The dK / dV kernel's, the larger of the two backward kernels.
template <int T, int D>
__host__ __device__ constexpr int backward_smem_bytes() {
  return static_cast<int>(sizeof(float)) * (4 * T * (D + 1) + 2 * T * (T + 1) + 2 * T);
}

// Checks every kernel's layout assumptions for one (T, D) at compile time.
template <int T, int D>
__host__ __device__ constexpr bool valid_layout() {
  constexpr int tpr = kFlashThreads / T;
  return kFlashThreads % T == 0 && tpr <= 32 && 32 % tpr == 0 && T % tpr == 0 && D % tpr == 0;
}

// The key / query tile count for seq rows (blocks along grid y).
inline i64 tiles_for(i64 seq, int tile) {
  return (seq + tile - 1) / tile;
}

// ---- device helpers ----------------------------------------------------------------------

// Rows [row0, row0 + T) of one head into tile[T][D + 1]: src points at row 0, column 0 of the
// head, rows ld floats apart. Rows >= seq and columns >= head_dim are stored as zeros.
// Consecutive threads read consecutive columns (coalesced).
template <int T, int D>
__device__ void load_tile(float (*tile)[D + 1], const float* __restrict__ src, i64 ld, int row0,
                          int seq, int head_dim) {
  for (int idx = threadIdx.x; idx < T * D; idx += kFlashThreads) {
    const int r = idx / D, col = idx % D;
    const int row = row0 + r;
    tile[r][col] = row < seq && col < head_dim ? src[static_cast<i64>(row) * ld + col] : 0.0f;
  }
}

// Per-row values (lse, delta) of rows [row0, row0 + T); 0 past seq (those rows are masked).
template <int T>
__device__ void load_rows(float* dst, const float* __restrict__ src, int row0, int seq) {
  for (int r = threadIdx.x; r < T; r += kFlashThreads)
    dst[r] = row0 + r < seq ? src[row0 + r] : 0.0f;
}

// a . b over D columns, one fmaf chain in column order. Forward and both backward kernels
// compute every score with it (fmaf is symmetric in its factors), so the scores backward
// recomputes have the forward's exact bits.
template <int D>
__device__ inline float dot_row(const float* a, const float* b) {
  float s = 0.0f;
#pragma unroll 8
  for (int col = 0; col < D; ++col) s = fmaf(a[col], b[col], s);
  return s;
}

// Max / sum over the G consecutive lanes of a row group (G divides 32; every lane of the warp
// must call it). The xor butterfly leaves identical bits on all G lanes.
template <int G>
__device__ inline float group_max(float v) {
  for (int o = G / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <int G>
__device__ inline float group_sum(float v) {
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- forward -------------------------------------------------------------------------------

// grid (batch * n_head, query tiles). out [batch, seq, n_head head_dim], lse [batch * n_head,
// seq], qkv [batch, seq, (n_head + 2 n_kv_head) head_dim].
template <int D>
__global__ void __launch_bounds__(kFlashThreads, kMinBlocksPerSm)
    flash_forward_kernel(float* __restrict__ out, __nv_bfloat16* __restrict__ out16,
                         float* __restrict__ lse, const float* __restrict__ qkv, int seq,
                         int n_head, int n_kv_head, int head_dim, float scale) {
  constexpr int T = FlashTiles<D>::kForward;
  constexpr int TPR = kFlashThreads / T;  // threads per query row
  constexpr int KPT = T / TPR;            // keys of a tile scored per thread
  constexpr int CPT = D / TPR;            // output columns per thread
  static_assert(valid_layout<T, D>(), "flash forward: bad tile layout");
  static_assert(forward_smem_bytes<T, D>() <= kStaticSmemBytes, "flash forward: over 48 KiB");

  __shared__ float q_s[T][D + 1];
  __shared__ float kv_s[T][D + 1];  // the key tile's K, then its V (one buffer: smem budget)
  __shared__ float p_s[T][T + 1];   // unnormalised probabilities of the tile

  const int bh = blockIdx.x;
  const int b = bh / n_head, h = bh % n_head;
  // The last query tiles see the most keys: launch them first (better tail balance).
  const int qt = static_cast<int>(gridDim.y) - 1 - static_cast<int>(blockIdx.y);
  const int q0 = qt * T;
  const i64 d = static_cast<i64>(n_head) * head_dim;
  const i64 kv = static_cast<i64>(n_kv_head) * head_dim;
  const i64 ld = d + 2 * kv;
  const float* row0 = qkv + static_cast<i64>(b) * seq * ld;
  const float* q_g = row0 + static_cast<i64>(h) * head_dim;
  const i64 kv_off = static_cast<i64>(h / (n_head / n_kv_head)) * head_dim;  // K/V head h / g
  const float* k_g = row0 + d + kv_off;
  const float* v_g = row0 + d + kv + kv_off;
  const int r = threadIdx.x / TPR, c = threadIdx.x % TPR;
  const int i = q0 + r;  // this thread's query position (>= seq: padding, computed, not stored)

  load_tile<T, D>(q_s, q_g, ld, q0, seq, head_dim);
  float m = -INFINITY;  // running max of the row's scores
  float l = 0.0f;       // running sum of exp(score - m)
  float acc[CPT];       // running sum of exp(score - m) v, columns c + t TPR
#pragma unroll
  for (int t = 0; t < CPT; ++t) acc[t] = 0.0f;

  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * T;
    __syncthreads();  // the previous tile's P V is done with kv_s and p_s
    load_tile<T, D>(kv_s, k_g, ld, k0, seq, head_dim);
    __syncthreads();

    float s[KPT];
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < KPT; ++u) {
      const int jj = c + u * TPR, j = k0 + jj;
      s[u] = j <= i && j < seq ? scale * dot_row<D>(q_s[r], kv_s[jj]) : -INFINITY;
      tile_max = fmaxf(tile_max, s[u]);
    }
    tile_max = group_max<TPR>(tile_max);
    // Finite from the first tile on: key 0 is in it and unmasked for every row (i >= 0).
    const float m_new = fmaxf(m, tile_max);
    const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf, acc = l = 0)
    float psum = 0.0f;
#pragma unroll
    for (int u = 0; u < KPT; ++u) {
      const float p = expf(s[u] - m_new);  // masked: exp(-inf) = 0
      p_s[r][c + u * TPR] = p;
      psum += p;
    }
    psum = group_sum<TPR>(psum);
    l = l * alpha + psum;
    m = m_new;
#pragma unroll
    for (int t = 0; t < CPT; ++t) acc[t] *= alpha;

    __syncthreads();  // every thread is done reading K; p_s is complete
    load_tile<T, D>(kv_s, v_g, ld, k0, seq, head_dim);
    __syncthreads();
    for (int jj = 0; jj < T; ++jj) {
      const float p = p_s[r][jj];
#pragma unroll
      for (int t = 0; t < CPT; ++t) acc[t] = fmaf(p, kv_s[jj][c + t * TPR], acc[t]);
    }
  }

  if (i < seq) {
    const float inv = __frcp_rn(l);  // 1 / l correctly rounded (no slow-path call)
    const i64 o = (static_cast<i64>(b) * seq + i) * d + static_cast<i64>(h) * head_dim;
#pragma unroll
    for (int t = 0; t < CPT; ++t) {
      const int col = c + t * TPR;
      if (col < head_dim) {
        const float y = acc[t] * inv;
        out[o + col] = y;
        if (out16 != nullptr) out16[o + col] = __float2bfloat16(y);  // round to nearest even
      }
    }
    if (c == 0) lse[static_cast<i64>(bh) * seq + i] = m + logf(l);
  }
}

// ---- backward ------------------------------------------------------------------------------

// delta [rows = batch * n_head * seq] (rows in [b, h, i] order): dout_i . out_i over the
// head's columns. One warp per row; a warp-uniform early exit keeps warp_sum's full mask valid.
// out fp32, or bf16 (the tensor-core forward's only output in a bf16 model); dout fp32, or
// bf16 (a bf16 GEMM's din, read by the tensor-core backward).
__device__ inline float load_out(const float* p) {
  return *p;
}
__device__ inline float load_out(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename OutT, typename DoutT>
__global__ void flash_row_dot_kernel(float* __restrict__ delta, const DoutT* __restrict__ dout,
                                     const OutT* __restrict__ out, i64 rows, int seq, int n_head,
                                     int head_dim) {
  constexpr int kWarps = kFlashThreads / 32;
  const i64 row = static_cast<i64>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const i64 bh = row / seq;
  const i64 i = row % seq;
  const i64 b = bh / n_head, h = bh % n_head;
  const i64 d = static_cast<i64>(n_head) * head_dim;
  const i64 off = (b * seq + i) * d + h * head_dim;
  float s = 0.0f;
  for (int col = lane; col < head_dim; col += 32)
    s = fmaf(load_out(dout + off + col), load_out(out + off + col), s);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// grid (batch * n_kv_head, key tiles). dK and dV of the block's key tile of one K/V head,
// summed over the query heads of its group (in order) and, for each, over the query tiles at
// or after the key tile (earlier queries cannot see these keys), then added into dqkv (or
// stored, with assign).
template <int D>
__global__ void __launch_bounds__(kFlashThreads, kMinBlocksPerSm)
    flash_backward_dkdv_kernel(float* __restrict__ dqkv, const float* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const float* __restrict__ qkv, int seq, int n_head, int n_kv_head,
                               int head_dim, float scale, bool assign) {
  constexpr int T = FlashTiles<D>::kBackward;
  constexpr int TPR = kFlashThreads / T;  // threads per key row
  constexpr int QPT = T / TPR;            // queries of a tile scored per thread
  constexpr int CPT = D / TPR;            // dK / dV columns per thread
  static_assert(valid_layout<T, D>(), "flash dK/dV: bad tile layout");
  static_assert(backward_smem_bytes<T, D>() <= kStaticSmemBytes, "flash dK/dV: over 48 KiB");

  __shared__ float k_s[T][D + 1];
  __shared__ float v_s[T][D + 1];
  __shared__ float q_s[T][D + 1];
  __shared__ float do_s[T][D + 1];
  __shared__ float p_s[T][T + 1];   // [key][query]: P_ij
  __shared__ float ds_s[T][T + 1];  // [key][query]: dS_ij
  __shared__ float lse_s[T];
  __shared__ float delta_s[T];

  const int bkv = blockIdx.x;
  const int b = bkv / n_kv_head, kh = bkv % n_kv_head;
  const int group = n_head / n_kv_head;
  const int n_tiles = static_cast<int>(gridDim.y);
  const int kt = static_cast<int>(blockIdx.y);  // the first key tiles loop longest: first
  const int k0 = kt * T;
  const i64 d = static_cast<i64>(n_head) * head_dim;
  const i64 kv = static_cast<i64>(n_kv_head) * head_dim;
  const i64 ld = d + 2 * kv;
  const i64 kv_off = static_cast<i64>(kh) * head_dim;
  const float* row0 = qkv + static_cast<i64>(b) * seq * ld;
  const int r = threadIdx.x / TPR, c = threadIdx.x % TPR;
  const int j = k0 + r;  // this thread's key position

  load_tile<T, D>(k_s, row0 + d + kv_off, ld, k0, seq, head_dim);
  load_tile<T, D>(v_s, row0 + d + kv + kv_off, ld, k0, seq, head_dim);
  float dk[CPT], dv[CPT];
#pragma unroll
  for (int t = 0; t < CPT; ++t) dk[t] = dv[t] = 0.0f;

  // (query head of the group, query tile) pairs in one flat loop, heads outer, h and qt
  // advancing like a two-digit counter. (Nested loops, or h and qt from step by division,
  // made ptxas spill at 64 registers.)
  const int steps = group * (n_tiles - kt);
  int h = kh * group, qt = kt;
  for (int step = 0; step < steps; ++step) {
    const int q0 = qt * T;
    const i64 head_off = static_cast<i64>(h) * head_dim;
    const i64 bh = static_cast<i64>(b) * n_head + h;
    __syncthreads();  // the previous query tile is done with q_s, do_s, p_s, ds_s
    load_tile<T, D>(q_s, row0 + head_off, ld, q0, seq, head_dim);
    load_tile<T, D>(do_s, dout + static_cast<i64>(b) * seq * d + head_off, d, q0, seq, head_dim);
    load_rows<T>(lse_s, lse + bh * seq, q0, seq);
    load_rows<T>(delta_s, delta + bh * seq, q0, seq);
    __syncthreads();

#pragma unroll
    for (int u = 0; u < QPT; ++u) {
      const int ii = c + u * TPR, i = q0 + ii;
      float p = 0.0f, ds = 0.0f;
      if (j <= i && i < seq) {  // causal (and j < seq follows)
        const float s = scale * dot_row<D>(k_s[r], q_s[ii]);
        p = expf(s - lse_s[ii]);
        const float dp = dot_row<D>(v_s[r], do_s[ii]);
        ds = p * (dp - delta_s[ii]);
      }
      p_s[r][ii] = p;
      ds_s[r][ii] = ds;
    }
    __syncthreads();
    for (int ii = 0; ii < T; ++ii) {
      const float p = p_s[r][ii], ds = ds_s[r][ii];
#pragma unroll
      for (int t = 0; t < CPT; ++t) {
        const int col = c + t * TPR;
        dv[t] = fmaf(p, do_s[ii][col], dv[t]);
        dk[t] = fmaf(ds, q_s[ii][col], dk[t]);
      }
    }
    if (++qt == n_tiles) {  // this head's last query tile: the group's next head
      qt = kt;
      ++h;
    }
  }

  if (j < seq) {
    // One thread per element of this K/V head's rows: a plain read-modify-write, no race.
    float* dk_g = dqkv + (static_cast<i64>(b) * seq + j) * ld + d + kv_off;
    float* dv_g = dk_g + kv;
#pragma unroll
    for (int t = 0; t < CPT; ++t) {
      const int col = c + t * TPR;
      if (col < head_dim) {
        // Stored without a read with assign: the first writer of dqkv needs no zeroing pass.
        if (assign) {
          dk_g[col] = scale * dk[t];
          dv_g[col] = dv[t];
        } else {
          dk_g[col] += scale * dk[t];
          dv_g[col] += dv[t];
        }
      }
    }
  }
}

// grid (batch * n_head, query tiles). dQ of the block's query tile, summed over the key tiles
// at or before it, then added into dqkv (or stored, with assign).
template <int D>
__global__ void __launch_bounds__(kFlashThreads, kMinBlocksPerSm)
    flash_backward_dq_kernel(float* __restrict__ dqkv, const float* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             const float* __restrict__ qkv, int seq, int n_head, int n_kv_head,
                             int head_dim, float scale, bool assign) {
  constexpr int T = FlashTiles<D>::kBackward;
  constexpr int TPR = kFlashThreads / T;  // threads per query row
  constexpr int KPT = T / TPR;            // keys of a tile scored per thread
  constexpr int CPT = D / TPR;            // dQ columns per thread
  static_assert(valid_layout<T, D>(), "flash dQ: bad tile layout");
  static_assert(backward_smem_bytes<T, D>() <= kStaticSmemBytes, "flash dQ: over 48 KiB");

  __shared__ float q_s[T][D + 1];
  __shared__ float do_s[T][D + 1];
  __shared__ float k_s[T][D + 1];
  __shared__ float v_s[T][D + 1];
  __shared__ float ds_s[T][T + 1];  // [query][key]: dS_ij
  __shared__ float lse_s[T];
  __shared__ float delta_s[T];

  const int bh = blockIdx.x;
  const int b = bh / n_head, h = bh % n_head;
  const int qt = static_cast<int>(gridDim.y) - 1 - static_cast<int>(blockIdx.y);  // longest first
  const int q0 = qt * T;
  const i64 d = static_cast<i64>(n_head) * head_dim;
  const i64 kv = static_cast<i64>(n_kv_head) * head_dim;
  const i64 ld = d + 2 * kv;
  const i64 head_off = static_cast<i64>(h) * head_dim;
  const i64 kv_off = static_cast<i64>(h / (n_head / n_kv_head)) * head_dim;  // K/V head h / g
  const float* row0 = qkv + static_cast<i64>(b) * seq * ld;
  const float* q_g = row0 + head_off;
  const float* k_g = row0 + d + kv_off;
  const float* v_g = row0 + d + kv + kv_off;
  const float* do_g = dout + static_cast<i64>(b) * seq * d + head_off;
  const int r = threadIdx.x / TPR, c = threadIdx.x % TPR;
  const int i = q0 + r;  // this thread's query position

  load_tile<T, D>(q_s, q_g, ld, q0, seq, head_dim);
  load_tile<T, D>(do_s, do_g, d, q0, seq, head_dim);
  load_rows<T>(lse_s, lse + static_cast<i64>(bh) * seq, q0, seq);
  load_rows<T>(delta_s, delta + static_cast<i64>(bh) * seq, q0, seq);
  float dq[CPT];
#pragma unroll
  for (int t = 0; t < CPT; ++t) dq[t] = 0.0f;

  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * T;
    __syncthreads();  // the previous key tile is done with k_s, v_s, ds_s
    load_tile<T, D>(k_s, k_g, ld, k0, seq, head_dim);
    load_tile<T, D>(v_s, v_g, ld, k0, seq, head_dim);
    __syncthreads();

#pragma unroll
    for (int u = 0; u < KPT; ++u) {
      const int jj = c + u * TPR, j = k0 + jj;
      float ds = 0.0f;
      if (j <= i && i < seq) {
        const float s = scale * dot_row<D>(k_s[jj], q_s[r]);
        const float p = expf(s - lse_s[r]);
        const float dp = dot_row<D>(v_s[jj], do_s[r]);
        ds = p * (dp - delta_s[r]);
      }
      ds_s[r][jj] = ds;
    }
    __syncthreads();
    for (int jj = 0; jj < T; ++jj) {
      const float ds = ds_s[r][jj];
#pragma unroll
      for (int t = 0; t < CPT; ++t) dq[t] = fmaf(ds, k_s[jj][c + t * TPR], dq[t]);
    }
  }

  if (i < seq) {
    float* dq_g = dqkv + (static_cast<i64>(b) * seq + i) * ld + head_off;
#pragma unroll
    for (int t = 0; t < CPT; ++t) {
      const int col = c + t * TPR;
      if (col < head_dim) {
        if (assign)
          dq_g[col] = scale * dq[t];
        else
          dq_g[col] += scale * dq[t];
      }
    }
  }
}

// ---- host side -----------------------------------------------------------------------------

template <int D>
void launch_forward(Context& ctx, float* out, void* out16, float* lse, const float* qkv,
                    const FlashArgs& a) {
  constexpr int T = FlashTiles<D>::kForward;
  const dim3 grid(static_cast<unsigned>(a.bh), static_cast<unsigned>(tiles_for(a.seq, T)));
  flash_forward_kernel<D><<<grid, kFlashThreads, 0, stream_of(ctx)>>>(
      out, static_cast<__nv_bfloat16*>(out16), lse, qkv, a.seq, a.n_head, a.n_kv_head, a.head_dim,
      a.scale);
  PION_CUDA_CHECK_LAUNCH("flash_forward_kernel");
}

template <int D>
void launch_backward(Context& ctx, float* dqkv, const float* delta, const float* dout,
                     const float* lse, const float* qkv, const FlashArgs& a, bool assign) {
  constexpr int T = FlashTiles<D>::kBackward;
  const unsigned tiles = static_cast<unsigned>(tiles_for(a.seq, T));
  const dim3 kv_grid(static_cast<unsigned>(a.bkv), tiles);  // one block per K/V head's key tile
  const dim3 q_grid(static_cast<unsigned>(a.bh), tiles);    // one block per query tile
  // dK / dV and dQ write disjoint parts of dqkv; both only read delta, lse, qkv and dout.
  flash_backward_dkdv_kernel<D><<<kv_grid, kFlashThreads, 0, stream_of(ctx)>>>(
      dqkv, dout, lse, delta, qkv, a.seq, a.n_head, a.n_kv_head, a.head_dim, a.scale, assign);
  PION_CUDA_CHECK_LAUNCH("flash_backward_dkdv_kernel");
  flash_backward_dq_kernel<D><<<q_grid, kFlashThreads, 0, stream_of(ctx)>>>(
      dqkv, dout, lse, delta, qkv, a.seq, a.n_head, a.n_kv_head, a.head_dim, a.scale, assign);
  PION_CUDA_CHECK_LAUNCH("flash_backward_dq_kernel");
}

std::size_t rows_of(i64 batch, i64 seq, i64 n_head, const char* who) {
  require(batch >= 0 && seq >= 0 && n_head >= 0, who,
          "batch, seq and n_head must be >= 0 (got " + std::to_string(batch) + ", " +
              std::to_string(seq) + ", " + std::to_string(n_head) + ")");
  return static_cast<std::size_t>(batch) * static_cast<std::size_t>(n_head) *
         static_cast<std::size_t>(seq);
}

}  // namespace

namespace flash {

int columns_for(i64 head_dim) {
  return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : 128;
}

i64 check_flash(i64 batch, i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head,
                const std::string& who) {
  require_positive(batch, who, "batch");
  require_positive(seq, who, "seq");
  require_positive(n_head, who, "n_head");
  require(n_kv_head >= 0, who,
          "n_kv_head must be >= 0 (0: n_head), got " + std::to_string(n_kv_head));
  if (n_kv_head == 0) n_kv_head = n_head;
  require(n_head % n_kv_head == 0, who,
          "n_kv_head (" + std::to_string(n_kv_head) + ") must divide n_head (" +
              std::to_string(n_head) + ")");
  require_positive(head_dim, who, "head_dim");
  require(head_dim <= kMaxHeadDim, who,
          "head_dim = " + std::to_string(head_dim) + " is not supported (at most " +
              std::to_string(kMaxHeadDim) + ")");
  as_int(batch, who, "batch");
  as_int(n_head, who, "n_head");
  as_int(seq, who, "seq");
  as_int(batch * n_head, who, "batch * n_head (grid x)");
  // Tiles go along grid y (at most 65535); the smallest tile (16) is the binding one.
  const i64 max_tiles = 65535;
  require(tiles_for(seq, FlashTiles<kMaxHeadDim>::kBackward) <= max_tiles, who,
          "seq = " + std::to_string(seq) + " is too long (at most " +
              std::to_string(max_tiles * FlashTiles<kMaxHeadDim>::kBackward) + ")");
  return n_kv_head;
}

FlashArgs flash_args(i64 batch, i64 seq, i64 n_head, i64 n_kv_head, i64 head_dim) {
  return {static_cast<int>(batch * n_head),
          static_cast<int>(batch * n_kv_head),
          static_cast<int>(seq),
          static_cast<int>(n_head),
          static_cast<int>(n_kv_head),
          static_cast<int>(head_dim),
          1.0f / std::sqrt(static_cast<float>(head_dim))};
}

template <typename OutT, typename DoutT>
void launch_row_dot_as(Context& ctx, unsigned blocks, float* delta, const DoutT* dout,
                       const OutT* out, i64 rows, const FlashArgs& a) {
  flash_row_dot_kernel<OutT, DoutT><<<blocks, kFlashThreads, 0, stream_of(ctx)>>>(
      delta, dout, out, rows, a.seq, a.n_head, a.head_dim);
}

void launch_row_dot(Context& ctx, float* delta, const float* dout, const float* out,
                    const void* out_bf16, const FlashArgs& a, i64 batch, const std::string& who,
                    const void* dout_bf16) {
  const i64 rows = batch * a.n_head * a.seq;
  constexpr int kRowsPerBlock = kFlashThreads / 32;  // one warp per row
  const auto blocks = static_cast<unsigned>(as_int((rows + kRowsPerBlock - 1) / kRowsPerBlock, who,
                                                   "batch * n_head * seq / 8 (row-dot "
                                                   "blocks)"));
  const auto* out16 = static_cast<const __nv_bfloat16*>(out_bf16);
  const auto* dout16 = static_cast<const __nv_bfloat16*>(dout_bf16);
  if (out != nullptr && dout16 == nullptr)
    launch_row_dot_as(ctx, blocks, delta, dout, out, rows, a);
  else if (out != nullptr)
    launch_row_dot_as(ctx, blocks, delta, dout16, out, rows, a);
  else if (dout16 == nullptr)
    launch_row_dot_as(ctx, blocks, delta, dout, out16, rows, a);
  else
    launch_row_dot_as(ctx, blocks, delta, dout16, out16, rows, a);
  PION_CUDA_CHECK_LAUNCH("flash_row_dot_kernel");
}

}  // namespace flash

std::size_t flash_attention_lse_elements(i64 batch, i64 seq, i64 n_head) {
  return rows_of(batch, seq, n_head, "flash_attention_lse_elements");
}

std::size_t flash_attention_scratch_elements(i64 batch, i64 seq, i64 n_head) {
  return rows_of(batch, seq, n_head, "flash_attention_scratch_elements");
}

void flash_attention_forward(Context& ctx, float* out, float* lse, const float* qkv, i64 batch,
                             i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head, void* out_bf16) {
  const std::string who = "flash_attention_forward";
  n_kv_head = check_flash(batch, seq, n_head, head_dim, n_kv_head, who);
  require(out != nullptr && lse != nullptr && qkv != nullptr, who,
          "out, lse and qkv must not be null");
  const FlashArgs a = flash_args(batch, seq, n_head, n_kv_head, head_dim);
  with_columns(head_dim, [&](auto D) {
    launch_forward<decltype(D)::value>(ctx, out, out_bf16, lse, qkv, a);
  });
}

void flash_attention_backward(Context& ctx, float* dqkv, float* scratch, const float* dout,
                              const float* out, const float* lse, const float* qkv, i64 batch,
                              i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head,
                              GradWrite dqkv_write) {
  const std::string who = "flash_attention_backward";
  n_kv_head = check_flash(batch, seq, n_head, head_dim, n_kv_head, who);
  require(dqkv != nullptr && scratch != nullptr && dout != nullptr && out != nullptr &&
              lse != nullptr && qkv != nullptr,
          who, "dqkv, scratch, dout, out, lse and qkv must not be null");
  const FlashArgs a = flash_args(batch, seq, n_head, n_kv_head, head_dim);

  launch_row_dot(ctx, scratch, dout, out, nullptr, a, batch, who);
  // The dK/dV and dQ kernels together write every element of dqkv once.
  const bool assign = dqkv_write == GradWrite::Assign;
  with_columns(head_dim, [&](auto D) {
    launch_backward<decltype(D)::value>(ctx, dqkv, scratch, dout, lse, qkv, a, assign);
  });
}

}  // namespace pion::cuda::layers
