#pragma once
// The device pieces of incremental decoding over a KV cache (cuda/model/decode.cu), used by
// CudaDecoder (pion/cuda/generate.h) beside the training layers of pion/cuda/layers.h: the
// same row layout as the CPU Decoder (src/model/decode.cpp), where each row of a call is one
// token of some sequence with its own cache slot and position.
//
// Cache layout (one layer): keys / values [slots, n_kv_head, capacity, head_dim] floats, as
// pion::KvCache. Row metadata are device int32 arrays: row_slot[r], row_pos[r] (its position
// in the slot, < capacity <= the RoPE table's seq_len). The host checks every value before
// uploading (plan_decode): the kernels trust them.
//
// Plain C++17 without CUDA types (see runtime.h).
#include <cstddef>
#include <cstdint>

#include "pion/cuda/layers.h"

namespace pion::cuda::layers {

// RoPE (rope_forward's rotation) of `rows` rows `row_stride` apart, n_head heads each, row r
// at position row_pos[r] instead of r % seq.
void rope_rows_forward(Context& ctx, float* x, const DeviceRopeTable& table,
                       const std::int32_t* row_pos, i64 rows, i64 n_head, i64 head_dim,
                       i64 row_stride);

// Copies each row's k and v (columns [d, d + kv) and [d + kv, d + 2 kv) of the qkv rows,
// kv = n_kv_head * head_dim, d = qkv_stride - 2 kv) into one layer's cache at (row_slot[r],
// head, row_pos[r]).
void kv_cache_store(Context& ctx, float* keys, float* values, const float* qkv,
                    const std::int32_t* row_slot, const std::int32_t* row_pos, i64 rows,
                    i64 qkv_stride, i64 n_kv_head, i64 head_dim, i64 capacity);

// out [rows, n_head head_dim]: query head h of row r (columns h head_dim.. of its qkv row)
// attends to positions 0..row_pos[r] of its slot's K/V head h / (n_head / n_kv_head) in one
// layer's cache: softmax(q K^T / sqrt(head_dim)) V. One warp per (row, head), keys in tiles
// of 32 with an online softmax (running max and sum, rescaled per tile), fp32 throughout.
// head_dim up to kDecodeMaxHeadDim (pion::Error beyond).
inline constexpr i64 kDecodeMaxHeadDim = 256;
void decode_attention(Context& ctx, float* out, const float* qkv, const float* keys,
                      const float* values, const std::int32_t* row_slot,
                      const std::int32_t* row_pos, i64 rows, i64 qkv_stride, i64 n_head,
                      i64 n_kv_head, i64 head_dim, i64 capacity);

// out [m, c] = in rows index[0..m) (each of c floats).
void gather_rows(Context& ctx, float* out, const float* in, const std::int32_t* index, i64 m,
                 i64 c);

// Copies count values between the host and device memory in ctx's stream order (after the
// work queued before it): upload returns once the host data is consumed, download once the
// values are on the host (it synchronises the stream). Partial buffers, unlike DeviceBuffer's
// whole-buffer copies.
void upload_async(Context& ctx, std::int32_t* device, const std::int32_t* host, std::size_t count);
void download_sync(Context& ctx, float* host, const float* device, std::size_t count);

}  // namespace pion::cuda::layers
