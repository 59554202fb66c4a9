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
// writes them (its backward can read them).
//
// Shared memory (dynamic; 95 KiB at D = 128, 62 KiB at D = 64): Q and K-then-V in bf16, and
// per warp a 16 x kKeys fp32 score tile, a 16 x kKeys bf16 P tile and its 16 x D fp32 O rows.
// Rows are padded so that every wmma pointer is 32-byte aligned and every ldm a multiple of 8
// (bf16) or 4 (fp32) elements, as wmma requires; the padding also spreads rows over banks.
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>

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

// Rows [row0, row0 + rows) of one head, rounded to bf16, into tile (rows ld floats apart in
// src, kLdQ apart in the tile); rows >= seq and columns >= head_dim are zeros.
template <int D>
__device__ void load_tile_bf16(__nv_bfloat16* tile, const float* __restrict__ src, i64 ld, int rows,
                               int row0, int seq, int head_dim) {
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int r = idx / D, col = idx % D;
    const int row = row0 + r;
    const float v = row < seq && col < head_dim ? src[static_cast<i64>(row) * ld + col] : 0.0f;
    tile[r * TcLayout<D>::kLdQ + col] = __float2bfloat16(v);
  }
}

// grid (batch * n_head, query tiles). out [batch, seq, n_head head_dim], lse [batch * n_head,
// seq], qkv [batch, seq, (n_head + 2 n_kv_head) head_dim].
template <int D>
__global__ void __launch_bounds__(kThreads)
    flash_forward_tc_kernel(float* __restrict__ out, __nv_bfloat16* __restrict__ out16,
                            float* __restrict__ lse, const float* __restrict__ qkv, int seq,
                            int n_head, int n_kv_head, int head_dim, float scale) {
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

  const int bh = blockIdx.x;
  const int b = bh / n_head, h = bh % n_head;
  // The last query tiles see the most keys: launch them first (better tail balance).
  const int qt = static_cast<int>(gridDim.y) - 1 - static_cast<int>(blockIdx.y);
  const int q0 = qt * kRows;
  const i64 d = static_cast<i64>(n_head) * head_dim;
  const i64 kv = static_cast<i64>(n_kv_head) * head_dim;
  const i64 ld = d + 2 * kv;
  const float* row0 = qkv + static_cast<i64>(b) * seq * ld;
  const i64 kv_off = static_cast<i64>(h / (n_head / n_kv_head)) * head_dim;  // K/V head h / g
  const float* k_g = row0 + d + kv_off;
  const float* v_g = row0 + d + kv + kv_off;

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
    for (int n = 0; n < kKeys / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int k = 0; k < D / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> qa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> kb;
        wmma::load_matrix_sync(qa, q_s + (16 * warp) * L::kLdQ + 16 * k, L::kLdQ);
        // B = K^T: element (c, j) is K's row j, column c, i.e. K's rows read column-major.
        wmma::load_matrix_sync(kb, kv_s + (16 * n) * L::kLdQ + 16 * k, L::kLdQ);
        wmma::mma_sync(acc, qa, kb, acc);
      }
      wmma::store_matrix_sync(s_w + 16 * n, acc, L::kLdS, wmma::mem_row_major);
    }
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

    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, o_w + 16 * n, L::kLdO, wmma::mem_row_major);
      for (int k = 0; k < kKeys / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> pa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> vb;
        wmma::load_matrix_sync(pa, p_w + 16 * k, L::kLdP);
        wmma::load_matrix_sync(vb, kv_s + (16 * k) * L::kLdQ + 16 * n, L::kLdQ);
        wmma::mma_sync(acc, pa, vb, acc);
      }
      wmma::store_matrix_sync(o_w + 16 * n, acc, L::kLdO, wmma::mem_row_major);
    }
  }

  __syncwarp();  // the last P V's stores of O are visible to the lanes that read them
  if (i >= seq) return;
  const float inv_l = 1.0f / l;
  const i64 out_row = (static_cast<i64>(b) * seq + i) * d + static_cast<i64>(h) * head_dim;
  for (int c = half; c < head_dim; c += 2) {
    const float v = o_w[r * L::kLdO + c] * inv_l;
    out[out_row + c] = v;
    if (out16 != nullptr) out16[out_row + c] = __float2bfloat16(v);
  }
  if (half == 0) lse[static_cast<i64>(bh) * seq + i] = m + logf(l);
}

template <int D>
void launch_forward_tc(Context& ctx, float* out, void* out16, float* lse, const float* qkv,
                       const FlashArgs& a) {
  constexpr int bytes = TcLayout<D>::kBytes;
  // Above 48 KiB a kernel must opt in; once per process and D (not a stream operation, so it
  // may run during a graph capture too).
  static const bool opted_in = [] {
    PION_CUDA_CHECK(cudaFuncSetAttribute(flash_forward_tc_kernel<D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)opted_in;
  const dim3 grid(static_cast<unsigned>(a.bh), static_cast<unsigned>((a.seq + kRows - 1) / kRows));
  flash_forward_tc_kernel<D><<<grid, kThreads, bytes, stream_of(ctx)>>>(
      out, static_cast<__nv_bfloat16*>(out16), lse, qkv, a.seq, a.n_head, a.n_kv_head, a.head_dim,
      a.scale);
  PION_CUDA_CHECK_LAUNCH("flash_forward_tc_kernel");
}

}  // namespace

void flash_attention_forward_tc(Context& ctx, float* out, float* lse, const float* qkv, i64 batch,
                                i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head, void* out_bf16) {
  const std::string who = "flash_attention_forward_tc";
  n_kv_head = check_flash(batch, seq, n_head, head_dim, n_kv_head, who);
  require(out != nullptr && lse != nullptr && qkv != nullptr, who,
          "out, lse and qkv must not be null");
  const FlashArgs a = flash_args(batch, seq, n_head, n_kv_head, head_dim);
  with_columns(head_dim, [&](auto D) {
    launch_forward_tc<decltype(D)::value>(ctx, out, out_bf16, lse, qkv, a);
  });
}

}  // namespace pion::cuda::layers
