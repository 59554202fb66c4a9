#include "pion/data/loader.h"

#include <nlohmann/json.hpp>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/data/shard.h"

namespace pion {

void validate_rank_slicing(std::int64_t global_batch, int rank, int world_size) {
  check(global_batch >= 1, "batch size must be >= 1, got " + std::to_string(global_batch));
  check(world_size >= 1, "world_size must be >= 1, got " + std::to_string(world_size));
  check(rank >= 0 && rank < world_size,
        "rank " + std::to_string(rank) +
            " is outside [0, world_size = " + std::to_string(world_size) + ")");
  check(global_batch % world_size == 0, "the global batch size " + std::to_string(global_batch) +
                                            " must be divisible by world_size " +
                                            std::to_string(world_size) +
                                            " so every rank gets the same number of rows");
}

DataLoader::DataLoader(std::vector<std::uint16_t> tokens, const LoaderOptions& options)
    : tokens_(std::move(tokens)), options_(options), rng_(options.seed) {
  validate_rank_slicing(options_.batch_size, options_.rank, options_.world_size);
  check(options_.seq_len >= 1, "seq_len must be >= 1, got " + std::to_string(options_.seq_len));
  check(num_tokens() >= options_.seq_len + 1,
        "the token stream has " + std::to_string(num_tokens()) +
            " tokens, fewer than seq_len + 1 = " + std::to_string(options_.seq_len + 1) +
            " needed for one window; use more text or a shorter seq_len");
}

DataLoader DataLoader::from_shard(const std::string& path, const LoaderOptions& options) {
  auto tokens = read_shard(path);
  check(tokens.size() >= static_cast<std::size_t>(options.seq_len) + 1,
        "token shard '" + path + "' has " + std::to_string(tokens.size()) +
            " tokens, fewer than seq_len + 1 = " + std::to_string(options.seq_len + 1) +
            "; use more text (or a larger val_fraction) or a shorter seq_len");
  return DataLoader(std::move(tokens), options);
}

Batch DataLoader::windows(std::span<const std::int64_t> global_starts) const {
  const std::int64_t t = options_.seq_len;
  const std::int64_t rows = local_batch_size();
  Batch b;
  b.rows = rows;
  b.seq_len = t;
  b.inputs.resize(static_cast<std::size_t>(rows * t));
  b.targets.resize(static_cast<std::size_t>(rows * t));
  const std::int64_t first = options_.rank * rows;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t start = global_starts[static_cast<std::size_t>(first + r)];
    for (std::int64_t i = 0; i < t; ++i) {
      b.inputs[static_cast<std::size_t>(r * t + i)] = tokens_[static_cast<std::size_t>(start + i)];
      b.targets[static_cast<std::size_t>(r * t + i)] =
          tokens_[static_cast<std::size_t>(start + i + 1)];
    }
  }
  return b;
}

Batch DataLoader::next_batch() {
  // Every rank draws all B_global starts so the streams stay in lockstep across ranks.
  std::vector<std::int64_t> starts(static_cast<std::size_t>(options_.batch_size));
  const auto range = static_cast<std::uint64_t>(num_tokens() - options_.seq_len);
  for (auto& s : starts) s = static_cast<std::int64_t>(rng_.below(range));
  ++batches_drawn_;
  return windows(starts);
}

std::int64_t DataLoader::eval_batches_per_pass() const {
  const std::int64_t windows_total = (num_tokens() - 1) / options_.seq_len;
  return (windows_total + options_.batch_size - 1) / options_.batch_size;
}

Batch DataLoader::eval_batch(std::int64_t index) const {
  check(index >= 0, "eval batch index must be >= 0, got " + std::to_string(index));
  const std::int64_t windows_total = (num_tokens() - 1) / options_.seq_len;
  std::vector<std::int64_t> starts(static_cast<std::size_t>(options_.batch_size));
  for (std::int64_t j = 0; j < options_.batch_size; ++j)
    starts[static_cast<std::size_t>(j)] =
        ((index * options_.batch_size + j) % windows_total) * options_.seq_len;
  return windows(starts);
}

std::string DataLoader::state() const {
  const auto s = rng_.state();
  nlohmann::json j = {
      {"rng", {s[0], s[1], s[2], s[3]}}, {"batches", batches_drawn_}, {"tokens", num_tokens()}};
  return j.dump();
}

LoaderPosition parse_loader_position(const std::string& state, const char* count_key,
                                     const std::string& what) {
  const nlohmann::json j = input::parse_json(state, what + " state", 4096, 2);
  const std::string where = what + " state";
  LoaderPosition p;
  const auto& rng = input::member(j, "rng", where);
  check(rng.is_array() && rng.size() == 4,
        where + " is malformed: \"rng\" must hold 4 numbers, got " + input::describe(rng));
  for (std::size_t i = 0; i < 4; ++i) p.rng[i] = input::to_uint64(rng[i], where + " rng");
  check(p.rng != std::array<std::uint64_t, 4>{}, where + ": an all-zero rng state is invalid");
  constexpr std::int64_t kMax = std::int64_t{1} << 53;
  p.batches = input::to_int(input::member(j, "batches", where), 0, kMax, where + " batches");
  p.count = input::to_int(input::member(j, count_key, where), 0, kMax,
                          where + " " + count_key);
  return p;
}

void DataLoader::set_state(const std::string& state) {
  const LoaderPosition p = parse_loader_position(state, "tokens", "data loader");
  check(p.count == num_tokens(), "data loader state was saved over " + std::to_string(p.count) +
                                     " tokens but this shard has " + std::to_string(num_tokens()) +
                                     "; resume with the same dataset");
  rng_.set_state(p.rng);
  batches_drawn_ = p.batches;
}

}  // namespace pion
