#include "pion/model/kv_cache.h"

#include <string>

#include "pion/core/error.h"

namespace pion {

std::int64_t KvCache::bytes_for(const ModelConfig& config, int slots) {
  return 2 * static_cast<std::int64_t>(config.n_layer) * slots * config.seq_len * config.kv_dim() *
         static_cast<std::int64_t>(sizeof(float));
}

KvCache::KvCache(const ModelConfig& config, int slot_count)
    : n_layer(config.n_layer),
      n_kv_head(config.kv_heads()),
      head_dim(0),
      slots(slot_count),
      capacity(config.seq_len) {
  config.validate();
  check(slot_count > 0, "KvCache: slots must be positive (got " + std::to_string(slot_count) + ")");
  head_dim = config.head_dim();
  const auto n = static_cast<std::size_t>(bytes_for(config, slot_count) / 2 /
                                          static_cast<std::int64_t>(sizeof(float)));
  keys.assign(n, 0.0f);
  values.assign(n, 0.0f);
  length.assign(static_cast<std::size_t>(slot_count), 0);
}

}  // namespace pion
