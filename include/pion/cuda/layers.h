#pragma once
// The decoder's layers on the GPU: device versions of pion/model/layers.h (float path) with
// the same semantics, shapes and conventions, on fp32 device pointers:
// - `n` is the number of token rows (B * T); rows are contiguous, row-major.
// - Linear weights are [d_out, d_in] (out = in W^T).
// - Forward functions write their outputs; backward functions ADD into every gradient they
//   produce, so callers zero gradient buffers first, except where a GradWrite argument lets
//   the first writer of a buffer assign it instead (cross_entropy_bf16 always assigns).
//   Exception: rope_* work in place.
// Every function queues kernels / cuBLAS calls on the Context's stream and returns: no host
// synchronisation, no allocation, no device-to-host copy, so a training step built from them
// can be captured into a CUDA graph. Argument checks (shapes, int ranges) throw pion::Error
// on the host before anything is queued.
//
// Reductions are deterministic: fixed block shapes and fixed tree orders, no float atomics
// (embedding_backward and rmsnorm_backward's dweight included), so the same inputs give the
// same bits on every run. They are not bit-identical to the CPU (tree vs sequential sums);
// the tests bound the difference.
//
// Plain C++17 with no CUDA types (see runtime.h); the kernels live in cuda/model/.
#include <cstdint>
#include <memory>
#include <vector>

#include "pion/cuda/precision.h"
#include "pion/cuda/runtime.h"

namespace pion::cuda {

// Owns count int32 values of device memory (token ids, targets). Movable, not copyable.
// upload/download are synchronous (they first wait for the whole device, like DeviceBuffer);
// upload_async is the per-step path.
class DeviceInt32Buffer {
 public:
  DeviceInt32Buffer() = default;
  explicit DeviceInt32Buffer(std::size_t count);
  ~DeviceInt32Buffer();
  DeviceInt32Buffer(DeviceInt32Buffer&& other) noexcept;
  DeviceInt32Buffer& operator=(DeviceInt32Buffer&& other) noexcept;
  DeviceInt32Buffer(const DeviceInt32Buffer&) = delete;
  DeviceInt32Buffer& operator=(const DeviceInt32Buffer&) = delete;

  std::int32_t* data() { return ptr_; }
  const std::int32_t* data() const { return ptr_; }
  std::size_t size() const { return count_; }
  void upload(const std::int32_t* host, std::size_t count);
  void download(std::int32_t* host, std::size_t count) const;
  // Copies host into a pinned staging buffer (cudaMallocHost, allocated on the first call)
  // and queues cudaMemcpyAsync from it on ctx's stream: stream-ordered after the work already
  // queued (which may still read this buffer), with no device-wide wait. It waits only for
  // this buffer's previous copy to have left the staging buffer before refilling it.
  void upload_async(Context& ctx, const std::int32_t* host, std::size_t count);

 private:
  void release() noexcept;
  std::int32_t* ptr_ = nullptr;
  std::size_t count_ = 0;
  std::int32_t* staging_ = nullptr;  // pinned host memory, count_ values
  void* copied_ = nullptr;           // cudaEvent_t recorded after the last async copy
};

}  // namespace pion::cuda

namespace pion::cuda::layers {

using i64 = std::int64_t;

// How a layer's GEMMs run (pion/cuda/precision.h). Every precision accumulates in fp32 and
// the layers read / write fp32 buffers:
// Fp32: plain fp32 on CUDA cores (parity with the CPU, ~1e-6 relative);
// Tf32: fp32 data rounded to TF32 on the tensor cores (~1e-3 relative);
// Bf16: inputs (activations and the fp32 master weights) are rounded to bf16 into a
//       caller-owned Bf16Workspace, multiplied on the tensor cores with fp32 accumulation
//       (CUBLAS_COMPUTE_32F); outputs and gradients stay fp32 (~1e-2 relative). A weight
//       inside the workspace's mirror (Bf16Workspace::set_weight_mirror) is read from the
//       mirror's bf16 copy instead of being converted again on every call, and a dout
//       already in bf16 (cross_entropy_bf16's dlogits) is read as it is (linear_backward's
//       dout_bf16, or linear_backward_bf16).
//       bf16 activations: the kernels that produce a GEMM operand can also write its bf16
//       copy (the `*_bf16` outputs below: RMSNorm's output, SwiGLU's output and its
//       gradient, RMSNorm's dx, RoPE's backward over a whole [q | k | v] row), and the linear
//       layers take such a copy (`in_bf16`, `dout_bf16`) instead of converting the fp32
//       operand. Every one is the fp32 value its kernel computes, rounded to nearest even:
//       bit for bit what the linear layer's own conversion would give. A bf16 GEMM can also
//       write its output in bf16 (linear_forward's out_bf16, linear_backward's din_bf16) for a
//       kernel that reads it so (SwiGLU's gu_bf16 and dout_bf16, RMSNorm backward's
//       dout_bf16, the residual add's delta_bf16, rope_forward_bf16 in place, the tensor-core
//       flash attention's qkv_bf16 and dout_bf16): the GEMM's fp32 accumulators rounded once.
// A bf16 buffer is `void*` here (no CUDA types): __nv_bfloat16 device memory, e.g. a
// Bf16Workspace's data() or a slice of it (the tensor-core GEMMs want 16-byte aligned
// operands; 64-element, 128-byte aligned slices are what the workspace itself uses).
using cuda::MatmulPrecision;

// How a backward function writes a gradient it produces: Add (+=, the default: callers zero
// the buffer first, or accumulate several contributions) or Assign (=, the first writer of a
// buffer: no zeroing pass before it, and its GEMMs run with beta = 0, so they do not read the
// old values either).
enum class GradWrite { Add, Assign };

// Device scratch for the bf16 copies of a linear layer's operands. Allocated once at its
// full size (set-up time: cudaMalloc), so calls that use it can be graph-captured. Also used
// as plain bf16 device storage (CudaLlama's bf16 copy of its weights).
class Bf16Workspace {
 public:
  explicit Bf16Workspace(std::size_t elements);
  ~Bf16Workspace();
  Bf16Workspace(const Bf16Workspace&) = delete;
  Bf16Workspace& operator=(const Bf16Workspace&) = delete;
  std::size_t size() const { return count_; }
  void* data() const { return ptr_; }  // __nv_bfloat16[size()]

  // Declares mirror[i] (count bf16 values, e.g. another Bf16Workspace's data()) the bf16 copy,
  // rounded to nearest even, of weights[i]. Linear layers using this workspace then read a
  // weight lying inside [weights, weights + count) from the mirror instead of converting it,
  // so the conversion runs once per weight update instead of once per GEMM call. The caller
  // keeps the mirror current (convert_to_bf16 after every change to the weights, before the
  // next layer call reads them) and alive while this workspace is used. nullptr clears it.
  void set_weight_mirror(const float* weights, const void* mirror, std::size_t count);
  // The mirror's copy of weight[0, count), or nullptr when the range is not mirrored.
  const void* mirrored(const float* weight, i64 count) const;

 private:
  void* ptr_ = nullptr;
  std::size_t count_ = 0;
  const float* mirror_of_ = nullptr;
  const void* mirror_ = nullptr;
  std::size_t mirror_count_ = 0;
};
// Elements a Bf16Workspace needs for linear_forward and linear_backward at these sizes; with
// weight_mirrored, for a weight the workspace's mirror holds (no slice for the weight).
std::size_t linear_bf16_workspace_elements(i64 n, i64 d_in, i64 d_out,
                                           bool weight_mirrored = false);
// out[i] = in[i] rounded to bf16 (nearest even), count values; out is __nv_bfloat16 device
// memory (a Bf16Workspace's data(), say). The conversion the Bf16 linear layers apply.
void convert_to_bf16(Context& ctx, void* out, const float* in, i64 count);
// out[i] = in[i] widened to fp32 (exact), count values of __nv_bfloat16 device memory: how a
// caller reads a bf16 buffer back (tests).
void convert_from_bf16(Context& ctx, float* out, const void* in, i64 count);

// ---- token embedding: out[i] = table[tokens[i]] (table [V, c], out [n, c]) ----------------
void embedding_forward(Context& ctx, float* out, const std::int32_t* tokens, const float* table,
                       i64 n, i64 c);
// dtable[tokens[i]] += dout[i]. Deterministic without atomics: each thread owns one column of
// one vocabulary shard (tokens with token % shards == shard) and walks the rows in order, so
// rows with the same token are added in the CPU's order (the result is bit-identical to it).
// Cost: every thread reads all n token ids (warp-broadcast loads); fine for n up to ~1e5.
void embedding_backward(Context& ctx, float* dtable, const float* dout, const std::int32_t* tokens,
                        i64 n, i64 c);

// ---- RMSNorm: out = weight * x / sqrt(mean(x^2) + eps), per row of c; rstd [n] is kept ------
// One block per row, fp32 sums in a fixed tree order. out_bf16 (optional): the output rounded
// to bf16 as well, [n, c]; out may then be nullptr (a GEMM reading only the bf16 copy).
void rmsnorm_forward(Context& ctx, float* out, float* rstd, const float* x, const float* weight,
                     i64 n, i64 c, double eps, void* out_bf16 = nullptr);
// dx += ... (dx = ... with dx_write Assign), dweight += sum over rows of dout * x * rstd: a
// 2-D grid of blocks (32 columns x kRmsNormChunkRows rows each) writes one partial sum per
// column and row chunk into scratch (rmsnorm_backward_scratch_elements floats, overwritten),
// then one thread per column adds its chunks' partials in chunk order. Every sum has a fixed
// order and there are no atomics: the same bits on every run, in any block order.
// dx_bf16 (optional): the final dx (after the add) rounded to bf16, [n, c]: the residual
// stream's gradient as the next backward GEMMs read it. dout_bf16 (optional): dout stored in
// bf16 (a bf16 GEMM's din), read instead of dout (then nullptr); the arithmetic is the same
// fp32 on the widened values.
void rmsnorm_backward(Context& ctx, float* dx, float* dweight, float* scratch, const float* dout,
                      const float* x, const float* weight, const float* rstd, i64 n, i64 c,
                      GradWrite dx_write = GradWrite::Add, void* dx_bf16 = nullptr,
                      const void* dout_bf16 = nullptr);
inline constexpr i64 kRmsNormChunkRows = 64;
// ceil(n / kRmsNormChunkRows) * c.
std::size_t rmsnorm_backward_scratch_elements(i64 n, i64 c);

// ---- linear without bias: out [n, d_out] = in [n, d_in] * weight[d_out, d_in]^T -------------
// workspace is needed (and must hold linear_bf16_workspace_elements) only for Bf16.
// in_bf16 (Bf16 only, optional): the bf16 copy of in, read instead of converting in (which
// may then be nullptr); without it, in is converted into the workspace as before.
// out_bf16 (Bf16 only, optional): the output written in bf16 instead of fp32 (out must then
// be nullptr): the GEMM's fp32 accumulators rounded once to bf16, for a consumer that reads
// bf16 (swiglu_* with gu_bf16).
void linear_forward(Context& ctx, float* out, const float* in, const float* weight, i64 n, i64 d_in,
                    i64 d_out, MatmulPrecision precision = MatmulPrecision::Fp32,
                    Bf16Workspace* workspace = nullptr, const void* in_bf16 = nullptr,
                    void* out_bf16 = nullptr);
// din += dout W (din may be nullptr; din = dout W with din_write Assign), dweight += dout^T in.
// dout_bf16, in_bf16 (Bf16 only, optional): bf16 copies of dout and in, read instead of
// converting them (the fp32 pointer may then be nullptr). din_bf16 (Bf16 and Assign only,
// din nullptr): din written in bf16 instead (the fp32 accumulators rounded once), for a
// kernel that reads the gradient in bf16 (swiglu_backward's dout_bf16).
void linear_backward(Context& ctx, float* din, float* dweight, const float* dout, const float* in,
                     const float* weight, i64 n, i64 d_in, i64 d_out,
                     MatmulPrecision precision = MatmulPrecision::Fp32,
                     Bf16Workspace* workspace = nullptr, GradWrite din_write = GradWrite::Add,
                     const void* dout_bf16 = nullptr, const void* in_bf16 = nullptr,
                     void* din_bf16 = nullptr);

// linear_backward at Bf16 precision with dout already in bf16 (__nv_bfloat16 [n, d_out]
// device memory, e.g. cross_entropy_bf16's dlogits; linear_backward with only dout_bf16): the
// GEMMs read it as it is, so the results are bit for bit linear_backward's with the fp32 dout
// it was rounded from. The
// workspace needs linear_bf16_workspace_elements(n, d_in, d_out, mirrored) as for
// linear_backward, and dout_bf16 may lie in its first linear_bf16_dout_elements(n, d_out)
// elements (the slice linear_backward converts dout into): this call writes only after them.
// in_bf16 (optional): the bf16 copy of in, read instead of converting in (as linear_backward).
// din_bf16 (optional, Assign only, din nullptr): din written in bf16 (as linear_backward).
void linear_backward_bf16(Context& ctx, float* din, float* dweight, const void* dout_bf16,
                          const float* in, const float* weight, i64 n, i64 d_in, i64 d_out,
                          Bf16Workspace& workspace, GradWrite din_write = GradWrite::Add,
                          const void* in_bf16 = nullptr, void* din_bf16 = nullptr);
// The workspace elements at its start that hold linear_backward's bf16 dout, [n, d_out]
// padded: where a caller may place the bf16 dout it hands to linear_backward_bf16.
std::size_t linear_bf16_dout_elements(i64 n, i64 d_out);

// ---- rotary position embedding (pairs (i, i + head_dim/2), like the CPU) ---------------------
// The cos / sin tables of pion::layers::make_rope_table<float> ([seq_len, half] each), copied
// to the device once.
class DeviceRopeTable {
 public:
  DeviceRopeTable(const std::vector<float>& cos, const std::vector<float>& sin, i64 seq_len,
                  i64 half);
  i64 seq_len() const { return seq_len_; }
  i64 half() const { return half_; }
  const float* cos() const { return cos_.data(); }
  const float* sin() const { return sin_.data(); }

 private:
  DeviceBuffer cos_, sin_;
  i64 seq_len_ = 0, half_ = 0;
};
// In place on batch * seq rows `row_stride` apart, each starting with n_head heads of head_dim.
void rope_forward(Context& ctx, float* x, const DeviceRopeTable& table, i64 batch, i64 seq,
                  i64 n_head, i64 head_dim, i64 row_stride);
// rope_forward in place on a bf16 tensor (a bf16 GEMM's [q | k | v] output): each pair
// widened, rotated with rope_forward's fp32 expressions, and rounded back to nearest even.
void rope_forward_bf16(Context& ctx, void* x_bf16, const DeviceRopeTable& table, i64 batch, i64 seq,
                       i64 n_head, i64 head_dim, i64 row_stride);
// The transpose (rotation by -angle), in place on a gradient.
void rope_backward(Context& ctx, float* dx, const DeviceRopeTable& table, i64 batch, i64 seq,
                   i64 n_head, i64 head_dim, i64 row_stride);
// rope_backward in place on a bf16 gradient (cuDNN's attention backward writes dq and dk in
// bf16): widened, rotated back, rounded to nearest even.
void rope_backward_bf16(Context& ctx, void* dx_bf16, const DeviceRopeTable& table, i64 batch,
                        i64 seq, i64 n_head, i64 head_dim, i64 row_stride);
// RoPE's backward over whole fused rows for a bf16 GEMM: out_bf16 [batch * seq, row_width]
// (bf16) = dqkv's rows with the n_head query heads and the n_kv_head key heads that follow
// them rotated back (rope_backward's arithmetic) and the rest of the row (the values) copied,
// all rounded to bf16. dqkv is read, not written: one pass instead of two rope_backward
// passes and a conversion, for when the QKV GEMM's backward is the gradient's only reader.
void rope_backward_qkv_bf16(Context& ctx, void* out_bf16, const float* dqkv,
                            const DeviceRopeTable& table, i64 batch, i64 seq, i64 n_head,
                            i64 n_kv_head, i64 head_dim, i64 row_width);

// ---- causal multi-head self-attention (layout of pion::layers::attention_forward) -----------
// qkv [batch, seq, d + 2 kv] rows [q | k | v] with d = n_head * head_dim query columns and
// kv = n_kv_head * head_dim key and value columns each; out [batch, seq, d]; probs
// [batch, n_head, seq, seq] (softmax with key j <= query i, zeros above the diagonal; kept for
// backward). Grouped-query attention when n_kv_head < n_head (it must divide n_head): query
// head h uses K/V head h / (n_head / n_kv_head), as HF's repeat_kv; n_kv_head 0 (or n_head) is
// multi-head attention (qkv rows 3 d wide). Arguments in the CPU layer's order.
// The straightforward version: per (batch, head) S = scale Q K^T and O = P V as strided-
// batched cuBLAS GEMMs and a masked softmax kernel between them. It materialises the
// seq x seq scores, which is fine at small seq; flash_attention.h is the fused version for
// long contexts. precision: Fp32 or Tf32 (Bf16 is rejected).
void attention_forward(Context& ctx, float* out, float* probs, const float* qkv, i64 batch, i64 seq,
                       i64 n_head, i64 head_dim, i64 n_kv_head = 0,
                       MatmulPrecision precision = MatmulPrecision::Fp32);
// dqkv += gradient (a K/V head's gradient sums over the query heads of its group, in a fixed
// order; dqkv = gradient with dqkv_write Assign); scratch holds batch * n_head * seq * seq
// floats (overwritten).
void attention_backward(Context& ctx, float* dqkv, float* scratch, const float* dout,
                        const float* probs, const float* qkv, i64 batch, i64 seq, i64 n_head,
                        i64 head_dim, i64 n_kv_head = 0,
                        MatmulPrecision precision = MatmulPrecision::Fp32,
                        GradWrite dqkv_write = GradWrite::Add);

// ---- SwiGLU: gu [n, 2 f] = [gate | up], out [n, f] = silu(gate) * up -------------------------
// out_bf16 (optional): the output rounded to bf16 as well, [n, f]; out may then be nullptr.
// gu_bf16 (optional): gu stored in bf16 (a bf16 GEMM's output), read instead of gu (then
// nullptr); the arithmetic is the same, in fp32, on the widened values.
void swiglu_forward(Context& ctx, float* out, const float* gu, i64 n, i64 f,
                    void* out_bf16 = nullptr, const void* gu_bf16 = nullptr);
// dgu += gradient (dgu = gradient with dgu_write Assign). dgu_bf16 (optional): the final dgu
// rounded to bf16, [n, 2 f]; with Assign, dgu may then be nullptr (only the bf16 copy).
// gu_bf16: as in swiglu_forward. dout_bf16 (optional): dout stored in bf16 (a bf16 GEMM's
// din), read instead of dout (then nullptr).
void swiglu_backward(Context& ctx, float* dgu, const float* dout, const float* gu, i64 n, i64 f,
                     GradWrite dgu_write = GradWrite::Add, void* dgu_bf16 = nullptr,
                     const void* gu_bf16 = nullptr, const void* dout_bf16 = nullptr);

// ---- residual stream -------------------------------------------------------------------------
// out = x + delta (out may alias x or delta). Its backward is accumulate(dx, dout) and
// accumulate(ddelta, dout). delta_bf16 (optional): delta stored in bf16 (a bf16 GEMM's
// output, linear_forward's out_bf16), read instead of delta (then nullptr) and widened: the
// residual stream itself stays fp32.
void residual_forward(Context& ctx, float* out, const float* x, const float* delta, i64 count,
                      const void* delta_bf16 = nullptr);
// dst += src.
void accumulate(Context& ctx, float* dst, const float* src, i64 count);

// ---- softmax cross-entropy, forward and backward fused ----------------------------------------
// Device-side results of one cross_entropy call (the loss never travels to the host unless
// asked: read() synchronises the stream).
class CrossEntropyResult {
 public:
  // Room for up to max_rows rows' partial losses.
  explicit CrossEntropyResult(i64 max_rows);
  ~CrossEntropyResult();
  CrossEntropyResult(const CrossEntropyResult&) = delete;
  CrossEntropyResult& operator=(const CrossEntropyResult&) = delete;

  struct Host {
    double loss = 0.0;    // mean over counted rows (0 when none, like the CPU)
    i64 count = 0;        // rows with a target >= 0
    i64 bad_targets = 0;  // rows with a target >= v (the CPU throws; see below)
  };
  // Synchronises ctx's stream and copies the scalars back.
  Host read(Context& ctx) const;

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};
// Like pion::layers::cross_entropy_forward + cross_entropy_backward in one pass over the
// logits [n, v]: lse [n] (may be null) = logsumexp of each row; loss = mean over rows with
// target >= 0 of lse - logits[target] (rows with a negative target are ignored; no counted
// row: loss 0 and no gradient); when dlogits is not null, dlogits += dloss * d(mean
// loss)/dlogits (dlogits = that with dlogits_write Assign: every element is written, zeros on
// the ignored rows, so the buffer needs no zeroing; the same bits as the add into zeros).
// dloss is a kernel argument (a captured graph replays the captured value).
// The CPU throws for a target >= v; checking that here would need a host round trip, so such
// a row is ignored (no loss, no gradient) and counted in bad_targets: callers check
// result.read().bad_targets == 0 (or validate targets on the host before uploading them).
void cross_entropy(Context& ctx, CrossEntropyResult& result, float* lse, float* dlogits,
                   const float* logits, const std::int32_t* targets, i64 n, i64 v, double dloss,
                   GradWrite dlogits_write = GradWrite::Add);
// cross_entropy with dlogits assigned in bf16 (__nv_bfloat16 [n, v] device memory, not null):
// each value is the fp32 gradient cross_entropy assigns, rounded to nearest even, i.e. what
// convert_to_bf16 of it gives. What a Bf16 LM head's linear_backward_bf16 reads as dout, so
// the fp32 dlogits are never written nor converted.
void cross_entropy_bf16(Context& ctx, CrossEntropyResult& result, float* lse, void* dlogits_bf16,
                        const float* logits, const std::int32_t* targets, i64 n, i64 v,
                        double dloss);

// ---- RL: per-target log-probs and the weighted cross-entropy's gradient -----------------------
// What an RL objective (pion/train/backend.h's TargetObjective) needs from a forward, kept on
// the device in double until read: log p(target) and the softmax's entropy of up to max_rows
// rows.
class TargetLogProbs {
 public:
  explicit TargetLogProbs(i64 max_rows);
  ~TargetLogProbs();
  TargetLogProbs(const TargetLogProbs&) = delete;
  TargetLogProbs& operator=(const TargetLogProbs&) = delete;

  // Synchronises ctx's stream and copies the first n (<= max_rows) rows of each into host
  // arrays of n doubles (entropies may be null: not copied).
  void read(Context& ctx, double* log_probs, double* entropies, i64 n) const;

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};
// From the logits [n, v] and their logsumexp lse [n] (cross_entropy's): for each row with a
// target in [0, v), log p(target) = logits[target] - lse, the difference taken in double as the
// CPU's Llama::target_log_probs takes it (so equal fp32 logits give equal bits), and the
// entropy -sum_j p_j log p_j (fp32 terms, summed per thread in fp32 and across threads in
// double: a metric, not differentiated); 0 for both elsewhere.
void target_log_probs(Context& ctx, TargetLogProbs& out, const float* logits, const float* lse,
                      const std::int32_t* targets, i64 n, i64 v);
// dlogits[r] = row_scale[r] (softmax(logits[r]) - onehot(targets[r])) for each row r with a
// target in [0, v) and row_scale[r] != 0, and 0 on every other row: assigned, so the buffer
// needs no zeroing, with the bits pion::layers::weighted_cross_entropy_backward adds into a
// zeroed buffer (row_scale = dloss * weights, rounded to fp32 on the host as the CPU rounds
// it): the gradient of sum_r row_scale[r] (-log p(target_r)). lse [n] as cross_entropy
// computed it.
void weighted_cross_entropy_backward(Context& ctx, float* dlogits, const float* logits,
                                     const float* lse, const std::int32_t* targets,
                                     const float* row_scale, i64 n, i64 v);
// The same dlogits rounded to bf16 (as to_bf16 rounds the fp32 ones), for the LM head's bf16
// GEMMs to read without a conversion pass (cross_entropy_bf16's counterpart).
void weighted_cross_entropy_backward_bf16(Context& ctx, void* dlogits_bf16, const float* logits,
                                          const float* lse, const std::int32_t* targets,
                                          const float* row_scale, i64 n, i64 v);

}  // namespace pion::cuda::layers
