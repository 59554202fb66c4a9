#include "pion/model/mapped_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "pion/core/error.h"

namespace pion {

namespace {

constexpr std::size_t kChunk = std::size_t{1} << 16;

// Calls visit(values, count, first_index) on the entry's values as T, chunk by chunk (the
// mapped bytes need not be aligned for T).
template <class T, class Visit>
void for_each_chunk(const MappedSafetensors& in, const SafetensorsEntry& e, Visit visit) {
  const std::string_view bytes = in.bytes(e);
  const std::size_t n = static_cast<std::size_t>(shape_numel(e.shape));
  const bool f64 = e.dtype == "F64";
  std::vector<T> buf(std::min(kChunk, std::max<std::size_t>(n, 1)));
  for (std::size_t at = 0; at < n; at += kChunk) {
    const std::size_t k = std::min(kChunk, n - at);
    if (f64) {
      for (std::size_t i = 0; i < k; ++i) {
        double v;
        std::memcpy(&v, bytes.data() + 8 * (at + i), 8);
        buf[i] = static_cast<T>(v);
      }
    } else {
      for (std::size_t i = 0; i < k; ++i) {
        float v;
        std::memcpy(&v, bytes.data() + 4 * (at + i), 4);
        buf[i] = static_cast<T>(v);
      }
    }
    visit(buf.data(), k, at);
  }
}

}  // namespace

void check_model_weights(const MappedSafetensors& in, const std::string& prefix,
                         const ModelConfig& config, const std::string& source) {
  const std::vector<ParamEntry> layout = llama_param_layout(config);
  for (const auto& e : layout) {
    const std::string name = prefix + e.name;
    const SafetensorsEntry* t = in.find(name);
    check(t != nullptr, source + ": missing tensor \"" + name +
                            "\" (is this a checkpoint of the same model?)");
    check(t->shape == e.shape, source + ": \"" + name + "\" has shape " + shape_string(t->shape) +
                                   ", the model expects " + shape_string(e.shape));
    check(t->dtype == "F32" || t->dtype == "F64",
          source + ": \"" + name + "\" must be F32 or F64, not " + t->dtype);
    // Finite in the file's own precision (an F64 value beyond float's range is finite here and
    // becomes inf in a Llama<float>, as with the in-memory check).
    std::int64_t bad = -1;
    auto find_bad = [&](const auto* v, std::size_t k, std::size_t at) {
      for (std::size_t i = 0; i < k && bad < 0; ++i)
        if (!std::isfinite(v[i])) bad = static_cast<std::int64_t>(at + i);
    };
    if (t->dtype == "F64")
      for_each_chunk<double>(in, *t, find_bad);
    else
      for_each_chunk<float>(in, *t, find_bad);
    check(bad < 0, source + ": \"" + name + "\" holds a non-finite value (element " +
                       std::to_string(bad) + "); the weights are damaged or the run diverged");
  }
  std::size_t under_prefix = 0;
  for (const auto& t : in.index().entries)
    if (t.name.rfind(prefix, 0) == 0) ++under_prefix;
  check(under_prefix == layout.size(),
        source + ": holds " + std::to_string(under_prefix) + " tensors named \"" + prefix +
            "*\", the model has " + std::to_string(layout.size()) +
            " (a checkpoint of another model shape?)");
}

template <class T>
void load_model_weights(Llama<T>& model, const MappedSafetensors& in, const std::string& prefix,
                        const std::string& source) {
  // Everything is checked before the first value is copied: a bad file changes nothing.
  check_model_weights(in, prefix, model.config(), source);
  for (const auto& e : model.layout()) {
    T* dst = model.params().template data<T>() + e.offset;
    for_each_chunk<T>(in, *in.find(prefix + e.name), [&](const T* v, std::size_t k, std::size_t at) {
      std::copy(v, v + k, dst + at);
    });
  }
}

template void load_model_weights<float>(Llama<float>&, const MappedSafetensors&,
                                        const std::string&, const std::string&);
template void load_model_weights<double>(Llama<double>&, const MappedSafetensors&,
                                         const std::string&, const std::string&);

}  // namespace pion
