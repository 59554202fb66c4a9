#include "pion/model/decode_engine.h"

#include <string>

#include "pion/core/error.h"

namespace pion {

CpuDecodeEngine::CpuDecodeEngine(Llama<float>& model, int slots)
    : model_(model), cache_(model.config(), slots), decoder_(model) {}

int CpuDecodeEngine::length(int slot) const {
  check(slot >= 0 && slot < cache_.slots, "CpuDecodeEngine: slot " + std::to_string(slot) +
                                              " outside [0, " + std::to_string(cache_.slots) + ")");
  return cache_.length[static_cast<std::size_t>(slot)];
}

void CpuDecodeEngine::clear(int slot) {
  length(slot);  // the range check
  cache_.clear(slot);
}

std::span<const float> CpuDecodeEngine::extend(std::span<const DecodeChunk> chunks,
                                               bool all_positions) {
  return decoder_.extend(cache_, chunks, all_positions);
}

}  // namespace pion
