#pragma once
// nvcuda::wmma (CUDA's <mma.h>) on the emulator: bf16 16 x 16 x 16 tiles with fp32
// accumulators, the tensor-core shape the project's kernels use.
//
// Every emulated thread holds the WHOLE tile in its fragment (num_elements is the tile's size,
// not the 8 elements a GPU lane holds), stored row-major. So code that treats fragment elements
// alike (fill_fragment, scaling every x[i]) behaves as on a GPU, and the warp's collective
// loads, products and stores give each lane the full result. Code that assumes which elements
// a lane holds cannot be emulated (CUDA leaves that mapping unspecified anyway).
//
// A load ends with a warp barrier (__syncwarp): every lane has loaded before any lane goes on,
// as on a GPU, where each lane loads and later stores only its own elements, so an accumulator
// loaded from and stored back to the same tile is updated in place. Nothing waits BEFORE a
// load: a warp that writes a tile to shared memory lane by lane and loads it as a fragment
// without a __syncwarp() in between reads what other lanes have not written yet, here as on a
// GPU. A store is not a barrier either: lanes that read a stored tile need a __syncwarp().
// The GPU's rules are checked: 32-byte aligned pointers, ldm a multiple of 8 elements for bf16
// and of 4 for float (a warning each, as for other misuse).
#include <cstdint>
#include <type_traits>

#include "emu/cuda_emu.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated wmma: only the 16 x 16 x 16 shape");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : std::is_same_v<T, __nv_bfloat16>,
                "emulated wmma: bf16 operands, fp32 accumulators");
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

namespace detail {
template <typename T>
inline void check_operand(const T* p, unsigned ldm, const char* what) {
  constexpr unsigned multiple = sizeof(T) == 2 ? 8 : 4;
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    ::emu::warn("%s: pointer %p is not 32-byte aligned (wmma needs 256-bit alignment)", what,
                static_cast<const void*>(p));
  if (ldm % multiple != 0)
    ::emu::warn("%s: ldm %u is not a multiple of %u elements", what, ldm, multiple);
}
inline float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
inline float to_float(float v) {
  return v;
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& e : f.x) e = value;
}

// Operand tiles: the fragment's Layout says how the tile lies in memory.
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  detail::check_operand(p, ldm, "wmma::load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major>
                                 ? p[static_cast<std::size_t>(c) * ldm + r]
                                 : p[static_cast<std::size_t>(r) * ldm + c];
  ::emu::syncwarp(0xffffffffu, __FILE__, __LINE__);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::check_operand(p, ldm, "wmma::load_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_col_major ? p[static_cast<std::size_t>(c) * ldm + r]
                                               : p[static_cast<std::size_t>(r) * ldm + c];
  ::emu::syncwarp(0xffffffffu, __FILE__, __LINE__);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_operand(p, ldm, "wmma::store_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_col_major ? p[static_cast<std::size_t>(c) * ldm + r]
                               : p[static_cast<std::size_t>(r) * ldm + c]) = f.x[r * N + c];
}

// d = a b + c, products of bf16 exact in fp32, summed in k order (a GPU's order differs).
template <int M, int N, int K, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, __nv_bfloat16, LA>& a,
                     const fragment<matrix_b, M, N, K, __nv_bfloat16, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        s += detail::to_float(a.x[i * K + k]) * detail::to_float(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace nvcuda::wmma
