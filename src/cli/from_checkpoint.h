#pragma once
// The config of a run that starts from a checkpoint (`pion finetune`, `pion rl`): shared so the
// two commands agree on what a user may change.
#include <functional>
#include <string>

#include "cli/config_flags.h"
#include "pion/train/session.h"

namespace pion::cli {

// The checkpoint's TrainConfig, then `mode_defaults` (the command's own defaults, e.g. fewer
// iterations and no dropout), then the config file and flags. The model's shape and tokenizer
// come from the checkpoint and cannot change (an error names the key). seq_len may be lowered
// to at most the model's context: batches get shorter, the weights and the model's RoPE table
// stay as they are (a position's rotation does not depend on the table length), so RL and SFT
// on short examples do not pay for padding to the pretraining context.
TrainConfig config_from_checkpoint(const LoadedCheckpoint& base, const ConfigFlags& flags,
                                   const std::string& mode,
                                   const std::function<void(TrainConfig&)>& mode_defaults);

}  // namespace pion::cli
