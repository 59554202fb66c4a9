#pragma once
// safetensors files (https://huggingface.co/docs/safetensors): 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}},
// then the raw little-endian data.
//
// The reader enforces the format exactly before it allocates or copies anything: the header
// is at most 100 MB of JSON with unique names, each tensor's byte range matches its shape
// and dtype, and the ranges tile the data section with no gap and no overlap, so the file's
// size is exactly 8 + header + data. Anything else is a pion::Error naming the file and the
// tensor, never a crash and never a silently wrong tensor.
//
// Checksums: every file pion writes carries, in its metadata, a CRC-32 of each tensor's bytes
// ("pion.tensor_crc32": a JSON object name -> 8 hex digits) and one of the whole file
// ("pion.file_crc32": computed with its own 8 digits set to '0'). The reader verifies both
// when present (a flipped bit in a tensor is reported by the tensor's name; one in the header
// as header damage), so pion's checkpoints detect damage, while files from elsewhere, without
// checksums, still load (TensorFile::checksummed says which kind was read).
//
// The writer is atomic: it writes `path.tmp`, fsyncs, then renames over `path`.
#include <cstdint>
#include <map>
#include <string>

#include "pion/core/tensor.h"

namespace pion {

struct TensorFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
  // Set by the reader: the file carried pion's checksums and they matched.
  bool checksummed = false;
};

// Metadata keys the writer fills in (they are not kept in a loaded TensorFile's metadata).
inline constexpr const char* kTensorCrcKey = "pion.tensor_crc32";
inline constexpr const char* kFileCrcKey = "pion.file_crc32";

void save_safetensors(const std::string& path, const TensorFile& file);
TensorFile load_safetensors(const std::string& path);
// Parses an in-memory image of a file; `source` names it in error messages.
TensorFile parse_safetensors(const std::string& bytes, const std::string& source);
// The image save_safetensors writes, in memory (for sending state between processes).
std::string serialize_safetensors(const TensorFile& file);

// CRC-32 (zlib's polynomial) of `size` bytes, continuing from `crc` (0 to start).
std::uint32_t crc32_of(const void* data, std::size_t size, std::uint32_t crc = 0);

}  // namespace pion
