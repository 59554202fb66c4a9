// libFuzzer target: a training config as the CLI reads it (pion::input::parse_json, then
// apply_config_json and TrainConfig::validate), and the same JSON as a checkpoint's model
// config (ModelConfig::from_json), and as a Hugging Face config.json (pion::hf::config_from_hf,
// what `pion import-hf` reads) turned back into one (config_to_hf). pion::Error is the expected answer to bad input;
// anything else (another exception, a sanitizer report, a leak, a hang) is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/model/config.h"
#include "pion/model/hf.h"
#include "pion/train/config.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  nlohmann::json json;
  try {
    json = pion::input::parse_json(text, "config file 'fuzz.json'");
  } catch (const pion::Error&) {
    return 0;
  }
  try {
    pion::TrainConfig config;
    pion::apply_config_json(config, json);
    config.validate();
    (void)config.to_json();
  } catch (const pion::Error&) {
  }
  try {
    const pion::ModelConfig model = pion::ModelConfig::from_json(json);
    (void)model.num_params();
    (void)model.to_json();
  } catch (const pion::Error&) {
  }
  try {
    const pion::hf::HfConfig hf = pion::hf::config_from_hf(json, "config.json 'fuzz.json'", 4096);
    (void)hf.model.num_params();
    (void)pion::hf::config_to_hf(hf.model, hf.torch_dtype, hf.bos_token_id, hf.eos_token_id);
  } catch (const pion::Error&) {
  }
  return 0;
}
