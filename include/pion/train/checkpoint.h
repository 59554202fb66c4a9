#pragma once
// Training checkpoints and the run directory's JSON files, written by the training loop
// (trainer.h) from whichever back end it drives, so a checkpoint written on one device resumes
// on the other.
//
// A checkpoint is one safetensors file (written atomically) holding
//   model.<param name>                 the weights, F32 (llama.h's names and shapes)
//   optim.<i>.<param name>.<key>       optimizer i's state (OptimizerSet::save_state)
// and JSON metadata: pion.train (format, step, best val loss, tokens seen, wall seconds,
// the data source's state, the dropout RNG), pion.config (the TrainConfig), pion.model_config,
// pion.extra (tokenizer path, mode, ...), plus the optimizers' own optim.* entries.
// A checkpoint may instead carry its tokenizer itself, as the JSON text Tokenizer::save writes,
// under pion.tokenizer (what `pion import-hf` writes: one self-contained file); load_checkpoint
// (session.h) prefers it to the path in pion.extra.
#include <array>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pion/core/random.h"
#include "pion/core/safetensors.h"
#include "pion/model/config.h"
#include "pion/optim/optimizer.h"
#include "pion/train/config.h"

namespace pion {

inline constexpr const char* kEmbeddedTokenizerKey = "pion.tokenizer";

// Where a run stands; saved in every checkpoint.
struct TrainProgress {
  int step = 0;
  double best_val_loss = std::numeric_limits<double>::infinity();
  double last_val_loss = std::numeric_limits<double>::quiet_NaN();
  double tokens_seen = 0.0;
  double wall_seconds = 0.0;  // training time before this process (resumed runs)
};

// The most a checkpoint keeps of a data source's state (a JSON string in the header). Loaders
// need a few hundred bytes; `pion rl` between PPO epochs keeps the whole sampled batch (tokens
// and two fp64 log-probs per completion token: about 45 bytes a token, so some 1.4M tokens).
// write_train_checkpoint refuses a larger state before writing anything (the last checkpoint
// stays), so every checkpoint written can be resumed; the escaped copy in the header stays
// well under safetensors' 100 MB header limit.
inline constexpr std::size_t kMaxDataStateBytes = std::size_t{64} << 20;

// `tensors` holds the weights and optimizer state under the names above (the caller fills it:
// TrainBackend::checkpoint_tensors: the CPU model and OptimizerSet, or the GPU's mirror).
void write_train_checkpoint(const std::string& path, const TrainConfig& config,
                            const ModelConfig& model_config, TensorFile tensors,
                            const TrainProgress& progress, const nlohmann::json& data_state,
                            const Rng& dropout_rng, const nlohmann::json& extra);

struct ResumePoint {
  TensorFile file;  // model.* and optim.* tensors with their metadata
  TrainProgress progress;
  nlohmann::json data_state;
  nlohmann::json dropout_rng;  // restore with restore_rng
};
// Reads and validates a checkpoint for --resume: it must exist, be a pion training checkpoint
// of a known format with intact checksums, have been saved for the same model shape, and hold
// finite weights of that shape and progress values in range (errors say what to do). Nothing
// is applied here; the optimizer state and the data position are validated by their owners
// before they change anything (Optimizer::load_state, the loaders' set_state).
ResumePoint read_train_checkpoint(const std::string& path, const ModelConfig& model_config);

// Checks that `file` (read from `path`) is a pion training checkpoint of a known format, with
// its checksums where the format has them; returns its pion.train metadata. Errors name the
// file and say what to do.
nlohmann::json check_pion_checkpoint(const TensorFile& file, const std::string& path);
// The JSON value of one metadata key, parsed with the input layer's limits (input.h).
nlohmann::json checkpoint_metadata(const TensorFile& file, const std::string& key,
                                   const std::string& path);

nlohmann::json rng_json(const Rng& rng);
// A saved generator state: 4 unsigned 64-bit words, not all zero.
std::array<std::uint64_t, 4> rng_state_from_json(const nlohmann::json& j, const std::string& where);
void restore_rng(Rng& rng, const nlohmann::json& state);

// The singular values of every hidden matrix, as spectrum_init.json / spectrum_final.json.
nlohmann::json spectra_json(const std::vector<Param>& params);
// Writes pretty JSON through a temp file + rename; a failed write (disk full) throws.
void write_json_file(const std::string& path, const nlohmann::json& j);

}  // namespace pion
