#pragma once
// llm.c token shards: a header of 256 little-endian int32 (header[0] = magic 20240520,
// header[1] = version 1, header[2] = number of tokens), then the tokens as uint16.
// Files written here are read by llm.c's dataloader and vice versa.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace pion {

inline constexpr std::int32_t kShardMagic = 20240520;
inline constexpr std::int32_t kShardVersion = 1;
inline constexpr std::size_t kShardHeaderInts = 256;
inline constexpr std::size_t kShardHeaderBytes = kShardHeaderInts * sizeof(std::int32_t);

// Writes atomically (temporary file, then rename). At most 2^31 - 1 tokens per shard.
void write_shard(const std::string& path, std::span<const std::uint16_t> tokens);

// Reads and validates a shard: errors for a missing file, a short header, a wrong magic or
// version, a negative count, and a file size that does not match the count (truncated or
// with trailing bytes).
std::vector<std::uint16_t> read_shard(const std::string& path);

// Token ids -> uint16, with an error naming the first id outside [0, 65535].
std::vector<std::uint16_t> to_uint16_tokens(std::span<const std::int32_t> ids);

}  // namespace pion
