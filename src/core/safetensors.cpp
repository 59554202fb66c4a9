#include "pion/core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string_view>
#include <vector>

#include "pion/core/error.h"
#include "pion/core/input.h"

namespace pion {

namespace {

// A header is at most 4 levels deep: {name: {shape: [dims]}} and {__metadata__: {k: "v"}}.
constexpr int kHeaderDepth = 4;
constexpr const char* kZeroCrc = "00000000";

// Element size of a dtype the index accepts; 0 for any other name.
std::size_t index_dtype_size(const std::string& name) {
  if (name == "F32" || name == "I32") return 4;
  if (name == "F64") return 8;
  if (name == "U16" || name == "BF16" || name == "F16") return 2;
  return 0;
}

DType tensor_dtype(const std::string& name, const std::string& where) {
  if (name == "F32") return DType::F32;
  if (name == "F64") return DType::F64;
  if (name == "I32") return DType::I32;
  if (name == "U16") return DType::U16;
  throw Error(where + ": unsupported dtype " + input::describe(name) +
              " (pion reads F32, F64, I32, U16)");
}

std::string hex32(std::uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

bool is_hex32(const std::string& s) {
  return s.size() == 8 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

std::string length_bytes(std::uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>(n >> (8 * i));
  return out;
}

// The file-checksum field as the writer spells it, followed by its 8 hex digits.
std::string file_crc_field() {
  return std::string("\"") + kFileCrcKey + "\":\"";
}

// The length prefix and header text (padded so the data starts 8-byte aligned), with both
// checksums filled in.
std::string encode_prefix(const TensorFile& file) {
  nlohmann::json header = nlohmann::json::object();
  nlohmann::json crcs = nlohmann::json::object();
  std::size_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    check(t.defined(), "save_safetensors: tensor '" + name + "' is undefined");
    header[name] = {{"dtype", dtype_name(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
    crcs[name] = hex32(crc32_of(t.raw(), t.nbytes()));
  }
  nlohmann::json meta = file.metadata;
  meta[kTensorCrcKey] = crcs.dump();
  meta[kFileCrcKey] = kZeroCrc;
  header["__metadata__"] = meta;
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  // A header our reader (and Hugging Face's) would refuse is refused here, before a byte is
  // written: a file that cannot be loaded back is worse than none.
  check(text.size() <= input::kMaxSafetensorsHeader,
        "save_safetensors: the header (tensor table and metadata) would be " +
            std::to_string(text.size()) +
            " bytes, above the format's 100 MB limit; nothing was written");
  std::string prefix = length_bytes(text.size()) + text;
  // The file checksum covers every byte with its own digits read as "00000000".
  const std::size_t at = prefix.find(file_crc_field());
  std::uint32_t crc = crc32_of(prefix.data(), prefix.size());
  for (const auto& [name, t] : file.tensors) crc = crc32_of(t.raw(), t.nbytes(), crc);
  const std::string digits = hex32(crc);
  prefix.replace(at + file_crc_field().size(), 8, digits);
  return prefix;
}

void write_all(int fd, const char* data, std::size_t size, const std::string& path) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error("cannot write '" + path + "': " + std::strerror(errno) +
                  " (is the disk full? the previous file, if any, is untouched)");
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

using Entry = SafetensorsEntry;

Entry parse_entry(const std::string& name, const nlohmann::json& entry, std::uint64_t data_size,
                  const std::string& where) {
  const std::string tw = where + ", tensor " + input::describe(name);
  check(entry.is_object() && entry.size() == 3 && entry.contains("dtype") &&
            entry.contains("shape") && entry.contains("data_offsets"),
        tw + ": the entry must hold exactly dtype, shape and data_offsets");
  Entry e{name, input::to_string(entry["dtype"], 16, tw + " dtype"), {}, 0, 0};
  const std::size_t element = index_dtype_size(e.dtype);
  check(element > 0, tw + ": unsupported dtype " + input::describe(e.dtype) +
                         " (pion reads F32, F64, BF16, F16, I32, U16)");
  const auto& jshape = entry["shape"];
  const auto& joff = entry["data_offsets"];
  check(jshape.is_array() && jshape.size() <= 8, tw + ": shape must be an array of at most 8 dims");
  check(joff.is_array() && joff.size() == 2, tw + ": data_offsets must be two integers");
  std::uint64_t numel = 1;
  for (const auto& d : jshape) {
    const auto v = static_cast<std::uint64_t>(input::to_int(d, 0, std::int64_t{1} << 40, tw + " shape"));
    check(v == 0 || numel <= (std::uint64_t{1} << 40) / v, tw + ": shape is too large");
    numel *= v;
    e.shape.push_back(static_cast<std::int64_t>(v));
  }
  e.begin = input::to_uint64(joff[0], tw + " data_offsets[0]");
  e.end = input::to_uint64(joff[1], tw + " data_offsets[1]");
  check(e.begin <= e.end && e.end <= data_size,
        tw + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
            ") fall outside the " + std::to_string(data_size) +
            "-byte data section (truncated file?)");
  check(e.end - e.begin == numel * element,
        tw + ": " + std::to_string(e.end - e.begin) + " bytes do not match shape " +
            shape_string(e.shape) + " of " + e.dtype);
  return e;
}

// Checks pion's checksums (see the header); returns whether the file carried them.
bool verify_checksums(std::string_view bytes, std::string_view header_text,
                      const std::vector<Entry>& entries, const char* data,
                      std::map<std::string, std::string>& metadata, const std::string& where) {
  const auto file_it = metadata.find(kFileCrcKey);
  const auto tensor_it = metadata.find(kTensorCrcKey);
  if (file_it == metadata.end() && tensor_it == metadata.end()) return false;
  const std::string damaged = " (the file was damaged on disk or in transfer; use another copy)";
  check(file_it != metadata.end() && tensor_it != metadata.end(),
        where + " is damaged: it carries only one of pion's two checksum fields" + damaged);
  const nlohmann::json crcs =
      input::parse_json(tensor_it->second, where + " metadata " + kTensorCrcKey, input::kMaxJsonBytes, 2);
  check(crcs.is_object() && crcs.size() == entries.size(),
        where + " is damaged: its tensor checksums do not list exactly its tensors" + damaged);
  for (const auto& e : entries) {
    auto it = crcs.find(e.name);
    check(it != crcs.end() && it->is_string() && is_hex32(it->get<std::string>()),
          where + " is damaged: tensor " + input::describe(e.name) + " has no valid checksum" + damaged);
    const std::uint32_t crc = crc32_of(data + e.begin, e.end - e.begin);
    check(hex32(crc) == it->get<std::string>(),
          where + ": tensor " + input::describe(e.name) + " is damaged (its bytes fail their CRC-32)" +
              damaged);
  }
  const std::string& digits = file_it->second;
  const std::string field = file_crc_field() + digits + "\"";
  const std::size_t at = header_text.find(field);
  check(is_hex32(digits) && at != std::string_view::npos &&
            header_text.find(field, at + 1) == std::string_view::npos,
        where + " is damaged: its file checksum field is malformed" + damaged);
  const std::size_t digits_at = 8 + at + file_crc_field().size();
  std::uint32_t crc = crc32_of(bytes.data(), digits_at);
  crc = crc32_of(kZeroCrc, 8, crc);
  crc = crc32_of(bytes.data() + digits_at + 8, bytes.size() - digits_at - 8, crc);
  check(hex32(crc) == digits,
        where + ": the header or metadata is damaged (the file fails its CRC-32)" + damaged);
  metadata.erase(kFileCrcKey);
  metadata.erase(kTensorCrcKey);
  return true;
}

}  // namespace

std::uint32_t crc32_of(const void* data, std::size_t size, std::uint32_t crc) {
  return static_cast<std::uint32_t>(
      ::crc32_z(crc, static_cast<const Bytef*>(data), static_cast<z_size_t>(size)));
}

std::string serialize_safetensors(const TensorFile& file) {
  std::string out = encode_prefix(file);
  for (const auto& [name, t] : file.tensors)
    out.append(reinterpret_cast<const char*>(t.raw()), t.nbytes());
  return out;
}

void save_safetensors(const std::string& path, const TensorFile& file) {
  const std::string prefix = encode_prefix(file);
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Error("cannot create '" + tmp + "': " + std::strerror(errno));
  try {
    write_all(fd, prefix.data(), prefix.size(), tmp);
    for (const auto& [name, t] : file.tensors)
      write_all(fd, reinterpret_cast<const char*>(t.raw()), t.nbytes(), tmp);
    if (::fsync(fd) != 0) throw Error("cannot sync '" + tmp + "': " + std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw Error("cannot close '" + tmp + "': " + std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw Error("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno));
  }
}

SafetensorsIndex parse_safetensors_index(std::string_view bytes, const std::string& source) {
  const std::string where = "safetensors file '" + source + "'";
  check(bytes.size() >= 8, where + " is too short (" + std::to_string(bytes.size()) +
                               " bytes) to hold a header; is it a safetensors file?");
  std::uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i)
    header_len |= static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  check(header_len <= input::kMaxSafetensorsHeader,
        where + " is corrupt or not a safetensors file: its header length " +
            std::to_string(header_len) + " exceeds the format's 100 MB limit");
  check(header_len <= bytes.size() - 8,
        where + " is corrupt or truncated: header length " + std::to_string(header_len) +
            " exceeds the file size " + std::to_string(bytes.size()));
  const std::string_view header_text(bytes.data() + 8, static_cast<std::size_t>(header_len));
  const nlohmann::json header =
      input::parse_json(header_text, where + " header", input::kMaxSafetensorsHeader, kHeaderDepth);
  check(header.is_object(), where + " is corrupt: its header is not a JSON object");
  const std::uint64_t data_size = bytes.size() - 8 - header_len;
  const char* data = bytes.data() + 8 + header_len;

  SafetensorsIndex out;
  out.data_start = 8 + header_len;
  std::vector<Entry>& entries = out.entries;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      check(entry.is_object(), where + ": __metadata__ must be an object of strings");
      for (const auto& [k, v] : entry.items())
        out.metadata[k] = input::to_string(v, input::kMaxSafetensorsHeader, where + " metadata " + input::describe(k));
      continue;
    }
    entries.push_back(parse_entry(name, entry, data_size, where));
  }
  // The byte ranges must tile the data section exactly: sorted by start, each begins where
  // the previous ended, and the last ends at the end of the file.
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t expect = 0;
  for (const Entry* e : by_offset) {
    check(e->begin == expect,
          where + " is corrupt: tensor " + input::describe(e->name) + " starts at byte " +
              std::to_string(e->begin) + " of the data section, expected " +
              std::to_string(expect) + (e->begin < expect ? " (it overlaps another tensor)" : " (a gap)"));
    expect = e->end;
  }
  check(expect == data_size, where + " is corrupt: " + std::to_string(data_size - expect) +
                                 " bytes after the last tensor (header length or data damaged)");
  out.checksummed = verify_checksums(bytes, header_text, entries, data, out.metadata, where);
  return out;
}

TensorFile parse_safetensors(const std::string& bytes, const std::string& source) {
  const std::string where = "safetensors file '" + source + "'";
  SafetensorsIndex index = parse_safetensors_index(bytes, source);
  TensorFile out;
  out.metadata = std::move(index.metadata);
  out.checksummed = index.checksummed;
  std::vector<DType> dtypes;
  for (const auto& e : index.entries)
    dtypes.push_back(tensor_dtype(e.dtype, where + ", tensor " + input::describe(e.name)));
  const char* data = bytes.data() + index.data_start;
  for (std::size_t i = 0; i < index.entries.size(); ++i) {
    const Entry& e = index.entries[i];
    Tensor t = Tensor::empty(e.shape, dtypes[i]);
    if (t.nbytes() > 0) std::memcpy(t.raw(), data + e.begin, t.nbytes());
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

// ---- MappedSafetensors ----------------------------------------------------------------------

MappedSafetensors::MappedSafetensors(const std::string& path) : path_(path) {
  const std::uint64_t size = input::regular_file_size(path, "safetensors file");
  check(size >= 8, "safetensors file '" + path + "' is too short (" + std::to_string(size) +
                       " bytes) to hold a header; is it a safetensors file?");
  check(size <= (std::uint64_t{1} << 40),
        "safetensors file '" + path + "' is larger than 1 TiB; refusing it");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  check(fd >= 0, "cannot open '" + path + "': " + std::strerror(errno));
  void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
  const int mmap_errno = errno;
  ::close(fd);  // the mapping keeps the file
  check(p != MAP_FAILED, "cannot map '" + path + "': " + std::strerror(mmap_errno));
  data_ = static_cast<const char*>(p);
  size_ = static_cast<std::size_t>(size);
  try {
    index_ = parse_safetensors_index(std::string_view(data_, size_), path);
  } catch (...) {
    ::munmap(const_cast<char*>(data_), size_);
    throw;
  }
}

MappedSafetensors::~MappedSafetensors() {
  if (data_ != nullptr) ::munmap(const_cast<char*>(data_), size_);
}

const SafetensorsEntry* MappedSafetensors::find(const std::string& name) const {
  for (const auto& e : index_.entries)
    if (e.name == name) return &e;
  return nullptr;
}

std::string_view MappedSafetensors::bytes(const SafetensorsEntry& e) const {
  return {data_ + index_.data_start + e.begin, static_cast<std::size_t>(e.end - e.begin)};
}

void MappedSafetensors::read_f32(const SafetensorsEntry& e, float* dst) const {
  const std::string_view b = bytes(e);
  convert_to_f32(e.dtype, b.data(), static_cast<std::size_t>(shape_numel(e.shape)), dst,
                 "safetensors file '" + path_ + "', tensor " + input::describe(e.name));
}

// ---- dtype conversion ------------------------------------------------------------------------

namespace {

float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: man * 2^-24, exact in fp32
      const float v = static_cast<float>(man) * 0x1p-24f;
      std::memcpy(&bits, &v, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace

void convert_to_f32(const std::string& dtype, const char* src, std::size_t n, float* dst,
                    const std::string& where) {
  if (dtype == "F32") {
    if (n > 0) std::memcpy(dst, src, n * 4);
  } else if (dtype == "F64") {
    for (std::size_t i = 0; i < n; ++i) {
      double v;
      std::memcpy(&v, src + 8 * i, 8);
      dst[i] = static_cast<float>(v);
    }
  } else if (dtype == "BF16") {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
      std::memcpy(dst + i, &bits, 4);
    }
  } else if (dtype == "F16") {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      dst[i] = f16_to_f32(h);
    }
  } else {
    throw Error(where + ": dtype " + input::describe(dtype) +
                " is not a floating-point type pion converts (F32, F64, BF16, F16)");
  }
}

std::uint16_t f32_to_bf16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<std::uint16_t>(bits >> 16);
}

std::uint16_t f32_to_f16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Below the smallest normal half (2^-14): a subnormal multiple of 2^-24, rounded to
    // nearest even by the fp32 addition of 0.5 (exact: the magnitude is below 2^-14).
    float a;
    std::memcpy(&a, &abs, 4);
    const float scaled = a * 0x1p24f;  // in [0, 1024): the subnormal's mantissa
    const float rounded = std::nearbyint(scaled);
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(rounded));
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  std::uint32_t h = ((abs >> 13) - (112u << 10));
  const std::uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return static_cast<std::uint16_t>(sign | h);
}

TensorFile load_safetensors(const std::string& path) {
  // A safetensors file is no bigger than its header and tensors; 1 TiB bounds nonsense.
  return parse_safetensors(input::read_file(path, std::uint64_t{1} << 40, "safetensors file"), path);
}

}  // namespace pion
