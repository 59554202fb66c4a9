#pragma once
// The keys and values of every layer for a fixed number of sequence slots, for incremental
// (inference-only) decoding: plain data, one allocation each for K and V.
//
//   keys / values: [n_layer, slots, n_kv_head, capacity, head_dim] floats, row-major
//   length[s]:     how many positions of slot s hold valid entries (positions 0..length-1)
//
// With grouped-query attention only the n_kv_head K/V heads are stored (the query heads of a
// group read the same entries), so the cache is n_head / n_kv_head times smaller than MHA's.
//
// A slot holds one sequence at a time, left-aligned: its first token is at position 0 (the
// RoPE position the full forward gives it), so sequences of different lengths share the
// cache without padding, and attention reads only a slot's own 0..length-1. capacity is the
// model's seq_len (the RoPE table and training context); see generate.h for what happens
// when a sequence outgrows it. K is stored after RoPE, as the full forward uses it.
#include <cstdint>
#include <vector>

#include "pion/model/config.h"

namespace pion {

struct KvCache {
  int n_layer = 0, n_kv_head = 0, head_dim = 0;  // n_kv_head: ModelConfig::kv_heads()
  int slots = 0;
  int capacity = 0;
  std::vector<float> keys, values;
  std::vector<int> length;  // [slots]

  KvCache() = default;
  // Validates the config; allocates 2 x n_layer x slots x seq_len x kv_dim floats.
  KvCache(const ModelConfig& config, int slots);

  // Bytes a cache of `slots` slots takes for `config` (for sizing a batch before allocating).
  static std::int64_t bytes_for(const ModelConfig& config, int slots);

  // Start of (layer, slot, K/V head)'s [capacity, head_dim] block.
  std::int64_t offset(int layer, int slot, int head) const {
    return ((static_cast<std::int64_t>(layer) * slots + slot) * n_kv_head + head) *
           static_cast<std::int64_t>(capacity) * head_dim;
  }
  float* key(int layer, int slot, int head) { return keys.data() + offset(layer, slot, head); }
  float* value(int layer, int slot, int head) { return values.data() + offset(layer, slot, head); }
  const float* key(int layer, int slot, int head) const {
    return keys.data() + offset(layer, slot, head);
  }
  const float* value(int layer, int slot, int head) const {
    return values.data() + offset(layer, slot, head);
  }
  // Forgets slot s's sequence (its entries are overwritten by the next one).
  void clear(int slot) { length[static_cast<std::size_t>(slot)] = 0; }
};

}  // namespace pion
