#include "pion/core/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "pion/core/error.h"

namespace pion {

namespace {

DType parse_dtype(const std::string& name, const std::string& where) {
  if (name == "F32") return DType::F32;
  if (name == "F64") return DType::F64;
  if (name == "I32") return DType::I32;
  if (name == "U16") return DType::U16;
  throw Error(where + ": unsupported dtype '" + name + "' (pion reads F32, F64, I32, U16)");
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

}  // namespace

void save_safetensors(const std::string& path, const TensorFile& file) {
  nlohmann::json header = nlohmann::json::object();
  if (!file.metadata.empty()) header["__metadata__"] = file.metadata;
  std::size_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    check(t.defined(), "save_safetensors: tensor '" + name + "' is undefined");
    header[name] = {{"dtype", dtype_name(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string header_text = header.dump();
  // Pad the header with spaces so the data starts 8-byte aligned (allowed by the format).
  while ((8 + header_text.size()) % 8 != 0) header_text.push_back(' ');
  const std::uint64_t header_len = header_text.size();

  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Error("cannot create '" + tmp + "': " + std::strerror(errno));
  try {
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(header_len >> (8 * i));
    write_all(fd, reinterpret_cast<const char*>(len_bytes), 8, tmp);
    write_all(fd, header_text.data(), header_text.size(), tmp);
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
  check(header_len <= bytes.size() - 8,
        where + " is corrupt or truncated: header length " + std::to_string(header_len) +
            " exceeds the file size " + std::to_string(bytes.size()));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(header_len));
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + " is corrupt: its header is not valid JSON (" + e.what() + ")");
  }
  check(header.is_object(), where + " is corrupt: its header is not a JSON object");
  const std::uint64_t data_size = bytes.size() - 8 - header_len;
  const char* data = bytes.data() + 8 + header_len;

  TensorFile out;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      check(entry.is_object(), where + ": __metadata__ must be an object of strings");
      for (const auto& [k, v] : entry.items()) {
        check(v.is_string(), where + ": metadata value '" + k + "' is not a string");
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string tw = where + ", tensor '" + name + "'";
    check(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
              entry.contains("data_offsets"),
          tw + ": entry needs dtype, shape and data_offsets");
    check(entry["dtype"].is_string(), tw + ": dtype is not a string");
    DType dtype = parse_dtype(entry["dtype"].get<std::string>(), tw);
    const auto& jshape = entry["shape"];
    const auto& joff = entry["data_offsets"];
    check(jshape.is_array() && jshape.size() <= 8, tw + ": shape must be an array of at most 8 dims");
    check(joff.is_array() && joff.size() == 2 && joff[0].is_number_unsigned() &&
              joff[1].is_number_unsigned(),
          tw + ": data_offsets must be two unsigned integers");
    Shape shape;
    std::uint64_t numel = 1;
    for (const auto& d : jshape) {
      check(d.is_number_unsigned(), tw + ": shape entries must be non-negative integers");
      std::uint64_t v = d.get<std::uint64_t>();
      check(v < (1ULL << 40) && (v == 0 || numel <= (1ULL << 40) / v), tw + ": shape is too large");
      numel *= v;
      shape.push_back(static_cast<std::int64_t>(v));
    }
    const std::uint64_t begin = joff[0].get<std::uint64_t>();
    const std::uint64_t end = joff[1].get<std::uint64_t>();
    check(begin <= end && end <= data_size,
          tw + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
              ") fall outside the " + std::to_string(data_size) + "-byte data section (truncated file?)");
    check(end - begin == numel * dtype_size(dtype),
          tw + ": " + std::to_string(end - begin) + " bytes do not match shape " +
              shape_string(shape) + " of " + dtype_name(dtype));
    Tensor t = Tensor::empty(shape, dtype);
    if (t.nbytes() > 0) std::memcpy(t.raw(), data + begin, t.nbytes());
    out.tensors.emplace(name, std::move(t));
  }
  return out;
}

TensorFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open '" + path + "': " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  check(!in.bad(), "cannot read '" + path + "'");
  return parse_safetensors(ss.str(), path);
}

}  // namespace pion
