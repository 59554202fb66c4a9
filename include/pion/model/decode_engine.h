#pragma once
// The device-independent face of incremental decoding: a fixed number of cache slots, each
// holding one left-aligned sequence, and extend(), which appends chunks of tokens to slots
// and returns the logits after them on the host (decode.h's Decoder::extend, as a virtual
// call). generate_tokens (generate.h) schedules slots, slides the context window, samples
// and stops over this interface, so that logic is written once and runs on every device:
//
//   CpuDecodeEngine            Llama<float> through Decoder + KvCache (this header)
//   cuda::CudaDecoder          CudaLlama on the GPU (pion/cuda/generate.h)
//
// Both check and lay out a call's chunks with decode.h's plan_decode, so their errors (a token
// out of range, a chunk over the slot's capacity, a slot twice) are the same.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pion/model/config.h"
#include "pion/model/decode.h"
#include "pion/model/kv_cache.h"
#include "pion/model/llama.h"

namespace pion {

class DecodeEngine {
 public:
  virtual ~DecodeEngine() = default;

  virtual const ModelConfig& config() const = 0;
  virtual int slots() const = 0;
  // Positions a slot holds (the model's seq_len: the RoPE table and training context).
  virtual int capacity() const = 0;
  // Positions of slot s that hold a sequence's entries.
  virtual int length(int slot) const = 0;
  // Forgets slot s's sequence (length 0; the next chunk overwrites its entries).
  virtual void clear(int slot) = 0;
  // As Decoder::extend: runs the chunks (checked by plan_decode; pion::Error otherwise),
  // stores their keys and values, advances the slots' lengths and returns host logits
  // [rows, vocab]: one row per chunk (after its last token), or with all_positions one per
  // token, chunk after chunk. The span is valid until the next call.
  virtual std::span<const float> extend(std::span<const DecodeChunk> chunks,
                                        bool all_positions = false) = 0;
};

// The CPU engine: Decoder over a KvCache of `slots` slots. Reads the model's weights at every
// call (training between calls is seen); the model must outlive the engine.
class CpuDecodeEngine final : public DecodeEngine {
 public:
  CpuDecodeEngine(Llama<float>& model, int slots);

  const ModelConfig& config() const override { return model_.config(); }
  int slots() const override { return cache_.slots; }
  int capacity() const override { return cache_.capacity; }
  int length(int slot) const override;
  void clear(int slot) override;
  std::span<const float> extend(std::span<const DecodeChunk> chunks,
                                bool all_positions = false) override;

  const KvCache& cache() const { return cache_; }

 private:
  Llama<float>& model_;
  KvCache cache_;
  Decoder decoder_;
};

}  // namespace pion
