#include "pion/train/config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <functional>
#include <sstream>

#include "pion/core/error.h"
#include "pion/core/input.h"

namespace pion {

namespace {

struct Field {
  ConfigKey key;
  std::function<void(TrainConfig&, const nlohmann::json&)> set;
  std::function<nlohmann::json(const TrainConfig&)> get;
};

// The longest string value (paths, names) a config key may hold.
constexpr std::size_t kMaxConfigString = 4096;

template <class T>
Field field(const char* name, const char* help, T TrainConfig::*member) {
  return Field{
      {name, help},
      [member, name](TrainConfig& c, const nlohmann::json& v) {
        // Typed, range-checked reads (pion/core/input.h): a value that does not fit the field
        // (4294967297 or 1.7 for an int, 1e999 for a double) is an error, never converted.
        const std::string where = std::string("config key '") + name + "'";
        if constexpr (std::is_same_v<T, std::string>) {
          c.*member = input::to_string(v, kMaxConfigString, where);
        } else if constexpr (std::is_floating_point_v<T>) {
          check(v.is_number(), where + " must be a number, got " + input::describe(v));
          check(std::isfinite(v.get<double>()),
                where + " must be a finite number, got " + input::describe(v));
          c.*member = v.get<T>();
        } else if constexpr (std::is_unsigned_v<T>) {
          c.*member = static_cast<T>(
              input::to_int(v, 0, std::numeric_limits<std::int64_t>::max(), where));
        } else {
          c.*member = static_cast<T>(input::to_int(v, std::numeric_limits<T>::min(),
                                                   std::numeric_limits<T>::max(), where));
        }
      },
      [member](const TrainConfig& c) { return nlohmann::json(c.*member); }};
}

const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      field("data", "text file, prepared dataset dir, or 'fortunes' (built-in corpus)", &TrainConfig::data),
      field("tokenizer", "char | byte | bpe", &TrainConfig::tokenizer),
      field("vocab_size", "vocabulary size of a trained bpe tokenizer", &TrainConfig::vocab_size),
      field("val_fraction", "last fraction of the text used for validation", &TrainConfig::val_fraction),
      field("n_layer", "transformer blocks", &TrainConfig::n_layer),
      field("n_head", "attention heads", &TrainConfig::n_head),
      field("d_model", "model width", &TrainConfig::d_model),
      field("ffn_hidden", "SwiGLU hidden size (0 = multiple of 32 above 8/3 d_model)", &TrainConfig::ffn_hidden),
      field("seq_len", "context length in tokens", &TrainConfig::seq_len),
      field("dropout", "dropout rate (0 = off)", &TrainConfig::dropout),
      field("init", "normal | spectral", &TrainConfig::init),
      field("init_std", "std of the normal init", &TrainConfig::init_std),
      field("batch_size", "sequences per micro-batch", &TrainConfig::batch_size),
      field("grad_accum", "micro-batches per optimizer step", &TrainConfig::grad_accum),
      field("max_iters", "optimizer steps", &TrainConfig::max_iters),
      field("warmup_iters", "linear warmup steps", &TrainConfig::warmup_iters),
      field("schedule", "cosine | wsd | constant", &TrainConfig::schedule),
      field("min_lr_ratio", "final lr as a fraction of the peak", &TrainConfig::min_lr_ratio),
      field("optimizer", "adamw | muon | pion", &TrainConfig::optimizer),
      field("lr", "AdamW lr (all params for adamw; non-matrix params for muon/pion)", &TrainConfig::lr),
      field("matrix_lr", "lr of the Muon or Pion group (hidden matrices)", &TrainConfig::matrix_lr),
      field("weight_decay", "decoupled weight decay (AdamW 2-D params and Muon; never Pion)", &TrainConfig::weight_decay),
      field("beta1", "first-moment decay (AdamW and Pion)", &TrainConfig::beta1),
      field("beta2", "second-moment decay (AdamW and Pion)", &TrainConfig::beta2),
      field("grad_clip", "clip the global gradient norm to this (0 = off)", &TrainConfig::grad_clip),
      field("muon_momentum", "Muon momentum", &TrainConfig::muon_momentum),
      field("pion_c", "Pion target update RMS constant c", &TrainConfig::pion_c),
      field("pion_retraction", "taylor2 | cayley | exp", &TrainConfig::pion_retraction),
      field("pion_reanchor_every", "re-project onto the initial spectrum every N steps (0 = off)", &TrainConfig::pion_reanchor_every),
      field("eval_interval", "steps between validation evals", &TrainConfig::eval_interval),
      field("eval_iters", "validation batches per eval", &TrainConfig::eval_iters),
      field("log_interval", "steps between progress lines", &TrainConfig::log_interval),
      field("checkpoint_interval", "steps between checkpoints (0 = at the end only)", &TrainConfig::checkpoint_interval),
      field("seed", "random seed", &TrainConfig::seed),
      field("threads", "OpenMP/BLAS threads (0 = all cores)", &TrainConfig::threads),
      field("out_dir", "output directory (metrics, summary, checkpoint)", &TrainConfig::out_dir),
      field("device", "cpu | cuda (the GPU back end: model, optimizers and loss on device 0)", &TrainConfig::device),
      field("matmul_precision", "cuda: the model's GEMMs, bf16 | tf32 | fp32 (fp32 accumulation, fp32 master weights)", &TrainConfig::matmul_precision),
      field("attention", "cuda: auto | flash | materialized (auto: materialised while all layers' T x T scores fit a quarter of GPU memory)", &TrainConfig::attention),
      field("pion_precision", "cuda: Pion's GEMMs, fp32 | mixed (TF32 tensor cores, fp32 weights)", &TrainConfig::pion_precision),
      field("muon_precision", "cuda: Muon's Newton-Schulz, bf16 | fp32", &TrainConfig::muon_precision),
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
  check(f != nullptr, "unknown config key '" + key + "'; valid keys: " + valid_keys());
  f->set(config, value);
}

void apply_config_json(TrainConfig& config, const nlohmann::json& object) {
  check(object.is_object(), "a config must be a JSON object of key: value");
  for (const auto& [key, value] : object.items()) set_config_value(config, key, value);
}

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  check(static_cast<bool>(in), "cannot open config file '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw Error("config file '" + path + "' is not valid JSON: " + e.what());
  }
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
  auto positive = [](int v, const char* key) {
    check(v > 0, std::string("config key '") + key + "' must be > 0, got " + std::to_string(v));
  };
  positive(n_layer, "n_layer");
  positive(n_head, "n_head");
  positive(d_model, "d_model");
  positive(seq_len, "seq_len");
  positive(batch_size, "batch_size");
  positive(grad_accum, "grad_accum");
  positive(max_iters, "max_iters");
  positive(eval_iters, "eval_iters");
  positive(log_interval, "log_interval");
  check(d_model % n_head == 0 && (d_model / n_head) % 2 == 0,
        "config: d_model must be a multiple of n_head with an even head size (RoPE), got d_model " +
            std::to_string(d_model) + ", n_head " + std::to_string(n_head));
  check(ffn_hidden >= 0, "config key 'ffn_hidden' must be >= 0");
  check(warmup_iters >= 0 && eval_interval >= 0 && checkpoint_interval >= 0 && threads >= 0 &&
            pion_reanchor_every >= 0,
        "config: warmup_iters, eval_interval, checkpoint_interval, threads and pion_reanchor_every must be >= 0");
  check(one_of(tokenizer, {"char", "byte", "bpe"}), "config key 'tokenizer' must be char, byte or bpe, got '" + tokenizer + "'");
  check(one_of(schedule, {"cosine", "wsd", "constant"}), "config key 'schedule' must be cosine, wsd or constant, got '" + schedule + "'");
  check(one_of(optimizer, {"adamw", "muon", "pion"}), "config key 'optimizer' must be adamw, muon or pion, got '" + optimizer + "'");
  check(one_of(init, {"normal", "spectral"}), "config key 'init' must be normal or spectral, got '" + init + "'");
  check(one_of(pion_retraction, {"taylor2", "cayley", "exp"}), "config key 'pion_retraction' must be taylor2, cayley or exp");
  check(vocab_size >= 8 && vocab_size <= 65536, "config key 'vocab_size' must lie in [8, 65536]");
  check(val_fraction > 0 && val_fraction < 1, "config key 'val_fraction' must lie in (0, 1)");
  check(dropout >= 0 && dropout < 1, "config key 'dropout' must lie in [0, 1)");
  check(lr > 0 && matrix_lr > 0, "config keys 'lr' and 'matrix_lr' must be > 0");
  check(min_lr_ratio >= 0 && min_lr_ratio <= 1, "config key 'min_lr_ratio' must lie in [0, 1]");
  check(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "config keys 'beta1', 'beta2' must lie in [0, 1)");
  check(weight_decay >= 0 && grad_clip >= 0 && init_std > 0 && pion_c > 0,
        "config: weight_decay and grad_clip must be >= 0, init_std and pion_c > 0");
  check(!out_dir.empty(), "config key 'out_dir' must not be empty");
  check(one_of(device, {"cpu", "cuda"}), "config key 'device' must be cpu or cuda, got '" + device + "'");
  check(one_of(matmul_precision, {"bf16", "tf32", "fp32"}), "config key 'matmul_precision' must be bf16, tf32 or fp32, got '" + matmul_precision + "'");
  check(one_of(attention, {"auto", "flash", "materialized"}), "config key 'attention' must be auto, flash or materialized, got '" + attention + "'");
  check(one_of(pion_precision, {"fp32", "mixed"}), "config key 'pion_precision' must be fp32 or mixed, got '" + pion_precision + "'");
  check(one_of(muon_precision, {"bf16", "fp32"}), "config key 'muon_precision' must be bf16 or fp32, got '" + muon_precision + "'");
}

}  // namespace pion
