#include "pion/train/checkpoint.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "pion/core/error.h"
#include "pion/model/init.h"

namespace pion {

namespace {
constexpr const char* kCheckpointFormat = "pion-train-checkpoint-v1";
}

nlohmann::json rng_json(const Rng& rng) {
  auto s = rng.state();
  return nlohmann::json::array({s[0], s[1], s[2], s[3]});
}

void restore_rng(Rng& rng, const nlohmann::json& j) {
  rng.set_state({j.at(0).get<std::uint64_t>(), j.at(1).get<std::uint64_t>(),
                 j.at(2).get<std::uint64_t>(), j.at(3).get<std::uint64_t>()});
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
  auto meta_it = out.file.metadata.find("pion.train");
  check(meta_it != out.file.metadata.end(), "'" + path + "' is not a pion training checkpoint");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(meta_it->second);
    check(meta.value("format", "") == kCheckpointFormat,
          "'" + path + "' has an unknown checkpoint format");
    const auto saved_model = nlohmann::json::parse(out.file.metadata.at("pion.model_config"));
    check(
        saved_model == model_config.to_json(),
        "--resume: the checkpoint's model shape differs from the config's: " + saved_model.dump());
    out.data_state = meta.at("data_state");
    out.dropout_rng = meta.at("dropout_rng");
    out.progress.step = meta.at("step").get<int>();
    if (!meta.at("best_val_loss").is_null())
      out.progress.best_val_loss = meta.at("best_val_loss").get<double>();
    out.progress.tokens_seen = meta.at("tokens_seen").get<double>();
    out.progress.wall_seconds = meta.at("wall_seconds").get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw Error("'" + path + "': malformed checkpoint metadata (" + e.what() + ")");
  } catch (const std::out_of_range&) {
    throw Error("'" + path + "': checkpoint metadata lacks pion.model_config");
  }
  return out;
}

}  // namespace pion
