#include "cli/from_checkpoint.h"

#include "pion/core/error.h"

namespace pion::cli {

TrainConfig config_from_checkpoint(const LoadedCheckpoint& base, const ConfigFlags& flags,
                                   const std::string& mode,
                                   const std::function<void(TrainConfig&)>& mode_defaults) {
  TrainConfig config = base.config;
  mode_defaults(config);
  apply_config_flags(flags, config);
  const nlohmann::json now = config.to_json(), was = base.config.to_json();
  for (const char* key : {"n_layer", "n_head", "d_model", "ffn_hidden", "tokenizer", "norm",
                          "norm_eps", "rope_theta", "n_kv_head", "tie_embeddings"})
    check(now[key] == was[key],
          mode + ": '" + key + "' comes from the checkpoint and cannot change");
  const int context = base.model->config().seq_len;
  check(config.seq_len <= context,
        mode + ": seq_len " + std::to_string(config.seq_len) + " is longer than the model's " +
            "context of " + std::to_string(context) + " tokens; it can only be lowered");
  return config;
}

}  // namespace pion::cli
