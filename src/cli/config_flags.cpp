#include "cli/config_flags.h"

namespace pion::cli {

std::shared_ptr<ConfigFlags> add_config_flags(CLI::App& cmd) {
  auto flags = std::make_shared<ConfigFlags>();
  cmd.add_option("--config", flags->config_file, "JSON file of config keys (flags override it)");
  for (const auto& key : train_config_keys()) {
    cmd.add_option_function<std::string>(
           "--" + key.name,
           [flags, name = key.name](const std::string& v) { flags->values[name] = v; }, key.help)
        ->group("Config keys")
        // A flag given twice keeps its last value, as scripts that append overrides expect.
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  }
  return flags;
}

void apply_config_flags(const ConfigFlags& flags, TrainConfig& config) {
  if (!flags.config_file.empty()) apply_config_json(config, read_json_file(flags.config_file));
  for (const auto& [key, text] : flags.values) set_config_from_text(config, key, text);
}

void set_config_from_text(TrainConfig& config, const std::string& key, const std::string& text) {
  const nlohmann::json current = config.to_json();
  // An unknown key gets set_config_value's error, which lists the valid keys.
  if (!current.contains(key)) set_config_value(config, key, text);
  // String keys take the text as it is (a data path "123" stays a string).
  const bool is_string = current.at(key).is_string();
  set_config_value(config, key, is_string ? nlohmann::json(text) : parse_flag_value(text));
}

}  // namespace pion::cli
