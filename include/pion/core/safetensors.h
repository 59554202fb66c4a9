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
#include <string_view>
#include <vector>

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

// One tensor of a file's header, without its data: the dtype as the format spells it (F32,
// F64, BF16, F16, I32, U16: the ones pion can read or convert), the shape, and its byte range
// relative to the data section.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;
  Shape shape;
  std::uint64_t begin = 0, end = 0;
};
struct SafetensorsIndex {
  std::vector<SafetensorsEntry> entries;  // in header order
  std::map<std::string, std::string> metadata;  // without pion's checksum keys
  bool checksummed = false;  // the file carried pion's checksums and they matched
  std::uint64_t data_start = 0;  // where the data section starts in the file (8 + header)
};
// Validates an image of a whole file exactly as parse_safetensors does (header, ranges that
// tile the data section, pion's checksums when present) without copying any tensor.
// parse_safetensors is this plus the copy (and refuses BF16/F16, which Tensor cannot hold).
SafetensorsIndex parse_safetensors_index(std::string_view bytes, const std::string& source);

// A safetensors file mapped read-only (mmap) and validated by parse_safetensors_index, for
// reading large files tensor by tensor: nothing is copied until a tensor is read, and the
// mapped pages are the page cache's, not this process's memory. Model import and export
// (pion/train/hf_checkpoint.h) read weights this way, so a model is never in memory twice.
class MappedSafetensors {
 public:
  explicit MappedSafetensors(const std::string& path);
  ~MappedSafetensors();
  MappedSafetensors(const MappedSafetensors&) = delete;
  MappedSafetensors& operator=(const MappedSafetensors&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsIndex& index() const { return index_; }
  const SafetensorsEntry* find(const std::string& name) const;  // nullptr when absent
  std::string_view bytes(const SafetensorsEntry& entry) const;
  // The entry's values as fp32 into dst (shape_numel(entry.shape) floats): F32 copied, BF16
  // and F16 widened exactly, F64 rounded to nearest; an integer dtype is an error.
  void read_f32(const SafetensorsEntry& entry, float* dst) const;

 private:
  std::string path_;
  const char* data_ = nullptr;
  std::size_t size_ = 0;
  SafetensorsIndex index_;
};

// `n` little-endian values of safetensors dtype `dtype` (F32, F64, BF16, F16) at `src` as fp32
// into `dst`; `where` names the tensor in the error for any other dtype.
void convert_to_f32(const std::string& dtype, const char* src, std::size_t n, float* dst,
                    const std::string& where);
// fp32 to bfloat16 / IEEE half, rounding to nearest even (overflow to infinity, NaN kept).
std::uint16_t f32_to_bf16(float value);
std::uint16_t f32_to_f16(float value);

// CRC-32 (zlib's polynomial) of `size` bytes, continuing from `crc` (0 to start).
std::uint32_t crc32_of(const void* data, std::size_t size, std::uint32_t crc = 0);

}  // namespace pion
