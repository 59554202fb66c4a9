// Fused causal attention on bf16 tensor cores, forward (include/pion/cuda/flash_attention.h):
// the fp32 kernel's online softmax (flash_attention.cu) with its two products, S = Q K^T and
// O += P V, on tensor cores through nvcuda::wmma 16 x 16 x 16 tiles (bf16 operands, fp32
// accumulation).
//
// One block of kWarps warps per (query tile of kRows rows, batch * head); warp w owns query
// rows [16 w, 16 w + 16) of the tile. Per key tile of kKeys keys at or before the diagonal:
//   1. K's tile, rounded to bf16, into shared memory; each warp S = Q K^T for its rows into
//      its fp32 score tile.
//   2. After a barrier, V's tile into the same buffer, while each warp runs the online softmax
//      over its score rows (two lanes per row, in fp32): the running max m and sum l, the
//      probabilities rounded to bf16 into its P tile, and its O rows rescaled by
//      exp(m_old - m_new).
//   3. Each warp O += P V. O stays fp32 in shared memory, since the rescale needs rows and a
//      fragment does not say which of its elements belong to which row.
// At the end out = O / l (fp32, and bf16 when asked) and lse = m + log l, as the fp32 kernel
// writes them.
//
// Backward (FlashAttention-2 style, as the fp32 kernels: P recomputed from lse, no atomics, every
// sum in a fixed order), after the fp32 row dots delta_i = dout_i . out_i:
//   dK / dV: one block per (key tile, batch * K/V head), warp w owning 16 keys, looping over the
//     group's query heads and the query tiles at or after the key tile: S^T = K Q^T, P^T =
//     exp(scale S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta); dV += P^T dO and
//     dK += dS^T Q (P^T and dS^T rounded to bf16 for the products), dK scaled at the end.
//   dQ: one block per (query tile, batch * head), warp w owning 16 rows, looping over the key
//     tiles up to the diagonal: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// Q, K, V and dO are rounded to bf16 on their way into shared memory (or read as they are when
// they come in bf16: a bf16 model's qkv and attention-output gradient are bf16 GEMM outputs);
// the accumulators live in shared memory in fp32 as O does in the forward.
//
// Shared memory (dynamic; 93 KiB at D = 128, 61 KiB at D = 64): Q and K-then-V in bf16, and
// per warp a 16 x kKeys fp32 score tile, a 16 x kKeys bf16 P tile and its 16 x D fp32 O rows.
// Rows are padded so that every wmma pointer is 32-byte aligned and every ldm a multiple of 8
// (bf16) or 4 (fp32) elements, as wmma requires; the padding also spreads rows over banks.
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "flash_common.cuh"
#include "pion/cuda/flash_attention.h"

namespace pion::cuda::layers {

using namespace detail;
using namespace flash;

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // query rows per block
constexpr int kKeys = 64;           // keys per tile

template <int D>
struct TcLayout {
  static constexpr int kLdQ = D + 8;      // bf16 rows of Q and of K / V
  static constexpr int kLdS = kKeys + 4;  // fp32 score rows
  static constexpr int kLdP = kKeys + 8;  // bf16 probability rows
  static constexpr int kLdO = D + 4;      // fp32 output rows
  static constexpr int kQBytes = kRows * kLdQ * 2;
  static constexpr int kKvBytes = kKeys * kLdQ * 2;
  static constexpr int kSBytes = kWarps * 16 * kLdS * 4;
  static constexpr int kPBytes = kWarps * 16 * kLdP * 2;
  static constexpr int kOBytes = kWarps * 16 * kLdO * 4;
  static constexpr int kBytes = kQBytes + kKvBytes + kSBytes + kPBytes + kOBytes;
  static_assert(kQBytes % 32 == 0 && kKvBytes % 32 == 0 && kSBytes % 32 == 0 && kPBytes % 32 == 0 &&
                    (16 * kLdS * 4) % 32 == 0 && (16 * kLdP * 2) % 32 == 0 &&
                    (16 * kLdO * 4) % 32 == 0 && (16 * kLdQ * 2) % 32 == 0,
                "flash tc: every wmma tile must start 32-byte aligned");
};

// An input element as a bf16 operand: fp32 rounded to nearest even, bf16 as it is.
__device__ inline __nv_bfloat16 as_bf16(float v) {
  return __float2bfloat16(v);
}
__device__ inline __nv_bfloat16 as_bf16(__nv_bfloat16 v) {
  return v;
}

// Rows [row0, row0 + rows) of one head, as bf16, into tile (rows ld elements apart in src, kLdQ
// apart in the tile); rows >= seq and columns >= head_dim are zeros. T: float or __nv_bfloat16.
template <int D, typename T>
__device__ void load_tile_bf16(__nv_bfloat16* tile, const T* __restrict__ src, i64 ld, int rows,
                               int row0, int seq, int head_dim) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, col = idx % D;
    const int row = row0 + r;
    tile[r * TcLayout<D>::kLdQ + col] = row < seq && col < head_dim
                                            ? as_bf16(src[static_cast<i64>(row) * ld + col])
                                            : __float2bfloat16(0.0f);
  }
}

// Per-row values (lse, delta) of rows [row0, row0 + kRows) into dst; 0 past seq.
__device__ void load_rows_tc(float* dst, const float* __restrict__ src, int row0, int seq) {
  for (int r = threadIdx.x; r < kRows; r += blockDim.x)
    dst[r] = row0 + r < seq ? src[row0 + r] : 0.0f;
}

// One warp: C [16 x N] (fp32, row-major, ldc) = (accumulate ? C : 0) + A [16 x K] B [K x N].
// A is bf16 row-major (lda); B is bf16 with element (k, n) at b[k ldb + n] (row_major) or at
// b[n ldb + k] (col_major: B^T stored row-major, e.g. K's rows for Q K^T). K, N multiples of 16.
template <typename LayoutB, int K, int N>
__device__ void warp_mma(float* c, int ldc, bool accumulate, const __nv_bfloat16* a, int lda,
                         const __nv_bfloat16* b, int ldb) {
  for (int n = 0; n < N; n += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate)
      wmma::load_matrix_sync(acc, c + n, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB> fb;
      wmma::load_matrix_sync(fa, a + k, lda);
      if constexpr (std::is_same_v<LayoutB, wmma::row_major>)
        wmma::load_matrix_sync(fb, b + k * ldb + n, ldb);
      else
        wmma::load_matrix_sync(fb, b + n * ldb + k, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n, acc, ldc, wmma::mem_row_major);
  }
}

// The (batch, head, query tile) a forward or dQ block works on, and where it reads qkv:
// blockIdx.x = b * n_head + h; blockIdx.y counts query tiles from the last, since the last
// tiles see the most keys and launching them first balances the tail.
template <typename T>
struct QueryTileBlock {
  int bh, b, h, q0;
  i64 d, kv, ld;  // widths of Q and of K (= V), and the qkv row stride
  const T* row0;  // batch b's first qkv row
  i64 kv_off;     // column of head h's K/V head (h / group size) within K and V
};

template <typename T>
__device__ inline QueryTileBlock<T> query_tile_block(const T* qkv, int seq, int n_head,
                                                     int n_kv_head, int head_dim) {
  QueryTileBlock<T> t;
  t.bh = static_cast<int>(blockIdx.x);
  t.b = t.bh / n_head;
  t.h = t.bh % n_head;
  t.q0 = (static_cast<int>(gridDim.y) - 1 - static_cast<int>(blockIdx.y)) * kRows;
  t.d = static_cast<i64>(n_head) * head_dim;
  t.kv = static_cast<i64>(n_kv_head) * head_dim;
  t.ld = t.d + 2 * t.kv;
  t.row0 = qkv + static_cast<i64>(t.b) * seq * t.ld;
  t.kv_off = static_cast<i64>(t.h / (n_head / n_kv_head)) * head_dim;
  return t;
}

// grid (batch * n_head, query tiles). out [batch, seq, n_head head_dim], lse [batch * n_head,
// seq], qkv [batch, seq, (n_head + 2 n_kv_head) head_dim] in T (float or __nv_bfloat16).
template <int D, typename T>
__global__ void __launch_bounds__(kThreads)
    flash_forward_tc_kernel(float* __restrict__ out, __nv_bfloat16* __restrict__ out16,
                            float* __restrict__ lse, const T* __restrict__ qkv, int seq, int n_head,
                            int n_kv_head, int head_dim, float scale) {
  using L = TcLayout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem);
  auto* kv_s = reinterpret_cast<__nv_bfloat16*>(smem + L::kQBytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto* s_w = reinterpret_cast<float*>(smem + L::kQBytes + L::kKvBytes) + warp * 16 * L::kLdS;
  auto* p_w = reinterpret_cast<__nv_bfloat16*>(smem + L::kQBytes + L::kKvBytes + L::kSBytes) +
              warp * 16 * L::kLdP;
  auto* o_w = reinterpret_cast<float*>(smem + L::kQBytes + L::kKvBytes + L::kSBytes + L::kPBytes) +
              warp * 16 * L::kLdO;

  const auto [bh, b, h, q0, d, kv, ld, row0, kv_off] =
      query_tile_block(qkv, seq, n_head, n_kv_head, head_dim);
  const T* k_g = row0 + d + kv_off;
  const T* v_g = row0 + d + kv + kv_off;

  load_tile_bf16<D>(q_s, row0 + static_cast<i64>(h) * head_dim, ld, kRows, q0, seq, head_dim);
  // This lane's row of the warp's 16 and its half of the columns (two lanes per row).
  const int r = lane / 2, half = lane % 2;
  const int i = q0 + 16 * warp + r;  // its query position (>= seq: padding, not stored)
  for (int c = half; c < D; c += 2) o_w[r * L::kLdO + c] = 0.0f;
  float m = -INFINITY, l = 0.0f;

  const int last_key = (q0 + kRows < seq ? q0 + kRows : seq) - 1;  // the last key the tile sees
  for (int k0 = 0; k0 <= last_key; k0 += kKeys) {
    __syncthreads();  // the previous tile's P V is done with kv_s (and Q is loaded)
    load_tile_bf16<D>(kv_s, k_g, ld, kKeys, k0, seq, head_dim);
    __syncthreads();
    // S = Q K^T for this warp's 16 rows (K's rows read column-major are K^T).
    warp_mma<wmma::col_major, D, kKeys>(s_w, L::kLdS, false, q_s + (16 * warp) * L::kLdQ, L::kLdQ,
                                        kv_s, L::kLdQ);
    __syncthreads();  // every warp is done reading K
    load_tile_bf16<D>(kv_s, v_g, ld, kKeys, k0, seq, head_dim);

    // Online softmax over this lane's half of row r (its scores were stored by its own warp).
    __syncwarp();
    float tile_max = -INFINITY;
    for (int jj = half * (kKeys / 2); jj < (half + 1) * (kKeys / 2); ++jj) {
      const int j = k0 + jj;
      const float s = j <= i && j < seq ? scale * s_w[r * L::kLdS + jj] : -INFINITY;
      s_w[r * L::kLdS + jj] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    // Finite from the first tile on: key 0 is unmasked for every row (padding rows included).
    const float m_new = fmaxf(m, tile_max);
    const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf, O = l = 0)
    float psum = 0.0f;
    for (int jj = half * (kKeys / 2); jj < (half + 1) * (kKeys / 2); ++jj) {
      const float p = expf(s_w[r * L::kLdS + jj] - m_new);  // masked: exp(-inf) = 0
      psum += p;
      p_w[r * L::kLdP + jj] = __float2bfloat16(p);
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    l = alpha * l + psum;
    m = m_new;
    for (int c = half; c < D; c += 2) o_w[r * L::kLdO + c] *= alpha;
    __syncthreads();  // V is loaded; this warp's P and O rows are written

    warp_mma<wmma::row_major, kKeys, D>(o_w, L::kLdO, true, p_w, L::kLdP, kv_s,
                                        L::kLdQ);  // O += P V
  }

  __syncwarp();  // the last P V's stores of O are visible to the lanes that read them
  if (i >= seq) return;
  const float inv_l = 1.0f / l;
  const i64 out_row = (static_cast<i64>(b) * seq + i) * d + static_cast<i64>(h) * head_dim;
  for (int c = half; c < head_dim; c += 2) {
    const float v = o_w[r * L::kLdO + c] * inv_l;
    if (out != nullptr) out[out_row + c] = v;
    if (out16 != nullptr) out16[out_row + c] = __float2bfloat16(v);
  }
  if (half == 0) lse[static_cast<i64>(bh) * seq + i] = m + logf(l);
}

// Backward's layouts. dK / dV: kDkdvWarps warps of 16 keys (2 at D = 128, to fit an A100's
// 163 KiB of shared memory as well as an H100's 227), query tiles of kRows. dQ: kWarps warps of
// 16 query rows, key tiles of kKeys (= kRows).
template <int D>
struct TcBackward {
  using L = TcLayout<D>;
  static constexpr int kDkdvWarps = D <= 64 ? 4 : 2;
  static constexpr int kKeyTile = 16 * kDkdvWarps;
  static constexpr int kWarpScore = 16 * L::kLdS * 4;  // a warp's fp32 16 x 64 tile
  static constexpr int kWarpBf16 = 16 * L::kLdP * 2;   // a warp's bf16 16 x 64 tile
  static constexpr int kWarpAcc = 16 * L::kLdO * 4;    // a warp's fp32 16 x D accumulator
  static constexpr int kTile = kRows * L::kLdQ * 2;    // a bf16 64 x D tile
  // k_s, v_s (kKeyTile rows), q_s, do_s, lse_s, delta_s; per warp: P^T and dP^T (fp32), P^T and
  // dS^T (bf16), dK and dV.
  static constexpr int kDkdvBytes = 2 * kKeyTile * L::kLdQ * 2 + 2 * kTile + 2 * kRows * 4 +
                                    kDkdvWarps * (2 * kWarpScore + 2 * kWarpBf16 + 2 * kWarpAcc);
  // q_s, do_s, k_s, v_s; per warp: S-then-P and dP (fp32), dS (bf16), dQ.
  static constexpr int kDqBytes = 4 * kTile + kWarps * (2 * kWarpScore + kWarpBf16 + kWarpAcc);
  static_assert((kKeyTile * L::kLdQ * 2) % 32 == 0 && kWarpScore % 32 == 0 && kWarpBf16 % 32 == 0 &&
                    kWarpAcc % 32 == 0 && kTile % 32 == 0,
                "flash tc backward: every wmma tile must start 32-byte aligned");
  static_assert(kDkdvBytes <= 163 * 1024 && kDqBytes <= 163 * 1024,
                "flash tc backward: over an A100's shared memory per block");
};

// dqkv element += v, or = v (assign).
__device__ inline void write_grad(float* p, float v, bool assign) {
  *p = assign ? v : *p + v;
}

// grid (batch * n_kv_head, key tiles of kKeyTile). dK and dV of the block's key tile of one K/V
// head, summed over the query heads of its group (in order) and, for each, over the query tiles
// from the one holding the tile's first key on (earlier queries cannot see these keys).
// T: the element type of qkv and dout (float or __nv_bfloat16).
template <int D, typename T>
__global__ void __launch_bounds__(32 * TcBackward<D>::kDkdvWarps)
    flash_backward_dkdv_tc_kernel(float* __restrict__ dqkv, const T* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const T* __restrict__ qkv, int seq, int n_head, int n_kv_head,
                                  int head_dim, float scale, bool assign) {
  using L = TcLayout<D>;
  using B = TcBackward<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* p = smem;
  const auto take = [&p](int bytes) {
    unsigned char* r = p;
    p += bytes;
    return r;
  };
  auto* k_s = reinterpret_cast<__nv_bfloat16*>(take(B::kKeyTile * L::kLdQ * 2));
  auto* v_s = reinterpret_cast<__nv_bfloat16*>(take(B::kKeyTile * L::kLdQ * 2));
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(take(B::kTile));
  auto* do_s = reinterpret_cast<__nv_bfloat16*>(take(B::kTile));
  auto* lse_s = reinterpret_cast<float*>(take(kRows * 4));
  auto* delta_s = reinterpret_cast<float*>(take(kRows * 4));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  p += warp * (2 * B::kWarpScore + 2 * B::kWarpBf16 + 2 * B::kWarpAcc);
  auto* pt_w = reinterpret_cast<float*>(take(B::kWarpScore));   // S^T, then P^T (fp32)
  auto* dpt_w = reinterpret_cast<float*>(take(B::kWarpScore));  // dP^T
  auto* pt16_w = reinterpret_cast<__nv_bfloat16*>(take(B::kWarpBf16));
  auto* dst16_w = reinterpret_cast<__nv_bfloat16*>(take(B::kWarpBf16));
  auto* dk_w = reinterpret_cast<float*>(take(B::kWarpAcc));
  auto* dv_w = reinterpret_cast<float*>(take(B::kWarpAcc));

  const int bkv = blockIdx.x;
  const int b = bkv / n_kv_head, kvh = bkv % n_kv_head;
  const int k0 = static_cast<int>(blockIdx.y) * B::kKeyTile;
  const int group = n_head / n_kv_head;
  const i64 d = static_cast<i64>(n_head) * head_dim;
  const i64 kv = static_cast<i64>(n_kv_head) * head_dim;
  const i64 ld = d + 2 * kv;
  const T* row0 = qkv + static_cast<i64>(b) * seq * ld;
  const i64 kv_off = static_cast<i64>(kvh) * head_dim;
  load_tile_bf16<D>(k_s, row0 + d + kv_off, ld, B::kKeyTile, k0, seq, head_dim);
  load_tile_bf16<D>(v_s, row0 + d + kv + kv_off, ld, B::kKeyTile, k0, seq, head_dim);
  const int r = lane / 2, half = lane % 2;
  const int j = k0 + 16 * warp + r;  // this lane's key (>= seq: padding, not stored)
  for (int c = half; c < D; c += 2) dk_w[r * L::kLdO + c] = dv_w[r * L::kLdO + c] = 0.0f;

  for (int g = 0; g < group; ++g) {
    const int h = kvh * group + g;
    const T* q_g = row0 + static_cast<i64>(h) * head_dim;
    const T* do_g = dout + static_cast<i64>(b) * seq * d + static_cast<i64>(h) * head_dim;
    const float* lse_g = lse + (static_cast<i64>(b) * n_head + h) * seq;
    const float* delta_g = delta + (static_cast<i64>(b) * n_head + h) * seq;
    for (int q0 = k0 / kRows * kRows; q0 < seq; q0 += kRows) {
      __syncthreads();  // the previous query tile is done with q_s, do_s, lse_s, delta_s
      load_tile_bf16<D>(q_s, q_g, ld, kRows, q0, seq, head_dim);
      load_tile_bf16<D>(do_s, do_g, d, kRows, q0, seq, head_dim);
      load_rows_tc(lse_s, lse_g, q0, seq);
      load_rows_tc(delta_s, delta_g, q0, seq);
      __syncthreads();
      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
      warp_mma<wmma::col_major, D, kRows>(pt_w, L::kLdS, false, k_s + (16 * warp) * L::kLdQ,
                                          L::kLdQ, q_s, L::kLdQ);
      warp_mma<wmma::col_major, D, kRows>(dpt_w, L::kLdS, false, v_s + (16 * warp) * L::kLdQ,
                                          L::kLdQ, do_s, L::kLdQ);
      __syncwarp();
      for (int ii = half * (kRows / 2); ii < (half + 1) * (kRows / 2); ++ii) {
        const int i = q0 + ii;
        const float pv =
            j <= i && i < seq && j < seq ? expf(scale * pt_w[r * L::kLdS + ii] - lse_s[ii]) : 0.0f;
        const float ds = pv * (dpt_w[r * L::kLdS + ii] - delta_s[ii]);
        pt16_w[r * L::kLdP + ii] = __float2bfloat16(pv);
        dst16_w[r * L::kLdP + ii] = __float2bfloat16(ds);
      }
      __syncwarp();
      warp_mma<wmma::row_major, kRows, D>(dv_w, L::kLdO, true, pt16_w, L::kLdP, do_s, L::kLdQ);
      warp_mma<wmma::row_major, kRows, D>(dk_w, L::kLdO, true, dst16_w, L::kLdP, q_s, L::kLdQ);
    }
  }
  __syncwarp();  // the last products' stores are visible to the lanes that read them
  if (j >= seq) return;
  float* dk_row = dqkv + (static_cast<i64>(b) * seq + j) * ld + d + kv_off;
  for (int c = half; c < head_dim; c += 2) {
    write_grad(dk_row + c, scale * dk_w[r * L::kLdO + c], assign);
    write_grad(dk_row + kv + c, dv_w[r * L::kLdO + c], assign);
  }
}

// grid (batch * n_head, query tiles of kRows). dQ of the block's query tile of one head, summed
// over the key tiles up to the diagonal.
template <int D, typename T>
__global__ void __launch_bounds__(kThreads)
    flash_backward_dq_tc_kernel(float* __restrict__ dqkv, const T* __restrict__ dout,
                                const float* __restrict__ lse, const float* __restrict__ delta,
                                const T* __restrict__ qkv, int seq, int n_head, int n_kv_head,
                                int head_dim, float scale, bool assign) {
  using L = TcLayout<D>;
  using B = TcBackward<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem);
  auto* do_s = reinterpret_cast<__nv_bfloat16*>(smem + B::kTile);
  auto* k_s = reinterpret_cast<__nv_bfloat16*>(smem + 2 * B::kTile);
  auto* v_s = reinterpret_cast<__nv_bfloat16*>(smem + 3 * B::kTile);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* w = smem + 4 * B::kTile + warp * (2 * B::kWarpScore + B::kWarpBf16 + B::kWarpAcc);
  auto* s_w = reinterpret_cast<float*>(w);  // S, then P
  auto* dp_w = reinterpret_cast<float*>(w + B::kWarpScore);
  auto* ds16_w = reinterpret_cast<__nv_bfloat16*>(w + 2 * B::kWarpScore);
  auto* dq_w = reinterpret_cast<float*>(w + 2 * B::kWarpScore + B::kWarpBf16);

  const auto [bh, b, h, q0, d, kv, ld, row0, kv_off] =
      query_tile_block(qkv, seq, n_head, n_kv_head, head_dim);
  load_tile_bf16<D>(q_s, row0 + static_cast<i64>(h) * head_dim, ld, kRows, q0, seq, head_dim);
  load_tile_bf16<D>(do_s, dout + static_cast<i64>(b) * seq * d + static_cast<i64>(h) * head_dim, d,
                    kRows, q0, seq, head_dim);
  const int r = lane / 2, half = lane % 2;
  const int i = q0 + 16 * warp + r;
  const i64 row = (static_cast<i64>(b) * n_head + h) * seq + i;
  const float lse_i = i < seq ? lse[row] : 0.0f, delta_i = i < seq ? delta[row] : 0.0f;
  for (int c = half; c < D; c += 2) dq_w[r * L::kLdO + c] = 0.0f;

  const int last_key = (q0 + kRows < seq ? q0 + kRows : seq) - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kKeys) {
    __syncthreads();  // the previous key tile's dS K is done with k_s (and Q, dO are loaded)
    load_tile_bf16<D>(k_s, row0 + d + kv_off, ld, kKeys, k0, seq, head_dim);
    load_tile_bf16<D>(v_s, row0 + d + kv + kv_off, ld, kKeys, k0, seq, head_dim);
    __syncthreads();
    warp_mma<wmma::col_major, D, kKeys>(s_w, L::kLdS, false, q_s + (16 * warp) * L::kLdQ, L::kLdQ,
                                        k_s, L::kLdQ);  // S = Q K^T
    warp_mma<wmma::col_major, D, kKeys>(dp_w, L::kLdS, false, do_s + (16 * warp) * L::kLdQ, L::kLdQ,
                                        v_s, L::kLdQ);  // dP = dO V^T
    __syncwarp();
    for (int jj = half * (kKeys / 2); jj < (half + 1) * (kKeys / 2); ++jj) {
      const int j = k0 + jj;
      const float pv =
          j <= i && j < seq && i < seq ? expf(scale * s_w[r * L::kLdS + jj] - lse_i) : 0.0f;
      ds16_w[r * L::kLdP + jj] = __float2bfloat16(pv * (dp_w[r * L::kLdS + jj] - delta_i));
    }
    __syncwarp();
    warp_mma<wmma::row_major, kKeys, D>(dq_w, L::kLdO, true, ds16_w, L::kLdP, k_s,
                                        L::kLdQ);  // dQ += dS K
  }
  __syncwarp();
  if (i >= seq) return;
  float* dq_row = dqkv + (static_cast<i64>(b) * seq + i) * ld + static_cast<i64>(h) * head_dim;
  for (int c = half; c < head_dim; c += 2)
    write_grad(dq_row + c, scale * dq_w[r * L::kLdO + c], assign);
}

// Above 48 KiB of dynamic shared memory a kernel must opt in: once per process and kernel (not
// a stream operation, so it may also run during a graph capture).
template <typename Kernel>
void opt_in_shared(Kernel* kernel, int bytes) {
  PION_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

template <int D, typename T>
void launch_backward_tc(Context& ctx, float* dqkv, const float* delta, const T* dout,
                        const float* lse, const T* qkv, const FlashArgs& a, bool assign) {
  using B = TcBackward<D>;
  static const bool opted_in = [] {
    opt_in_shared(flash_backward_dkdv_tc_kernel<D, T>, B::kDkdvBytes);
    opt_in_shared(flash_backward_dq_tc_kernel<D, T>, B::kDqBytes);
    return true;
  }();
  (void)opted_in;
  const dim3 kv_grid(static_cast<unsigned>(a.bkv),
                     static_cast<unsigned>((a.seq + B::kKeyTile - 1) / B::kKeyTile));
  const dim3 q_grid(static_cast<unsigned>(a.bh),
                    static_cast<unsigned>((a.seq + kRows - 1) / kRows));
  // dK / dV and dQ write disjoint parts of dqkv; both only read delta, lse, qkv and dout.
  flash_backward_dkdv_tc_kernel<D, T>
      <<<kv_grid, 32 * B::kDkdvWarps, B::kDkdvBytes, stream_of(ctx)>>>(
          dqkv, dout, lse, delta, qkv, a.seq, a.n_head, a.n_kv_head, a.head_dim, a.scale, assign);
  PION_CUDA_CHECK_LAUNCH("flash_backward_dkdv_tc_kernel");
  flash_backward_dq_tc_kernel<D, T><<<q_grid, kThreads, B::kDqBytes, stream_of(ctx)>>>(
      dqkv, dout, lse, delta, qkv, a.seq, a.n_head, a.n_kv_head, a.head_dim, a.scale, assign);
  PION_CUDA_CHECK_LAUNCH("flash_backward_dq_tc_kernel");
}

template <int D, typename T>
void launch_forward_tc(Context& ctx, float* out, void* out16, float* lse, const T* qkv,
                       const FlashArgs& a) {
  constexpr int bytes = TcLayout<D>::kBytes;
  static const bool opted_in = [] {
    opt_in_shared(flash_forward_tc_kernel<D, T>, bytes);
    return true;
  }();
  (void)opted_in;
  const dim3 grid(static_cast<unsigned>(a.bh), static_cast<unsigned>((a.seq + kRows - 1) / kRows));
  flash_forward_tc_kernel<D, T><<<grid, kThreads, bytes, stream_of(ctx)>>>(
      out, static_cast<__nv_bfloat16*>(out16), lse, qkv, a.seq, a.n_head, a.n_kv_head, a.head_dim,
      a.scale);
  PION_CUDA_CHECK_LAUNCH("flash_forward_tc_kernel");
}

}  // namespace

void flash_attention_forward_tc(Context& ctx, float* out, float* lse, const float* qkv, i64 batch,
                                i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head, void* out_bf16,
                                const void* qkv_bf16) {
  const std::string who = "flash_attention_forward_tc";
  n_kv_head = check_flash(batch, seq, n_head, head_dim, n_kv_head, who);
  require((out != nullptr || out_bf16 != nullptr) && lse != nullptr, who,
          "lse and out (or out_bf16) must not be null");
  require((qkv != nullptr) != (qkv_bf16 != nullptr), who, "needs exactly one of qkv and qkv_bf16");
  const FlashArgs a = flash_args(batch, seq, n_head, n_kv_head, head_dim);
  const auto* qkv16 = static_cast<const __nv_bfloat16*>(qkv_bf16);
  with_columns(head_dim, [&](auto D) {
    constexpr int kD = decltype(D)::value;
    if (qkv16 != nullptr)
      launch_forward_tc<kD>(ctx, out, out_bf16, lse, qkv16, a);
    else
      launch_forward_tc<kD>(ctx, out, out_bf16, lse, qkv, a);
  });
}

void flash_attention_backward_tc(Context& ctx, float* dqkv, float* scratch, const float* dout,
                                 const float* out, const float* lse, const float* qkv, i64 batch,
                                 i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head,
                                 GradWrite dqkv_write, const void* out_bf16, const void* dout_bf16,
                                 const void* qkv_bf16) {
  const std::string who = "flash_attention_backward_tc";
  n_kv_head = check_flash(batch, seq, n_head, head_dim, n_kv_head, who);
  require(dqkv != nullptr && scratch != nullptr && (out != nullptr || out_bf16 != nullptr) &&
              lse != nullptr,
          who, "dqkv, scratch, out (or out_bf16) and lse must not be null");
  const bool bf16_in = qkv_bf16 != nullptr;
  require((qkv != nullptr) != bf16_in && (dout != nullptr) != (dout_bf16 != nullptr) &&
              bf16_in == (dout_bf16 != nullptr),
          who, "needs qkv and dout, or qkv_bf16 and dout_bf16 (both in bf16 or neither)");
  const FlashArgs a = flash_args(batch, seq, n_head, n_kv_head, head_dim);
  launch_row_dot(ctx, scratch, dout, out, out_bf16, a, batch, who, dout_bf16);
  // The dK/dV and dQ kernels together write every element of dqkv once.
  const bool assign = dqkv_write == GradWrite::Assign;
  with_columns(head_dim, [&](auto D) {
    constexpr int kD = decltype(D)::value;
    if (bf16_in)
      launch_backward_tc<kD>(ctx, dqkv, scratch, static_cast<const __nv_bfloat16*>(dout_bf16), lse,
                             static_cast<const __nv_bfloat16*>(qkv_bf16), a, assign);
    else
      launch_backward_tc<kD>(ctx, dqkv, scratch, dout, lse, qkv, a, assign);
  });
}

}  // namespace pion::cuda::layers
