#pragma once
// `--config FILE` plus one `--key value` flag per TrainConfig key, for the commands that
// train. The file is applied first, then the flags, so a flag overrides the file.
#include <map>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "pion/train/config.h"

namespace pion::cli {

struct ConfigFlags {
  std::string config_file;
  std::map<std::string, std::string> values;  // only the flags given on the command line
};

// Adds --config and every config key to `cmd`; the returned object fills in at parse time.
std::shared_ptr<ConfigFlags> add_config_flags(CLI::App& cmd);
// Applies the file, then the flags, on top of `config`.
void apply_config_flags(const ConfigFlags& flags, TrainConfig& config);
// Sets one key from command-line text as a `--key text` flag does (pion::Error naming the key
// when the key is unknown or the value fails its check).
void set_config_from_text(TrainConfig& config, const std::string& key, const std::string& text);

}  // namespace pion::cli
