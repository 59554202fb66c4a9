// libFuzzer target: pion::parse_safetensors over arbitrary bytes, and the index parser the
// mmap-backed reader uses (parse_safetensors_index: BF16/F16 entries too, what `pion import-hf`
// reads), each of its floating-point entries converted to fp32 as the import does. A pion::Error is the
// expected answer to a bad file; any other exception, a sanitizer report, a leak or a hang
// is a bug.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "pion/core/error.h"
#include "pion/core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    const pion::TensorFile file = pion::parse_safetensors(bytes, "fuzz.safetensors");
    // Touch what was read so the sanitizers see every tensor's bytes.
    std::size_t sum = 0;
    for (const auto& [name, t] : file.tensors) {
      const auto* p = reinterpret_cast<const unsigned char*>(t.raw());
      for (std::size_t i = 0; i < t.nbytes(); ++i) sum += p[i];
      sum += name.size();
    }
    for (const auto& [k, v] : file.metadata) sum += k.size() + v.size();
    volatile std::size_t sink = sum;
    (void)sink;
  } catch (const pion::Error&) {
  }
  try {
    const pion::SafetensorsIndex index = pion::parse_safetensors_index(bytes, "fuzz.safetensors");
    float sum = 0.0f;
    for (const auto& e : index.entries) {
      if (e.dtype == "I32" || e.dtype == "U16") continue;
      std::vector<float> values(static_cast<std::size_t>(pion::shape_numel(e.shape)));
      pion::convert_to_f32(e.dtype, bytes.data() + index.data_start + e.begin, values.size(),
                           values.data(), e.name);
      for (float v : values) sum += v;
    }
    volatile float sink = sum;
    (void)sink;
  } catch (const pion::Error&) {
  }
  return 0;
}
