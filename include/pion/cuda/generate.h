#pragma once
// Generating tokens with the GPU model: CudaDecoder, the DecodeEngine (pion/model/
// decode_engine.h) of a CudaLlama, keeps the KV cache on the device and runs each extend()
// there; only the logits of the rows that need them travel to the host, where the shared
// generate_tokens (pion/model/generate.h) samples, slides windows and stops, exactly as for
// the CPU model.
//
//   cuda::Context ctx;  cuda::CudaLlama model(ctx, config, options);  // trained, or uploaded
//   auto out = cuda::generate_tokens(model, prompts, gen_options, rngs);
//
// The decoder reads the model's device parameters at every call (no host copy), so training
// steps between calls are seen, and queues its work on the model's stream
// (CudaLlama::context()), after whatever the model queued before. It is the CPU Decoder's
// computation (src/model/decode.cpp) with the GPU model's layers: the rows of all chunks
// stacked through the same GEMMs (the model's MatmulPrecision), RoPE at each row's own
// position, and a decode-attention kernel where each row attends to positions 0..its own of
// its own slot (cuda/model/decode.cu). With fp32 GEMMs its logits are the CPU Decoder's up to
// float rounding (tests/test_cuda_generate.cpp).
//
// Host C++ without CUDA types; built into pion_gpu (cuda/model/generate_cuda.cpp) only when
// the CUDA back end is.
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "pion/cuda/llama.h"
#include "pion/model/decode_engine.h"
#include "pion/model/generate.h"

namespace pion::cuda {

class CudaDecoder final : public DecodeEngine {
 public:
  // A device cache of `slots` slots (> 0) of the model's seq_len positions each:
  // KvCache::bytes_for(config, slots) bytes, [layer][slot][n_kv_head][seq_len][head_dim] for
  // keys and for values. The model must outlive the decoder.
  CudaDecoder(CudaLlama& model, int slots);
  ~CudaDecoder() override;
  CudaDecoder(const CudaDecoder&) = delete;
  CudaDecoder& operator=(const CudaDecoder&) = delete;

  const ModelConfig& config() const override;
  int slots() const override;
  int capacity() const override;
  int length(int slot) const override;
  void clear(int slot) override;
  // DecodeEngine::extend (errors from plan_decode, before anything runs on the device). The
  // host logits are a copy made at the end of the call (it synchronises the stream).
  std::span<const float> extend(std::span<const DecodeChunk> chunks,
                                bool all_positions = false) override;

  // Bytes of device memory the decoder holds (cache and the scratch grown so far).
  std::size_t device_bytes() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// pion::generate_tokens on a CudaDecoder over `model` with generation_slots(...) slots: the
// same arguments, checks and results (with per-prompt rngs or greedy decoding, the tokens of
// the CPU model wherever the two devices' logits pick the same tokens).
std::vector<Generation> generate_tokens(CudaLlama& model,
                                        std::span<const std::vector<std::int32_t>> prompts,
                                        const GenerateOptions& options, std::span<Rng> rngs);

}  // namespace pion::cuda
