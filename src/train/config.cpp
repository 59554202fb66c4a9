#include "pion/train/config.h"

#include <cmath>
#include <functional>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/model/config.h"
#include "pion/optim/options.h"

namespace pion {

namespace {

struct Field {
  ConfigKey key;
  // Reads the JSON value at the member's type and range and stores it; pion::Error names the
  // key, the allowed range and (safely described) what was given.
  std::function<void(TrainConfig&, const nlohmann::json&)> set;
  std::function<nlohmann::json(const TrainConfig&)> get;
};

std::string where(const char* name) {
  return std::string("config key '") + name + "'";
}

// The help text with the allowed values appended, so --help states every bound.
std::string with_range(const char* help, const std::string& range) {
  return std::string(help) + " " + range;
}

Field int_field(const char* name, const char* help, int TrainConfig::*member, int lo, int hi) {
  return Field{{name, with_range(help, "[" + std::to_string(lo) + ".." + std::to_string(hi) + "]")},
               [member, name, lo, hi](TrainConfig& c, const nlohmann::json& v) {
                 c.*member = input::to_int32(v, lo, hi, where(name));
               },
               [member](const TrainConfig& c) { return nlohmann::json(c.*member); }};
}

Field u64_field(const char* name, const char* help, std::uint64_t TrainConfig::*member) {
  return Field{{name, with_range(help, "[0..2^64-1]")},
               [member, name](TrainConfig& c, const nlohmann::json& v) {
                 c.*member = input::to_uint64(v, where(name));
               },
               [member](const TrainConfig& c) { return nlohmann::json(c.*member); }};
}

// A finite number in lo..hi; lo_open / hi_open exclude the ends.
Field real_field(const char* name, const char* help, double TrainConfig::*member, double lo,
                 double hi, bool lo_open = false, bool hi_open = false) {
  return Field{{name, with_range(help, input::range_text(lo, hi, lo_open, hi_open))},
               [member, name, lo, hi, lo_open, hi_open](TrainConfig& c, const nlohmann::json& v) {
                 c.*member = input::to_double(v, lo, hi, where(name), lo_open, hi_open);
               },
               [member](const TrainConfig& c) { return nlohmann::json(c.*member); }};
}

Field bool_field(const char* name, const char* help, bool TrainConfig::*member) {
  return Field{{name, with_range(help, "true | false")},
               [member, name](TrainConfig& c, const nlohmann::json& v) {
                 check(v.is_boolean(), where(name) + " must be true or false, got " +
                                           input::describe(v));
                 c.*member = v.get<bool>();
               },
               [member](const TrainConfig& c) { return nlohmann::json(c.*member); }};
}

// Paths may be long; the names of choices are short.
constexpr std::size_t kMaxPath = 4096;
constexpr std::size_t kMaxChoice = 64;

Field string_field(const char* name, const char* help, std::string TrainConfig::*member,
                   std::size_t max_len = kMaxChoice) {
  return Field{{name, help},
               [member, name, max_len](TrainConfig& c, const nlohmann::json& v) {
                 c.*member = input::to_string(v, max_len, where(name));
               },
               [member](const TrainConfig& c) { return nlohmann::json(c.*member); }};
}

// Step counts and intervals: a step index plus one never overflows an int.
constexpr int kMaxSteps = 1 << 30;
constexpr int kMaxBatch = 1 << 16;
constexpr int kMaxThreads = 1024;
constexpr int kMaxEvalIters = 1 << 20;

const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      string_field("data", "text file, prepared dataset dir, or 'fortunes' (built-in corpus)",
                   &TrainConfig::data, kMaxPath),
      string_field("tokenizer", "char | byte | bpe", &TrainConfig::tokenizer),
      int_field("vocab_size", "vocabulary size of a trained bpe tokenizer",
                &TrainConfig::vocab_size, 8, kMaxVocab),
      real_field("val_fraction", "last fraction of the text used for validation",
                 &TrainConfig::val_fraction, 0, 1, true, true),
      int_field("n_layer", "transformer blocks", &TrainConfig::n_layer, 1, kMaxLayers),
      int_field("n_head", "attention heads", &TrainConfig::n_head, 1, kMaxHeads),
      int_field("d_model", "model width", &TrainConfig::d_model, 1, kMaxDModel),
      int_field("ffn_hidden", "SwiGLU hidden size (0 = multiple of 32 above 8/3 d_model)",
                &TrainConfig::ffn_hidden, 0, kMaxFfnHidden),
      int_field("seq_len", "context length in tokens", &TrainConfig::seq_len, 1, kMaxSeqLen),
      real_field("dropout", "dropout rate (0 = off)", &TrainConfig::dropout, 0, 1, false, true),
      string_field("init", "normal | spectral", &TrainConfig::init),
      real_field("init_std", "std of the normal init", &TrainConfig::init_std, 0, 100, true),
      string_field("norm", "rmsnorm | none (none: no RMSNorm anywhere, the final one included)",
                   &TrainConfig::norm),
      real_field("norm_eps", "RMSNorm epsilon", &TrainConfig::norm_eps, 0, 1, true),
      real_field("rope_theta", "RoPE base (theta)", &TrainConfig::rope_theta, 0, 1e12, true),
      int_field("n_kv_head",
                "key/value heads, dividing n_head (0 = n_head; fewer: grouped-query attention)",
                &TrainConfig::n_kv_head, 0, kMaxHeads),
      bool_field("tie_embeddings",
                 "the LM head is the token embedding matrix (one parameter, trained by AdamW)",
                 &TrainConfig::tie_embeddings),
      int_field("batch_size", "sequences per micro-batch (the global batch under mpirun)",
                &TrainConfig::batch_size, 1, kMaxBatch),
      int_field("grad_accum", "micro-batches per optimizer step", &TrainConfig::grad_accum, 1,
                kMaxBatch),
      int_field("max_iters", "optimizer steps", &TrainConfig::max_iters, 1, kMaxSteps),
      int_field("warmup_iters", "linear warmup steps", &TrainConfig::warmup_iters, 0, kMaxSteps),
      string_field("schedule", "cosine | wsd | constant", &TrainConfig::schedule),
      real_field("min_lr_ratio", "final lr as a fraction of the peak", &TrainConfig::min_lr_ratio,
                 0, 1),
      string_field("optimizer", "adamw | muon | pion", &TrainConfig::optimizer),
      real_field("lr", "AdamW lr (all params for adamw; non-matrix params for muon/pion)",
                 &TrainConfig::lr, 0, 100, true),
      real_field("matrix_lr", "lr of the Muon or Pion group (hidden matrices)",
                 &TrainConfig::matrix_lr, 0, 100, true),
      real_field("weight_decay", "decoupled weight decay (AdamW 2-D params and Muon; never Pion)",
                 &TrainConfig::weight_decay, 0, 100),
      real_field("beta1", "first-moment decay (AdamW and Pion)", &TrainConfig::beta1, 0, 1, false,
                 true),
      real_field("beta2", "second-moment decay (AdamW and Pion)", &TrainConfig::beta2, 0, 1, false,
                 true),
      real_field("grad_clip", "clip the global gradient norm to this (0 = off)",
                 &TrainConfig::grad_clip, 0, 1e9),
      real_field("muon_momentum", "Muon momentum", &TrainConfig::muon_momentum, 0, 1, false, true),
      real_field("pion_c", "Pion target update RMS constant c", &TrainConfig::pion_c, 0, 100, true),
      string_field("pion_retraction", "taylor2 | cayley | exp", &TrainConfig::pion_retraction),
      int_field("pion_reanchor_every",
                "re-project onto the initial spectrum every N steps (0 = off)",
                &TrainConfig::pion_reanchor_every, 0, kMaxSteps),
      string_field("pion_momentum",
                   "lie | ambient | transported (moments of the generators, of the gradient, or "
                   "of the gradient carried along by the rotations)",
                   &TrainConfig::pion_momentum),
      string_field("pion_update_side",
                   "both | left | right | alternate (rotate both sides, the output side, the "
                   "input side, or left and right on alternate steps)",
                   &TrainConfig::pion_update_side),
      string_field("pion_normalizer",
                   "adam | msign (m / sqrt(v), or Newton-Schulz of the momentum; msign needs "
                   "pion_momentum lie)",
                   &TrainConfig::pion_normalizer),
      int_field("pion_ns_steps", "Newton-Schulz iterations of pion_normalizer msign",
                &TrainConfig::pion_ns_steps, 1, 100),
      int_field("eval_interval", "steps between validation evals", &TrainConfig::eval_interval, 0,
                kMaxSteps),
      int_field("eval_iters", "validation batches per eval", &TrainConfig::eval_iters, 1,
                kMaxEvalIters),
      int_field("log_interval", "steps between progress lines", &TrainConfig::log_interval, 1,
                kMaxSteps),
      int_field("checkpoint_interval", "steps between checkpoints (0 = at the end only)",
                &TrainConfig::checkpoint_interval, 0, kMaxSteps),
      real_field(
          "checkpoint_minutes",
          "also checkpoint after this many minutes of wall time since the last save (0 = off)",
          &TrainConfig::checkpoint_minutes, 0, 1e6),
      u64_field("seed", "random seed", &TrainConfig::seed),
      int_field("threads", "OpenMP/BLAS threads (0 = all cores)", &TrainConfig::threads, 0,
                kMaxThreads),
      string_field("out_dir", "output directory (metrics, summary, checkpoint)",
                   &TrainConfig::out_dir, kMaxPath),
      int_field("rl_prompts_per_step", "rl: prompts sampled per step (P)",
                &TrainConfig::rl_prompts_per_step, 1, kMaxBatch),
      int_field("rl_group_size", "rl: completions sampled per prompt (G)",
                &TrainConfig::rl_group_size, 2, 1024),
      int_field("rl_max_new_tokens", "rl: most tokens per completion",
                &TrainConfig::rl_max_new_tokens, 1, kMaxSeqLen),
      real_field("rl_temperature", "rl: sampling temperature", &TrainConfig::rl_temperature, 0, 100,
                 true),
      real_field("rl_top_p", "rl: nucleus sampling mass", &TrainConfig::rl_top_p, 0, 1, true),
      bool_field("rl_std_normalize",
                 "rl: divide advantages by the group's reward std (false: Dr. GRPO)",
                 &TrainConfig::rl_std_normalize),
      int_field("rl_resample_rounds",
                "rl: redraw a group whose rewards are all equal (no signal) with a new prompt, up "
                "to this many rounds per step (DAPO's dynamic sampling; 0 = off)",
                &TrainConfig::rl_resample_rounds, 0, 100),
      real_field("clip_eps", "rl: PPO ratio clip epsilon", &TrainConfig::clip_eps, 0, 10, true),
      int_field("ppo_epochs",
                "rl: optimizer steps per sampled batch (ratio clipped after the first)",
                &TrainConfig::ppo_epochs, 1, 1000),
      real_field("kl_coef", "rl: weight of the k3 KL estimate to the initial policy (0 = off)",
                 &TrainConfig::kl_coef, 0, 1e6),
      real_field("adv_eps", "rl: added to the group's reward std", &TrainConfig::adv_eps, 0, 1,
                 true),
      string_field("device",
                   "cpu | cuda (the GPU back end: model, optimizers and loss on device 0)",
                   &TrainConfig::device),
      string_field(
          "matmul_precision",
          "cuda: the model's GEMMs, bf16 | tf32 | fp32 (fp32 accumulation, fp32 master weights)",
          &TrainConfig::matmul_precision),
      string_field("attention",
                   "cuda: auto | flash | materialized | cudnn (auto: flash with bf16 GEMMs; "
                   "otherwise materialised while all layers' T x T scores fit a quarter of GPU "
                   "memory; cudnn: cuDNN's fused attention, bf16 only)",
                   &TrainConfig::attention),
      string_field("pion_precision",
                   "cuda: Pion's GEMMs, fp32 | mixed (TF32 tensor cores, fp32 weights)",
                   &TrainConfig::pion_precision),
      string_field("muon_precision", "cuda: Muon's Newton-Schulz, bf16 | fp32",
                   &TrainConfig::muon_precision),
      bool_field("cuda_graphs",
                 "cuda: replay the forward/backward pass and the optimizer step as CUDA graphs "
                 "(false: launch every kernel, for profilers and debuggers)",
                 &TrainConfig::cuda_graphs),
  };
  return table;
}

const Field* find_field(const std::string& key) {
  for (const auto& f : fields())
    if (f.key.name == key) return &f;
  return nullptr;
}

std::string valid_keys() {
  std::string s;
  for (const auto& f : fields()) s += (s.empty() ? "" : ", ") + f.key.name;
  return s;
}

bool one_of(const std::string& v, std::initializer_list<const char*> options) {
  for (const char* o : options)
    if (v == o) return true;
  return false;
}

// A string config key naming one of an Options enum's values (pion/optim/options.h).
void check_choice(const char* key, const std::string& v, const Choices& c) {
  for (int i = 0; i < c.count; ++i)
    if (v == c.names[i]) return;
  throw Error(std::string("config key '") + key + "' must be " + allowed_text(c) + ", got " +
              input::describe(v));
}

}  // namespace

const std::vector<ConfigKey>& train_config_keys() {
  static const std::vector<ConfigKey> keys = [] {
    std::vector<ConfigKey> k;
    for (const auto& f : fields()) k.push_back(f.key);
    return k;
  }();
  return keys;
}

void set_config_value(TrainConfig& config, const std::string& key, const nlohmann::json& value) {
  const Field* f = find_field(key);
  check(f != nullptr,
        "unknown config key " + input::describe(key) + "; valid keys: " + valid_keys());
  f->set(config, value);
}

void apply_config_json(TrainConfig& config, const nlohmann::json& object) {
  check(object.is_object(), "a config must be a JSON object of key: value");
  for (const auto& [key, value] : object.items()) set_config_value(config, key, value);
}

nlohmann::json read_json_file(const std::string& path) {
  // A regular file of at most input::kMaxJsonBytes, nested at most input::kMaxJsonDepth deep,
  // no key twice: a device, a directory or a pathological file is one clear error.
  return input::read_json_file(path, "config file");
}

nlohmann::json parse_flag_value(const std::string& text) {
  if (text == "true") return true;
  if (text == "false") return false;
  try {
    std::size_t used = 0;
    long long i = std::stoll(text, &used);
    if (used == text.size()) return i;
  } catch (...) {
  }
  try {
    std::size_t used = 0;
    double d = std::stod(text, &used);
    if (used == text.size()) return d;
  } catch (...) {
  }
  return text;
}

nlohmann::json TrainConfig::to_json() const {
  nlohmann::json j;
  for (const auto& f : fields()) j[f.key.name] = f.get(*this);
  return j;
}

void TrainConfig::validate() const {
  // Every key's type and range, exactly as set_config_value checks them (a config built in code,
  // or read back from a checkpoint, meets the same bounds as one from a file or flags).
  TrainConfig scratch;
  for (const auto& f : fields()) f.set(scratch, f.get(*this));
  check(d_model % n_head == 0 && (d_model / n_head) % 2 == 0,
        "config: d_model must be a multiple of n_head with an even head size (RoPE), got d_model " +
            std::to_string(d_model) + ", n_head " + std::to_string(n_head));
  check(n_kv_head == 0 || n_head % n_kv_head == 0,
        "config key 'n_kv_head' must divide n_head (or be 0, meaning n_head), got n_kv_head " +
            std::to_string(n_kv_head) + ", n_head " + std::to_string(n_head));
  check(one_of(tokenizer, {"char", "byte", "bpe"}),
        "config key 'tokenizer' must be char, byte or bpe, got " + input::describe(tokenizer));
  check(one_of(schedule, {"cosine", "wsd", "constant"}),
        "config key 'schedule' must be cosine, wsd or constant, got " + input::describe(schedule));
  check(one_of(optimizer, {"adamw", "muon", "pion"}),
        "config key 'optimizer' must be adamw, muon or pion, got " + input::describe(optimizer));
  check(one_of(init, {"normal", "spectral"}),
        "config key 'init' must be normal or spectral, got " + input::describe(init));
  check(one_of(pion_retraction, {"taylor2", "cayley", "exp"}),
        "config key 'pion_retraction' must be taylor2, cayley or exp, got " +
            input::describe(pion_retraction));
  check_choice("pion_momentum", pion_momentum, kPionMomenta);
  check_choice("pion_update_side", pion_update_side, kPionUpdateSides);
  check_choice("pion_normalizer", pion_normalizer, kPionNormalizers);
  check(pion_normalizer != "msign" || pion_momentum == "lie",
        "config: pion_normalizer msign needs pion_momentum lie (it orthogonalises the "
        "generators' momentum buffers), got pion_momentum " + input::describe(pion_momentum));
  check(one_of(norm, {"rmsnorm", "none"}),
        "config key 'norm' must be rmsnorm or none, got " + input::describe(norm));
  check(!out_dir.empty(), "config key 'out_dir' must not be empty");
  check(one_of(device, {"cpu", "cuda"}),
        "config key 'device' must be cpu or cuda, got " + input::describe(device));
  check(one_of(matmul_precision, {"bf16", "tf32", "fp32"}),
        "config key 'matmul_precision' must be bf16, tf32 or fp32, got " +
            input::describe(matmul_precision));
  check(one_of(attention, {"auto", "flash", "materialized", "cudnn"}),
        "config key 'attention' must be auto, flash, materialized or cudnn, got " +
            input::describe(attention));
  check(
      one_of(pion_precision, {"fp32", "mixed"}),
      "config key 'pion_precision' must be fp32 or mixed, got " + input::describe(pion_precision));
  check(one_of(muon_precision, {"bf16", "fp32"}),
        "config key 'muon_precision' must be bf16 or fp32, got " + input::describe(muon_precision));
}

}  // namespace pion
