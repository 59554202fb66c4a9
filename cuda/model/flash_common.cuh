#pragma once
// What the two flash attention files share on the host: flash_attention.cu (fp32 on CUDA
// cores, forward and backward) and flash_attention_tc.cu (bf16 tensor cores).
#include <string>
#include <type_traits>

#include "common.cuh"

namespace pion::cuda::layers::flash {

struct FlashArgs {
  int bh, bkv, seq, n_head, n_kv_head, head_dim;  // bh = batch * n_head, bkv = batch * n_kv_head
  float scale;
};

// The argument checks of every flash call (throws pion::Error naming `who`); returns the K/V
// head count (n_kv_head, or n_head for 0).
i64 check_flash(i64 batch, i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head,
                const std::string& who);
FlashArgs flash_args(i64 batch, i64 seq, i64 n_head, i64 n_kv_head, i64 head_dim);
// The compiled column count for a head_dim (checked by check_flash before): 32, 64 or 128.
int columns_for(i64 head_dim);
// Backward's first pass: delta [batch * n_head * seq] = dout_i . out_i per row and head, over
// the head's columns (fp32 sums, one warp per row); out fp32, or bf16 (out_bf16) when out is
// null; dout fp32, or bf16 (dout_bf16) when that is given.
void launch_row_dot(Context& ctx, float* delta, const float* dout, const float* out,
                    const void* out_bf16, const FlashArgs& a, i64 batch, const std::string& who,
                    const void* dout_bf16 = nullptr);
// Calls f(std::integral_constant<int, D>{}) with the compiled column count D for head_dim.
template <typename F>
void with_columns(i64 head_dim, F&& f) {
  switch (columns_for(head_dim)) {
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    case 64:
      f(std::integral_constant<int, 64>{});
      break;
    default:
      f(std::integral_constant<int, 128>{});
      break;
  }
}

}  // namespace pion::cuda::layers::flash
