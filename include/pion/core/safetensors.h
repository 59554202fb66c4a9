#pragma once
// safetensors files (https://huggingface.co/docs/safetensors): 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}},
// then the raw little-endian data. The reader checks every size and offset against the file
// before touching data, so a corrupt or truncated file gives a pion::Error, never a crash.
// The writer is atomic: it writes `path.tmp`, fsyncs, then renames over `path`.
#include <map>
#include <string>

#include "pion/core/tensor.h"

namespace pion {

struct TensorFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

void save_safetensors(const std::string& path, const TensorFile& file);
TensorFile load_safetensors(const std::string& path);
// Parses an in-memory image of a file; `source` names it in error messages.
TensorFile parse_safetensors(const std::string& bytes, const std::string& source);

}  // namespace pion
