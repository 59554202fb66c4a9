#pragma once
// The training configuration: one struct, filled from a JSON file and then from `--key value`
// flags (flags win), validated in one place with messages that name the key. Unknown keys are
// errors. Every key is listed once, in the field table in config.cpp, with its help text.
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace pion {

struct TrainConfig {
  // data
  std::string data = "fortunes";  // a text file, a prepared dataset dir, or "fortunes" (built in)
  std::string tokenizer = "char";  // char | byte | bpe
  int vocab_size = 512;            // bpe only
  double val_fraction = 0.1;
  // model
  int n_layer = 4;
  int n_head = 4;
  int d_model = 128;
  int ffn_hidden = 0;  // 0 = the multiple of 32 nearest above 8/3 d_model
  int seq_len = 64;
  double dropout = 0.0;
  std::string init = "normal";  // normal | spectral
  double init_std = 0.02;
  std::string norm = "rmsnorm";  // rmsnorm | none (no normalisation layer at all)
  double norm_eps = 1e-5;        // RMSNorm's epsilon
  double rope_theta = 10000.0;   // RoPE base
  int n_kv_head = 0;             // grouped-query attention: K/V heads (0 = n_head)
  bool tie_embeddings = false;   // the LM head is the token embedding (one AdamW parameter)
  // optimisation
  int batch_size = 12;
  int grad_accum = 1;
  int max_iters = 2000;
  int warmup_iters = 100;
  std::string schedule = "cosine";  // cosine | wsd | constant
  double min_lr_ratio = 0.1;
  std::string optimizer = "adamw";  // adamw | muon | pion
  double lr = 1e-3;          // AdamW, and the non-matrix group of muon/pion
  double matrix_lr = 0.02;   // the Muon or Pion group
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double grad_clip = 1.0;  // 0 = off
  double muon_momentum = 0.95;
  double pion_c = 0.2;
  std::string pion_retraction = "taylor2";  // taylor2 | cayley | exp
  int pion_reanchor_every = 0;
  std::string pion_momentum = "lie";       // lie | ambient | transported
  std::string pion_update_side = "both";   // both | left | right | alternate
  std::string pion_normalizer = "adam";    // adam | msign (msign: lie momentum only)
  int pion_ns_steps = 5;                   // Newton-Schulz iterations of msign
  // evaluation, logging, checkpoints
  int eval_interval = 250;
  int eval_iters = 20;
  int log_interval = 10;
  int checkpoint_interval = 0;  // 0 = only at the end (and on Ctrl-C / SIGTERM)
  // Also save whenever this many minutes of wall time passed since the last save (or the
  // start), so a killed run loses at most that much; 0 = off.
  double checkpoint_minutes = 10.0;
  std::uint64_t seed = 1337;
  int threads = 0;  // 0 = all cores
  std::string out_dir = "runs/default";
  // `pion rl` (GRPO, pion/train/grpo.h, pion/train/rl_source.h)
  int rl_prompts_per_step = 8;  // P prompts sampled per step
  int rl_group_size = 8;        // G completions per prompt (>= 2)
  int rl_max_new_tokens = 16;
  double rl_temperature = 1.0;
  double rl_top_p = 1.0;
  bool rl_std_normalize = true;  // false: advantages r - mean (Dr. GRPO)
  int rl_resample_rounds = 0;    // redraw groups with equal rewards up to N times (DAPO)
  double clip_eps = 0.2;
  int ppo_epochs = 1;  // optimizer steps per sampled batch
  double kl_coef = 0.0;
  double adv_eps = 1e-4;
  // device (pion/cuda/backend.h; the other keys here apply to --device cuda only)
  std::string device = "cpu";              // cpu | cuda
  std::string matmul_precision = "bf16";   // the model's GEMMs: bf16 | tf32 | fp32
  std::string attention = "auto";          // auto | flash | materialized
  std::string pion_precision = "fp32";     // fp32 | mixed
  std::string muon_precision = "bf16";     // bf16 | fp32
  bool cuda_graphs = true;  // forward/backward and optimizer step replayed as CUDA graphs

  nlohmann::json to_json() const;
  // Throws pion::Error naming the key for any invalid value.
  void validate() const;
};

struct ConfigKey {
  std::string name;
  std::string help;
};
// Every key with its help text, in a stable order (for --help and docs).
const std::vector<ConfigKey>& train_config_keys();

// Sets one key from a JSON value (numbers, strings, booleans); errors name the key and type.
void set_config_value(TrainConfig& config, const std::string& key, const nlohmann::json& value);
// Applies every key of a JSON object; unknown keys are errors listing the valid ones.
void apply_config_json(TrainConfig& config, const nlohmann::json& object);
// Reads a JSON config file (clear errors for missing files and bad JSON).
nlohmann::json read_json_file(const std::string& path);
// Converts a command-line string to JSON: numbers and true/false as such, anything else a string.
nlohmann::json parse_flag_value(const std::string& text);

}  // namespace pion
