#include "pion/core/safetensors.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
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

DType parse_dtype(const std::string& name, const std::string& where) {
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

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  std::uint64_t begin, end;
};

Entry parse_entry(const std::string& name, const nlohmann::json& entry, std::uint64_t data_size,
                  const std::string& where) {
  const std::string tw = where + ", tensor " + input::describe(name);
  check(entry.is_object() && entry.size() == 3 && entry.contains("dtype") &&
            entry.contains("shape") && entry.contains("data_offsets"),
        tw + ": the entry must hold exactly dtype, shape and data_offsets");
  Entry e{name, parse_dtype(input::to_string(entry["dtype"], 16, tw + " dtype"), tw), {}, 0, 0};
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
  check(e.end - e.begin == numel * dtype_size(e.dtype),
        tw + ": " + std::to_string(e.end - e.begin) + " bytes do not match shape " +
            shape_string(e.shape) + " of " + dtype_name(e.dtype));
  return e;
}

// Checks pion's checksums (see the header); returns whether the file carried them.
bool verify_checksums(const std::string& bytes, std::string_view header_text,
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

TensorFile parse_safetensors(const std::string& bytes, const std::string& source) {
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

  TensorFile out;
  std::vector<Entry> entries;
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
  for (const auto& e : entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    if (t.nbytes() > 0) std::memcpy(t.raw(), data + e.begin, t.nbytes());
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

TensorFile load_safetensors(const std::string& path) {
  // A safetensors file is no bigger than its header and tensors; 1 TiB bounds nonsense.
  return parse_safetensors(input::read_file(path, std::uint64_t{1} << 40, "safetensors file"), path);
}

}  // namespace pion
