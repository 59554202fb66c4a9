#include "pion/train/checkpoint.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/model/init.h"
#include "pion/model/llama.h"

namespace pion {

namespace {
// v2 adds the safetensors checksums (safetensors.h), which v2 files must carry; v1 files,
// written before them, still resume.
constexpr const char* kCheckpointFormat = "pion-train-checkpoint-v2";
constexpr const char* kCheckpointFormatV1 = "pion-train-checkpoint-v1";
constexpr int kMaxStep = 1 << 30;

std::string in_file(const std::string& path) { return "checkpoint '" + path + "'"; }

}  // namespace

nlohmann::json checkpoint_metadata(const TensorFile& file, const std::string& key,
                                   const std::string& path) {
  auto it = file.metadata.find(key);
  check(it != file.metadata.end(),
        in_file(path) + " lacks the metadata '" + key + "'; is it a pion training checkpoint?");
  return input::parse_json(it->second, in_file(path) + " metadata '" + key + "'");
}

nlohmann::json check_pion_checkpoint(const TensorFile& file, const std::string& path) {
  check(file.metadata.count("pion.train") == 1,
        "'" + path + "' is not a pion training checkpoint (it has no pion.train metadata)");
  nlohmann::json meta = checkpoint_metadata(file, "pion.train", path);
  check(meta.is_object(), in_file(path) + ": metadata 'pion.train' must be a JSON object");
  const std::string format =
      input::to_string(input::member(meta, "format", in_file(path) + " pion.train"), 64,
                       in_file(path) + " pion.train key 'format'");
  check(format == kCheckpointFormat || format == kCheckpointFormatV1,
        in_file(path) + " has the unknown format " + input::describe(format) + " (this pion reads " +
            kCheckpointFormat + " and " + kCheckpointFormatV1 + ")");
  check(format == kCheckpointFormatV1 || file.checksummed,
        in_file(path) + " is damaged: it lacks the checksums every " + kCheckpointFormat +
            " file carries (use another copy)");
  return meta;
}

nlohmann::json rng_json(const Rng& rng) {
  auto s = rng.state();
  return nlohmann::json::array({s[0], s[1], s[2], s[3]});
}

std::array<std::uint64_t, 4> rng_state_from_json(const nlohmann::json& j, const std::string& where) {
  check(j.is_array() && j.size() == 4, where + " must be an array of 4 unsigned integers, got " +
                                           input::describe(j));
  std::array<std::uint64_t, 4> s{};
  for (std::size_t i = 0; i < 4; ++i) s[i] = input::to_uint64(j[i], where);
  check(s != std::array<std::uint64_t, 4>{}, where + ": an all-zero generator state is invalid");
  return s;
}

void restore_rng(Rng& rng, const nlohmann::json& j) {
  rng.set_state(rng_state_from_json(j, "random generator state"));
}

nlohmann::json spectra_json(const std::vector<Param>& params) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& s : hidden_spectra(params))
    out.push_back({{"name", s.name}, {"rows", s.rows}, {"cols", s.cols}, {"sigma", s.sigma}});
  return out;
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(2) << "\n";
    check(static_cast<bool>(out), "cannot write '" + tmp + "' (disk full?)");
  }
  std::filesystem::rename(tmp, path);
}

void write_train_checkpoint(const std::string& path, const TrainConfig& config,
                            const ModelConfig& model_config, TensorFile file,
                            const TrainProgress& progress, const nlohmann::json& data_state,
                            const Rng& dropout_rng, const nlohmann::json& extra) {
  const std::size_t state_bytes = data_state.is_string()
                                      ? data_state.get_ref<const std::string&>().size()
                                      : data_state.dump().size();
  check(state_bytes <= kMaxDataStateBytes,
        "checkpoint: the data source's state is " + std::to_string(state_bytes >> 20) +
            " MiB, above the " + std::to_string(kMaxDataStateBytes >> 20) +
            " MiB a checkpoint keeps, so it could not be resumed; nothing was written (the last "
            "checkpoint in '" +
            path +
            "' stays). pion rl between PPO epochs keeps its whole "
            "sampled batch: lower rl_prompts_per_step x rl_group_size or max_new_tokens, or use "
            "ppo_epochs 1");
  nlohmann::json meta = {{"format", kCheckpointFormat},
                         {"step", progress.step},
                         {"best_val_loss", std::isfinite(progress.best_val_loss)
                                               ? nlohmann::json(progress.best_val_loss)
                                               : nlohmann::json(nullptr)},
                         {"tokens_seen", progress.tokens_seen},
                         {"wall_seconds", progress.wall_seconds},
                         {"data_state", data_state},
                         {"dropout_rng", rng_json(dropout_rng)}};
  file.metadata["pion.train"] = meta.dump();
  file.metadata["pion.config"] = config.to_json().dump();
  file.metadata["pion.model_config"] = model_config.to_json().dump();
  file.metadata["pion.extra"] = extra.dump();
  save_safetensors(path, file);
}

ResumePoint read_train_checkpoint(const std::string& path, const ModelConfig& model_config) {
  check(std::filesystem::exists(path), "--resume: no checkpoint at '" + path +
                                           "'; start without --resume or point out_dir at a run");
  ResumePoint out;
  out.file = load_safetensors(path);
  const nlohmann::json meta = check_pion_checkpoint(out.file, path);
  const auto saved_model = checkpoint_metadata(out.file, "pion.model_config", path);
  // Compared after a round trip through ModelConfig, so a key added since the checkpoint was
  // written (e.g. norm) compares as its default.
  check(ModelConfig::from_json(saved_model).to_json() == model_config.to_json(),
        "--resume: the model shape of " + in_file(path) +
            " differs from the config's; resume with the config the run was started with");
  // Every value is read at its type and range before anything is handed to the trainer.
  const std::string key = in_file(path) + " pion.train key ";
  auto at = [&](const char* k) -> const nlohmann::json& {
    return input::member(meta, k, in_file(path) + " pion.train");
  };
  out.progress.step = input::to_int32(at("step"), 0, kMaxStep, key + "'step'");
  if (!at("best_val_loss").is_null())
    out.progress.best_val_loss = input::to_double(at("best_val_loss"), 0.0, 1e30, key + "'best_val_loss'");
  out.progress.tokens_seen = input::to_double(at("tokens_seen"), 0.0, 1e30, key + "'tokens_seen'");
  out.progress.wall_seconds = input::to_double(at("wall_seconds"), 0.0, 1e15, key + "'wall_seconds'");
  out.data_state = at("data_state");
  // Loaders need a few hundred bytes; `pion rl` with ppo_epochs > 1 also keeps the sampled
  // batch it is still optimising (tokens, log-probs), so that resume is bit-exact.
  check(out.data_state.is_string() &&
            out.data_state.get_ref<const std::string&>().size() <= kMaxDataStateBytes,
        key + "'data_state' must be a string of the data loader's state, got " +
            input::describe(out.data_state));
  out.dropout_rng = at("dropout_rng");
  rng_state_from_json(out.dropout_rng, key + "'dropout_rng'");
  check_model_weights(out.file, "model.", model_config, in_file(path));
  return out;
}

}  // namespace pion
