#pragma once
// The one validation layer for external input: files, JSON text and the values inside it.
// Every reader of something a user (or a damaged disk) hands pion goes through here, so the
// same promises hold everywhere:
//   - sizes are checked before anything is read or allocated (a device such as /dev/zero, or a
//     file larger than its kind can be, is refused by name, never read until memory runs out);
//   - JSON nesting depth is limited while parsing, so no value deep enough to overflow the
//     stack is ever built (and error messages never print such a value);
//   - numbers are read at their type with a range (an int given as 4294967297 or 1.7 is an
//     error, not 1), and messages name the file, the key and the allowed range.
// Failures throw pion::Error, which the CLI prints on one line with exit code 2.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace pion::input {

// Limits for JSON text: a config file, one JSONL line, one metadata value of a checkpoint.
inline constexpr std::size_t kMaxJsonBytes = std::size_t{64} << 20;
inline constexpr int kMaxJsonDepth = 64;
// A safetensors header (the format's own limit is 100 MB).
inline constexpr std::size_t kMaxSafetensorsHeader = std::size_t{100} << 20;

// The size of `path` in bytes; it must exist and be a regular file (not a directory, device
// or pipe). `what` says what the file is for ("config file", "checkpoint", ...).
std::uint64_t regular_file_size(const std::string& path, const std::string& what);

// The whole of a regular file of at most `max_bytes` bytes.
std::string read_file(const std::string& path, std::uint64_t max_bytes, const std::string& what);

// Parses JSON text of at most `max_bytes` with at most `max_depth` levels of nesting (checked
// during the parse, before a deeper value exists) and, when `unique_keys`, no key twice in one
// object. `where` names the source in errors ("config file 'run.json'").
nlohmann::json parse_json(std::string_view text, const std::string& where,
                          std::size_t max_bytes = kMaxJsonBytes, int max_depth = kMaxJsonDepth,
                          bool unique_keys = true);

// read_file + parse_json.
nlohmann::json read_json_file(const std::string& path, const std::string& what,
                              std::uint64_t max_bytes = kMaxJsonBytes);

// A short, safe description of a value for messages: scalars as JSON (strings cut to 40
// characters), containers by kind and size ("an array of 3 values").
std::string describe(const nlohmann::json& value);

// Typed reads with ranges. `where` names the value ("checkpoint 'c.safetensors', pion.train
// key 'step'"); the message adds what was found and the allowed range.
std::int64_t to_int(const nlohmann::json& value, std::int64_t lo, std::int64_t hi,
                    const std::string& where);
int to_int32(const nlohmann::json& value, int lo, int hi, const std::string& where);
std::uint64_t to_uint64(const nlohmann::json& value, const std::string& where);
// A finite number in [lo, hi] (use lo_open/hi_open for open ends).
double to_double(const nlohmann::json& value, double lo, double hi, const std::string& where,
                 bool lo_open = false, bool hi_open = false);
bool to_bool(const nlohmann::json& value, const std::string& where);
std::string to_string(const nlohmann::json& value, std::size_t max_len, const std::string& where);

// object[key], which must exist (object must be an object).
const nlohmann::json& member(const nlohmann::json& object, const std::string& key,
                             const std::string& where);

// A range in a message: "[0, 1)" etc.
std::string range_text(double lo, double hi, bool lo_open = false, bool hi_open = false);

}  // namespace pion::input
