#pragma once
// Reading and writing the text files the data pipeline consumes, and the UTF-8 rules it
// enforces: every text pion tokenizes must be valid UTF-8, so a bad file fails early with the
// byte offset of the first bad byte instead of silently training on mojibake.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace pion {

// Throws pion::Error naming `source` (a path or a description), the byte offset, line number
// and byte value of the first invalid UTF-8 sequence (overlong forms, surrogates and code
// points above U+10FFFF are invalid too).
void validate_utf8(std::string_view text, const std::string& source);

// The most bytes a text corpus, token shard or other data file may have (4 GiB): larger files
// are refused by name before anything is read.
inline constexpr std::uint64_t kMaxTextBytes = std::uint64_t{4} << 30;

// The whole file as bytes. It must be a regular file (not a directory, device such as
// /dev/zero, or pipe) of at most `max_bytes`; `what` names it in errors ("text file",
// "token shard"). Errors: missing, unreadable, not a regular file, too large.
std::string read_file_bytes(const std::string& path, std::uint64_t max_bytes = kMaxTextBytes,
                            const std::string& what = "file");

// The whole file (at most kMaxTextBytes), checked to be non-empty and valid UTF-8 (clear errors
// otherwise).
std::string read_text_file(const std::string& path);

// Writes `bytes` to `path` atomically (a temporary file beside it, then rename), so a reader
// never sees a half-written file even if the writer is killed.
void write_file_atomic(const std::string& path, std::string_view bytes);

// The code points of valid UTF-8 text (call validate_utf8 first; invalid input throws).
std::vector<char32_t> utf8_code_points(std::string_view text);
// Appends the UTF-8 encoding of one code point.
void append_utf8(std::string& out, char32_t code_point);
// Byte offset of the code point with index `n` (text.size() when n >= the number of points).
std::size_t utf8_offset_of_code_point(std::string_view text, std::size_t n);
// Number of code points in valid UTF-8 text.
std::size_t utf8_length(std::string_view text);
// "U+00E9 'é'" for error messages (control characters are shown by their code only).
std::string describe_code_point(char32_t code_point);

// Standard base64 (RFC 4648, with '=' padding), used to keep binary tokenizer models inside
// JSON. decode throws pion::Error naming `source` on characters outside the alphabet.
std::string base64_encode(std::string_view bytes);
std::string base64_decode(std::string_view text, const std::string& source);

}  // namespace pion
