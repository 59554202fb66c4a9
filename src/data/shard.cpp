#include "pion/data/shard.h"

#include <array>
#include <bit>
#include <cstring>
#include <limits>

#include "pion/core/error.h"
#include "pion/data/text_io.h"

namespace pion {

// The format is little-endian; pion writes host order, so refuse to build where that differs.
static_assert(std::endian::native == std::endian::little,
              "token shards assume a little-endian host");

void write_shard(const std::string& path, std::span<const std::uint16_t> tokens) {
  check(
      tokens.size() <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
      "write_shard: " + std::to_string(tokens.size()) +
          " tokens do not fit one llm.c shard (max 2^31 - 1); split the data into several shards");
  std::array<std::int32_t, kShardHeaderInts> header{};
  header[0] = kShardMagic;
  header[1] = kShardVersion;
  header[2] = static_cast<std::int32_t>(tokens.size());
  std::string bytes(kShardHeaderBytes + tokens.size_bytes(), '\0');
  std::memcpy(bytes.data(), header.data(), kShardHeaderBytes);
  if (!tokens.empty())
    std::memcpy(bytes.data() + kShardHeaderBytes, tokens.data(), tokens.size_bytes());
  write_file_atomic(path, bytes);
}

std::vector<std::uint16_t> read_shard(const std::string& path) {
  const std::string bytes = read_file_bytes(path);
  const std::string where = "token shard '" + path + "'";
  check(bytes.size() >= kShardHeaderBytes,
        where + " is " + std::to_string(bytes.size()) + " bytes, shorter than the " +
            std::to_string(kShardHeaderBytes) +
            "-byte llm.c header; it is truncated or not a shard");
  std::array<std::int32_t, kShardHeaderInts> header{};
  std::memcpy(header.data(), bytes.data(), kShardHeaderBytes);
  check(header[0] == kShardMagic,
        where + " has magic " + std::to_string(header[0]) + ", expected " +
            std::to_string(kShardMagic) +
            "; it is not an llm.c token shard (prepare the dataset again)");
  check(header[1] == kShardVersion, where + " has version " + std::to_string(header[1]) +
                                        ", expected " + std::to_string(kShardVersion) +
                                        " (uint16 tokens); prepare the dataset again");
  check(header[2] >= 0, where + " has a negative token count " + std::to_string(header[2]));
  const std::size_t count = static_cast<std::size_t>(header[2]);
  const std::size_t expected = kShardHeaderBytes + count * sizeof(std::uint16_t);
  check(bytes.size() == expected,
        where + " is " + std::to_string(bytes.size()) + " bytes but its header promises " +
            std::to_string(count) + " tokens (" + std::to_string(expected) + " bytes); " +
            (bytes.size() < expected ? "it is truncated" : "it has trailing bytes") +
            "; prepare the dataset again");
  std::vector<std::uint16_t> tokens(count);
  if (count > 0)
    std::memcpy(tokens.data(), bytes.data() + kShardHeaderBytes, count * sizeof(std::uint16_t));
  return tokens;
}

std::vector<std::uint16_t> to_uint16_tokens(std::span<const std::int32_t> ids) {
  std::vector<std::uint16_t> out(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    check(ids[i] >= 0 && ids[i] <= 65535,
          "token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
              " does not fit a uint16 shard; vocabularies must be <= 65536");
    out[i] = static_cast<std::uint16_t>(ids[i]);
  }
  return out;
}

}  // namespace pion
