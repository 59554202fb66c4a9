#include "pion/data/text_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "pion/core/error.h"
#include "pion/core/input.h"

namespace pion {

namespace {

std::string hex_byte(unsigned char b) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%02X", b);
  return buf;
}

// Decodes the sequence at text[i]. Returns its length in bytes and sets *cp, or returns 0 when
// the bytes at i do not start a valid, shortest-form UTF-8 encoding of a scalar value.
std::size_t decode_one(std::string_view text, std::size_t i, char32_t* cp) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char b0 = byte(i);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  std::size_t len = 0;
  char32_t value = 0;
  char32_t min_value = 0;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, value = b0 & 0x1F, min_value = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, value = b0 & 0x0F, min_value = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, value = b0 & 0x07, min_value = 0x10000;
  } else {
    return 0;  // a continuation byte or 0xF8..0xFF cannot start a sequence
  }
  if (i + len > text.size()) return 0;
  for (std::size_t k = 1; k < len; ++k) {
    const unsigned char b = byte(i + k);
    if ((b & 0xC0) != 0x80) return 0;
    value = (value << 6) | (b & 0x3F);
  }
  if (value < min_value || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return 0;
  *cp = value;
  return len;
}

}  // namespace

void validate_utf8(std::string_view text, const std::string& source) {
  std::size_t line = 1;
  for (std::size_t i = 0; i < text.size();) {
    char32_t cp = 0;
    const std::size_t len = decode_one(text, i, &cp);
    if (len == 0) {
      throw Error(
          source + " is not valid UTF-8: bad byte " +
          hex_byte(static_cast<unsigned char>(text[i])) + " at byte offset " + std::to_string(i) +
          " (line " + std::to_string(line) +
          "). Convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`.");
    }
    if (cp == '\n') ++line;
    i += len;
  }
}

std::string read_file_bytes(const std::string& path, std::uint64_t max_bytes,
                            const std::string& what) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw Error(what + " '" + path + "' does not exist");
  // A regular file of at most max_bytes: a device (/dev/zero), a FIFO or a directory is refused
  // by name before anything is read.
  return input::read_file(path, max_bytes, what);
}

std::string read_text_file(const std::string& path) {
  std::string text = read_file_bytes(path, kMaxTextBytes, "text file");
  if (text.empty())
    throw Error("text file '" + path + "' is empty; give a file with some text in it");
  validate_utf8(text, "text file '" + path + "'");
  return text;
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Error("cannot create '" + tmp + "': " + std::strerror(errno));
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string why = std::strerror(errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      throw Error("cannot write '" + tmp + "': " + why);
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw Error("cannot finish writing '" + tmp + "': " + why);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw Error("cannot rename '" + tmp + "' to '" + path + "': " + why);
  }
}

std::vector<char32_t> utf8_code_points(std::string_view text) {
  std::vector<char32_t> out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size();) {
    char32_t cp = 0;
    const std::size_t len = decode_one(text, i, &cp);
    if (len == 0) validate_utf8(text.substr(i), "text");  // throws with the details
    out.push_back(cp);
    i += len;
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  check(cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF),
        "append_utf8: " + std::to_string(static_cast<std::uint32_t>(cp)) +
            " is not a Unicode scalar value");
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::size_t utf8_offset_of_code_point(std::string_view text, std::size_t n) {
  std::size_t i = 0;
  for (std::size_t k = 0; k < n && i < text.size(); ++k) {
    char32_t cp = 0;
    const std::size_t len = decode_one(text, i, &cp);
    if (len == 0) validate_utf8(text.substr(i), "text");
    i += len;
  }
  return i;
}

std::size_t utf8_length(std::string_view text) {
  // Every code point has exactly one byte that is not a continuation byte (10xxxxxx).
  std::size_t n = 0;
  for (char c : text) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

std::string describe_code_point(char32_t cp) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "U+%04X", static_cast<unsigned>(cp));
  std::string out = buf;
  const bool control = cp < 0x20 || cp == 0x7F || (cp >= 0x80 && cp < 0xA0);
  if (!control) {
    out += " '";
    append_utf8(out, cp);
    out += "'";
  }
  return out;
}

namespace {
constexpr std::string_view kBase64Alphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}

std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (std::size_t i = 0; i < bytes.size(); i += 3) {
    const std::size_t n = std::min<std::size_t>(3, bytes.size() - i);
    std::uint32_t group = 0;
    for (std::size_t k = 0; k < 3; ++k)
      group = (group << 8) | (k < n ? static_cast<unsigned char>(bytes[i + k]) : 0u);
    for (std::size_t k = 0; k < 4; ++k)
      out.push_back(k <= n ? kBase64Alphabet[(group >> (18 - 6 * k)) & 0x3F] : '=');
  }
  return out;
}

std::string base64_decode(std::string_view text, const std::string& source) {
  check(text.size() % 4 == 0, source + ": base64 length " + std::to_string(text.size()) +
                                  " is not a multiple of 4; the data is truncated or corrupt");
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (std::size_t i = 0; i < text.size(); i += 4) {
    std::uint32_t group = 0;
    std::size_t padding = 0;
    for (std::size_t k = 0; k < 4; ++k) {
      const char c = text[i + k];
      std::uint32_t value = 0;
      if (c == '=' && i + 4 == text.size() && k >= 2) {
        ++padding;
      } else {
        const std::size_t pos = kBase64Alphabet.find(c);
        check(pos != std::string_view::npos && padding == 0,
              source + ": invalid base64 character at offset " + std::to_string(i + k));
        value = static_cast<std::uint32_t>(pos);
      }
      group = (group << 6) | value;
    }
    for (std::size_t k = 0; k < 3 - padding; ++k)
      out.push_back(static_cast<char>((group >> (16 - 8 * k)) & 0xFF));
  }
  return out;
}

}  // namespace pion
