#include "pion/core/input.h"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "pion/core/error.h"

namespace pion::input {

namespace {

std::string bytes_text(std::uint64_t n) {
  if (n >= (1ULL << 30) && n % (1ULL << 30) == 0) return std::to_string(n >> 30) + " GiB";
  if (n >= (1ULL << 20) && n % (1ULL << 20) == 0) return std::to_string(n >> 20) + " MiB";
  return std::to_string(n) + " bytes";
}

// Thrown from inside the parser's callback; turned into a pion::Error by parse_json.
struct JsonLimit {
  std::string message;
};

std::string number_text(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

std::string range_text(double lo, double hi, bool lo_open, bool hi_open) {
  return std::string(lo_open ? "(" : "[") + number_text(lo) + ", " + number_text(hi) +
         (hi_open ? ")" : "]");
}

std::uint64_t regular_file_size(const std::string& path, const std::string& what) {
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0)
    throw Error("cannot open " + what + " '" + path + "': " + std::strerror(errno));
  if (S_ISDIR(st.st_mode)) throw Error(what + " '" + path + "' is a directory, not a file");
  if (!S_ISREG(st.st_mode))
    throw Error(what + " '" + path +
                "' is not a regular file (a device, pipe or socket); give a file on disk");
  return static_cast<std::uint64_t>(st.st_size);
}

std::string read_file(const std::string& path, std::uint64_t max_bytes, const std::string& what) {
  const std::uint64_t size = regular_file_size(path, what);
  if (size > max_bytes)
    throw Error(what + " '" + path + "' is " + bytes_text(size) + ", more than the " +
                bytes_text(max_bytes) + " such a file may be; is it the right file?");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open " + what + " '" + path + "': " + std::strerror(errno));
  std::string bytes(static_cast<std::size_t>(size), '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  if (static_cast<std::uint64_t>(in.gcount()) != size)
    throw Error("cannot read " + what + " '" + path + "': it changed or shrank while being read");
  return bytes;
}

nlohmann::json parse_json(std::string_view text, const std::string& where, std::size_t max_bytes,
                          int max_depth, bool unique_keys) {
  if (text.size() > max_bytes)
    throw Error(where + ": " + bytes_text(text.size()) + " of JSON, more than the limit of " +
                bytes_text(max_bytes));
  // Keys seen in each open object (nullopt-like empty marker for arrays), for duplicates.
  std::vector<std::set<std::string>> keys;
  std::vector<bool> is_object;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    switch (event) {
      case E::object_start:
      case E::array_start:
        if (depth >= max_depth)
          throw JsonLimit{"JSON nested more than " + std::to_string(max_depth) +
                          " levels deep; pion's files are never that deep"};
        is_object.push_back(event == E::object_start);
        keys.emplace_back();
        break;
      case E::object_end:
      case E::array_end:
        if (!keys.empty()) {
          keys.pop_back();
          is_object.pop_back();
        }
        break;
      case E::key:
        if (unique_keys && !keys.empty() && is_object.back()) {
          const std::string k = parsed.get<std::string>();
          if (!keys.back().insert(k).second)
            throw JsonLimit{"key " + describe(parsed) + " appears twice in one object"};
        }
        break;
      case E::value:
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const JsonLimit& e) {
    throw Error(where + ": " + e.message);
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + " is not valid JSON (" + e.what() + ")");
  }
}

nlohmann::json read_json_file(const std::string& path, const std::string& what,
                              std::uint64_t max_bytes) {
  return parse_json(read_file(path, max_bytes, what), what + " '" + path + "'",
                    static_cast<std::size_t>(max_bytes));
}

std::string describe(const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::object:
      return "an object of " + std::to_string(value.size()) + " keys";
    case nlohmann::json::value_t::array:
      return "an array of " + std::to_string(value.size()) + " values";
    case nlohmann::json::value_t::string: {
      // Never throws: a string cut at 40 bytes backs up to a UTF-8 character boundary (the
      // fuzzer found a cut inside a character making dump() throw json::type_error), and
      // bytes that are not UTF-8 at all (strings from outside JSON) print as U+FFFD.
      const auto& s = value.get_ref<const std::string&>();
      const auto quoted = [](const std::string& text) {
        return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      };
      if (s.size() <= 40) return quoted(s);
      std::size_t cut = 40;
      while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
      return quoted(s.substr(0, cut)) + "... (" + std::to_string(s.size()) + " bytes)";
    }
    case nlohmann::json::value_t::discarded:
      return "nothing";
    case nlohmann::json::value_t::number_float: {
      // JSON has no NaN or Inf (dump() would print "null"); values from flags can be either.
      const double d = value.get<double>();
      if (std::isnan(d)) return "nan";
      if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
      return value.dump();
    }
    default:
      return value.dump();  // a scalar: short
  }
}

std::int64_t to_int(const nlohmann::json& value, std::int64_t lo, std::int64_t hi,
                    const std::string& where) {
  const std::string allowed = "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (value.is_number_integer()) {
    if (value.is_number_unsigned()) {
      const auto u = value.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) ||
          static_cast<std::int64_t>(u) > hi || static_cast<std::int64_t>(u) < lo)
        throw Error(where + " must be " + allowed + ", got " + describe(value));
      return static_cast<std::int64_t>(u);
    }
    const auto i = value.get<std::int64_t>();
    if (i < lo || i > hi) throw Error(where + " must be " + allowed + ", got " + describe(value));
    return i;
  }
  if (value.is_number_float()) {
    // 1e3 is an integer written as a float; 1.7 and 4294967297.5 are not.
    const double d = value.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && d >= static_cast<double>(lo) &&
        d <= static_cast<double>(hi) && std::fabs(d) < 9.007199254740992e15)
      return static_cast<std::int64_t>(d);
  }
  throw Error(where + " must be " + allowed + ", got " + describe(value));
}

int to_int32(const nlohmann::json& value, int lo, int hi, const std::string& where) {
  return static_cast<int>(to_int(value, lo, hi, where));
}

std::uint64_t to_uint64(const nlohmann::json& value, const std::string& where) {
  if (value.is_number_unsigned()) return value.get<std::uint64_t>();
  if (value.is_number_integer() && value.get<std::int64_t>() >= 0)
    return static_cast<std::uint64_t>(value.get<std::int64_t>());
  throw Error(where + " must be an unsigned 64-bit integer, got " + describe(value));
}

double to_double(const nlohmann::json& value, double lo, double hi, const std::string& where,
                 bool lo_open, bool hi_open) {
  const std::string allowed = "a finite number in " + range_text(lo, hi, lo_open, hi_open);
  if (!value.is_number()) throw Error(where + " must be " + allowed + ", got " + describe(value));
  const double d = value.get<double>();
  const bool ok = std::isfinite(d) && (lo_open ? d > lo : d >= lo) && (hi_open ? d < hi : d <= hi);
  if (!ok) throw Error(where + " must be " + allowed + ", got " + describe(value));
  return d;
}

bool to_bool(const nlohmann::json& value, const std::string& where) {
  if (!value.is_boolean()) throw Error(where + " must be true or false, got " + describe(value));
  return value.get<bool>();
}

std::string to_string(const nlohmann::json& value, std::size_t max_len, const std::string& where) {
  if (!value.is_string()) throw Error(where + " must be a string, got " + describe(value));
  const auto& s = value.get_ref<const std::string&>();
  if (s.size() > max_len)
    throw Error(where + " is a string of " + std::to_string(s.size()) +
                " characters, more than the " + std::to_string(max_len) + " allowed");
  return s;
}

const nlohmann::json& member(const nlohmann::json& object, const std::string& key,
                             const std::string& where) {
  if (!object.is_object()) throw Error(where + " must be a JSON object, got " + describe(object));
  auto it = object.find(key);
  if (it == object.end()) throw Error(where + " lacks the key '" + key + "'");
  return *it;
}

}  // namespace pion::input
