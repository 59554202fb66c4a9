#include "pion/train/hf_checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/core/random.h"
#include "pion/core/safetensors.h"
#include "pion/data/tokenizer.h"
#include "pion/model/hf.h"
#include "pion/model/llama.h"
#include "pion/model/memory.h"
#include "pion/train/checkpoint.h"
#include "pion/train/config.h"
#include "pion/train/session.h"

namespace pion {

namespace fs = std::filesystem;

namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr std::uint64_t kMaxTokenizerBytes = std::uint64_t{64} << 20;

std::string gib(std::uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

// A weight_map file name must name a file inside the directory.
bool plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

struct Located {
  const MappedSafetensors* file = nullptr;
  const SafetensorsEntry* entry = nullptr;
};

// The tensors of the model directory's safetensors files, by name.
struct HfWeights {
  std::vector<std::unique_ptr<MappedSafetensors>> files;
  std::map<std::string, Located> tensors;
};

HfWeights open_weights(const fs::path& dir) {
  const std::string where = "'" + dir.string() + "'";
  HfWeights out;
  std::vector<std::string> names;
  std::map<std::string, std::string> weight_map;
  const fs::path index_path = dir / kIndexFile;
  if (fs::exists(index_path)) {
    const std::string iw = "'" + index_path.string() + "'";
    const nlohmann::json index = input::read_json_file(index_path.string(), "safetensors index");
    check(index.is_object() && index.contains("weight_map") && index.at("weight_map").is_object(),
          iw + " must be a JSON object with a \"weight_map\" object (tensor name -> file)");
    std::set<std::string> seen;
    for (const auto& [tensor, file] : index.at("weight_map").items()) {
      const std::string name = input::to_string(file, 4096, iw + " weight_map entry " + input::describe(tensor));
      check(plain_file_name(name), iw + ": weight_map names the file " + input::describe(name) +
                                       ", which is not a file name inside the directory");
      weight_map[tensor] = name;
      if (seen.insert(name).second) names.push_back(name);
    }
    check(!names.empty(), iw + ": weight_map is empty");
  } else {
    check(fs::exists(dir / kSingleFile),
          where + " has neither " + kSingleFile + " nor " + kIndexFile +
              " (pion reads safetensors weights only; convert pytorch_model.bin first)");
    names.push_back(kSingleFile);
  }
  for (const std::string& name : names) {
    const fs::path p = dir / name;
    check(fs::exists(p), where + ": the weights file '" + name + "' is missing");
    out.files.push_back(std::make_unique<MappedSafetensors>(p.string()));
    const MappedSafetensors& f = *out.files.back();
    for (const SafetensorsEntry& e : f.index().entries) {
      const auto [it, inserted] = out.tensors.emplace(e.name, Located{&f, &e});
      check(inserted, where + ": tensor " + input::describe(e.name) + " is in both '" +
                          fs::path(it->second.file->path()).filename().string() + "' and '" +
                          name + "'");
    }
  }
  for (const auto& [tensor, file] : weight_map) {
    const auto it = out.tensors.find(tensor);
    check(it != out.tensors.end() && fs::path(it->second.file->path()).filename() == file,
          where + ": " + kIndexFile + " puts tensor " + input::describe(tensor) + " in '" + file +
              "', which does not hold it");
  }
  return out;
}

// (pion name, HF name) of every parameter, in layout order.
std::vector<std::pair<std::string, std::string>> hf_names(const std::vector<ParamEntry>& layout) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const ParamEntry& e : layout) out.emplace_back(e.name, hf::tensor_name(e.name));
  return out;
}

bool same_values(const MappedSafetensors& fa, const SafetensorsEntry& a,
                 const MappedSafetensors& fb, const SafetensorsEntry& b) {
  return a.dtype == b.dtype && a.shape == b.shape && fa.bytes(a) == fb.bytes(b);
}

std::int64_t first_non_finite(const float* p, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return i;
  return -1;
}

// ---- writing a Hugging Face safetensors file ---------------------------------------------------

struct ExportTensor {
  std::string hf_name;
  const SafetensorsEntry* entry;  // in the checkpoint
};

const char* hf_dtype(const std::string& dtype) {
  if (dtype == "bf16") return "BF16";
  if (dtype == "fp16") return "F16";
  return "F32";
}

std::uint64_t out_bytes(const SafetensorsEntry& e, const std::string& dtype) {
  return static_cast<std::uint64_t>(shape_numel(e.shape)) * (dtype == "fp32" ? 4u : 2u);
}

void write_all(int fd, const void* data, std::size_t size, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error("cannot write '" + path + "': " + std::strerror(errno) + " (is the disk full?)");
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

// One standard safetensors file ({"format": "pt"} metadata, as transformers expects), each
// tensor converted from the checkpoint in chunks.
void write_hf_file(const std::string& path, const std::vector<ExportTensor>& tensors,
                   const MappedSafetensors& ck, const std::string& dtype) {
  nlohmann::json header = nlohmann::json::object();
  std::uint64_t offset = 0;
  for (const ExportTensor& t : tensors) {
    const std::uint64_t n = out_bytes(*t.entry, dtype);
    header[t.hf_name] = {{"dtype", hf_dtype(dtype)},
                         {"shape", t.entry->shape},
                         {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i)
    prefix[static_cast<std::size_t>(i)] = static_cast<char>(static_cast<std::uint64_t>(text.size()) >> (8 * i));
  prefix += text;

  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  check(fd >= 0, "cannot create '" + path + "': " + std::strerror(errno));
  try {
    write_all(fd, prefix.data(), prefix.size(), path);
    constexpr std::size_t kChunk = std::size_t{1} << 20;
    std::vector<float> f32(kChunk);
    std::vector<std::uint16_t> half(kChunk);
    for (const ExportTensor& t : tensors) {
      const std::string_view bytes = ck.bytes(*t.entry);
      const std::size_t element = t.entry->dtype == "F64" ? 8 : 4;
      const std::size_t numel = static_cast<std::size_t>(shape_numel(t.entry->shape));
      for (std::size_t at = 0; at < numel; at += kChunk) {
        const std::size_t n = std::min(kChunk, numel - at);
        convert_to_f32(t.entry->dtype, bytes.data() + at * element, n, f32.data(),
                       "checkpoint '" + ck.path() + "', tensor " + input::describe(t.entry->name));
        const std::int64_t bad = first_non_finite(f32.data(), static_cast<std::int64_t>(n));
        check(bad < 0, "checkpoint '" + ck.path() + "': " + input::describe(t.entry->name) +
                           " holds a non-finite value (element " +
                           std::to_string(static_cast<std::int64_t>(at) + bad) +
                           "); refusing to export damaged weights");
        if (dtype == "fp32") {
          write_all(fd, f32.data(), n * 4, path);
          continue;
        }
        for (std::size_t i = 0; i < n; ++i)
          half[i] = dtype == "bf16" ? f32_to_bf16(f32[i]) : f32_to_f16(f32[i]);
        write_all(fd, half.data(), n * 2, path);
      }
    }
    check(::fsync(fd) == 0, "cannot sync '" + path + "': " + std::strerror(errno));
  } catch (...) {
    ::close(fd);
    throw;
  }
  check(::close(fd) == 0, "cannot close '" + path + "': " + std::strerror(errno));
}

void write_text_file(const fs::path& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  check(fd >= 0, "cannot create '" + path.string() + "': " + std::strerror(errno));
  try {
    write_all(fd, text.data(), text.size(), path.string());
    check(::fsync(fd) == 0, "cannot sync '" + path.string() + "': " + std::strerror(errno));
  } catch (...) {
    ::close(fd);
    throw;
  }
  check(::close(fd) == 0, "cannot close '" + path.string() + "': " + std::strerror(errno));
}

}  // namespace

// ---- import -------------------------------------------------------------------------------------

HfImportReport import_hf(const HfImportOptions& options) {
  check(!options.dir.empty(), "import-hf: give the Hugging Face model directory");
  check(!options.out.empty(), "import-hf: give --out CHECKPOINT (the pion checkpoint to write)");
  const fs::path dir(options.dir);
  const std::string where = "'" + options.dir + "'";
  check(fs::is_directory(dir), "import-hf: " + where + " is not a directory (give a Hugging Face "
                               "model directory holding config.json and the safetensors weights)");
  check(!fs::exists(options.out), "import-hf: '" + options.out +
                                      "' already exists; remove it or choose another --out");
  check(options.seq_len >= 0 && options.seq_len <= kMaxSeqLen,
        "import-hf: --seq_len must be in [1, " + std::to_string(kMaxSeqLen) + "]");

  // config.json
  const fs::path config_path = dir / "config.json";
  check(fs::exists(config_path), "import-hf: " + where + " has no config.json; is it a Hugging Face model directory?");
  const nlohmann::json hf_json = input::read_json_file(config_path.string(), "config.json");
  const hf::HfConfig hc = hf::config_from_hf(hf_json, "'" + config_path.string() + "'", options.seq_len);
  const ModelConfig& model = hc.model;
  HfImportReport report;
  report.model = model;
  report.max_position_embeddings = hf_json.at("max_position_embeddings").get<int>();

  // tokenizer.model, taken over as the run's tokenizer.
  const fs::path tok_path = dir / "tokenizer.model";
  check(fs::exists(tok_path),
        "import-hf: " + where + " has no tokenizer.model (pion takes over the model's "
        "SentencePiece tokenizer; models with only tokenizer.json, such as LLaMA-3, cannot be "
        "imported)");
  const std::string tok_bytes = input::read_file(tok_path.string(), kMaxTokenizerBytes, "tokenizer.model");
  std::unique_ptr<Tokenizer> tokenizer = make_bpe_tokenizer(tok_bytes, "'" + tok_path.string() + "'");
  check(tokenizer->vocab_size() == model.vocab_size,
        "import-hf: '" + tok_path.string() + "' has " + std::to_string(tokenizer->vocab_size()) +
            " pieces but config.json says vocab_size " + std::to_string(model.vocab_size) +
            "; pion needs them equal");

  // The weights: every tensor located, with its shape and dtype, before anything is allocated.
  HfWeights weights = open_weights(dir);
  const auto layout = llama_param_layout(model);
  const auto names = hf_names(layout);
  std::set<std::string> expected, dtypes;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const std::string& hf_name = names[i].second;
    expected.insert(hf_name);
    const auto it = weights.tensors.find(hf_name);
    check(it != weights.tensors.end(),
          "import-hf: " + where + " lacks the tensor \"" + hf_name + "\" that config.json implies");
    const SafetensorsEntry& e = *it->second.entry;
    check(e.shape == layout[i].shape,
          "import-hf: tensor \"" + hf_name + "\" has shape " + shape_string(e.shape) +
              ", config.json implies " + shape_string(layout[i].shape));
    check(e.dtype == "F32" || e.dtype == "BF16" || e.dtype == "F16",
          "import-hf: tensor \"" + hf_name + "\" has dtype " + e.dtype +
              " (pion imports BF16, F16 and F32 weights)");
    dtypes.insert(e.dtype);
  }
  for (const auto& [name, located] : weights.tensors) {
    if (expected.count(name) == 1) continue;
    // A buffer some transformers versions saved; recomputed from rope_theta, like ours.
    if (name.size() > 20 && name.compare(name.size() - 20, 20, ".rotary_emb.inv_freq") == 0) continue;
    if (model.tie_embeddings && name == "lm_head.weight") {
      const Located& embed = weights.tensors.at("model.embed_tokens.weight");
      check(same_values(*located.file, *located.entry, *embed.file, *embed.entry),
            "import-hf: config.json ties the embeddings (tie_word_embeddings true) but "
            "lm_head.weight differs from model.embed_tokens.weight");
      continue;
    }
    throw Error("import-hf: " + where + " holds the tensor " + input::describe(name) +
                ", which a LlamaForCausalLM of this config.json does not have; pion cannot "
                "import this model");
  }
  for (const auto& d : dtypes) report.dtypes += (report.dtypes.empty() ? "" : "+") + d;
  for (const auto& f : weights.files) report.files.push_back(f->path());

  const std::uint64_t weight_bytes = static_cast<std::uint64_t>(model.num_params()) * 4;
  report.weight_bytes = static_cast<std::int64_t>(weight_bytes);
  const MemoryLimit limit = process_memory_limit();
  check(weight_bytes <= limit.bytes,
        "import-hf: the model's fp32 weights need " + gib(weight_bytes) + "; this process may use " +
            gib(limit.bytes) + " (" + limit.source + ")");

  // One fp32 buffer; each tensor converted from its mapped file into its place.
  Tensor buffer = Tensor::empty({model.num_params()}, DType::F32);
  TensorFile file;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const Located& src = weights.tensors.at(names[i].second);
    Tensor dst = buffer.view(layout[i].offset, layout[i].shape);
    src.file->read_f32(*src.entry, dst.data<float>());
    const std::int64_t bad = first_non_finite(dst.data<float>(), dst.numel());
    check(bad < 0, "import-hf: tensor \"" + names[i].second + "\" holds a non-finite value (element " +
                       std::to_string(bad) + ")");
    file.tensors.emplace("model." + names[i].first, dst);
  }
  weights.files.clear();  // unmap

  // An ordinary training checkpoint at step 0: the config a `pion train` of this shape would
  // have saved, the tokenizer inside, no optimizer state.
  TrainConfig config;
  config.data = options.dir;
  config.tokenizer = "bpe";
  config.vocab_size = std::max(8, model.vocab_size);
  config.n_layer = model.n_layer;
  config.n_head = model.n_head;
  config.d_model = model.d_model;
  config.ffn_hidden = model.ffn_size();
  config.seq_len = model.seq_len;
  config.norm = "rmsnorm";
  config.dropout = 0.0;
  // The model keys `pion train` also takes (where this build has them: n_kv_head,
  // tie_embeddings, rope_theta, norm_eps), so pion.config agrees with pion.model_config.
  const nlohmann::json model_json = model.to_json();
  for (const ConfigKey& key : train_config_keys())
    if (key.name == "n_kv_head" || key.name == "tie_embeddings" || key.name == "rope_theta" ||
        key.name == "norm_eps")
      set_config_value(config, key.name, model_json.at(key.name));
  config.out_dir = fs::path(options.out).parent_path().empty()
                       ? std::string(".")
                       : fs::path(options.out).parent_path().string();
  config.validate();
  file.metadata[kEmbeddedTokenizerKey] = tokenizer->to_json();
  const nlohmann::json extra = {{"mode", "import-hf"},
                                {"from", options.dir},
                                {"hf_torch_dtype", hc.torch_dtype},
                                {"hf_weights_dtype", report.dtypes},
                                {"hf_max_position_embeddings", report.max_position_embeddings}};
  const fs::path parent = fs::path(options.out).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  write_train_checkpoint(options.out, config, model, std::move(file), TrainProgress{},
                         nlohmann::json(""), Rng(config.seed), extra);
  return report;
}

// ---- export -------------------------------------------------------------------------------------

HfExportReport export_hf(const HfExportOptions& options) {
  check(!options.checkpoint.empty(), "export-hf: give the checkpoint to export");
  check(!options.out.empty(), "export-hf: give --out DIR (the Hugging Face directory to create)");
  check(options.dtype == "fp32" || options.dtype == "bf16" || options.dtype == "fp16",
        "export-hf: --dtype must be fp32, bf16 or fp16 (got " + input::describe(options.dtype) + ")");
  const fs::path out(options.out);
  check(!fs::exists(out) || (fs::is_directory(out) && fs::is_empty(out)),
        "export-hf: '" + options.out + "' already exists and is not an empty directory; remove it "
        "or choose another --out");
  const std::string& path = options.checkpoint;
  check(fs::exists(path), "export-hf: no checkpoint at '" + path + "'");

  MappedSafetensors ck(path);
  TensorFile meta;  // metadata only, for the checkpoint checks
  meta.metadata = ck.index().metadata;
  meta.checksummed = ck.index().checksummed;
  check_pion_checkpoint(meta, path);
  const ModelConfig model = ModelConfig::from_json(checkpoint_metadata(meta, "pion.model_config", path));
  const nlohmann::json extra = meta.metadata.count("pion.extra")
                                   ? checkpoint_metadata(meta, "pion.extra", path)
                                   : nlohmann::json::object();
  const std::unique_ptr<Tokenizer> tokenizer = load_checkpoint_tokenizer(meta.metadata, extra, path);
  check(tokenizer->vocab_size() == model.vocab_size,
        "export-hf: the tokenizer of '" + path + "' does not match its vocabulary size");
  const std::string torch_dtype =
      options.dtype == "fp32" ? "float32" : options.dtype == "bf16" ? "bfloat16" : "float16";
  const nlohmann::json hf_config =
      hf::config_to_hf(model, torch_dtype, tokenizer->bos_id(), tokenizer->eos_id());

  // Every weight present with its shape (the checkpoint's optimizer state is not exported).
  const auto layout = llama_param_layout(model);
  const auto names = hf_names(layout);
  std::vector<ExportTensor> tensors;
  std::size_t model_tensors = 0;
  for (const auto& e : ck.index().entries)
    if (e.name.rfind("model.", 0) == 0) ++model_tensors;
  check(model_tensors == names.size(),
        "export-hf: '" + path + "' holds " + std::to_string(model_tensors) +
            " model tensors, its model config implies " + std::to_string(names.size()));
  for (std::size_t i = 0; i < names.size(); ++i) {
    const SafetensorsEntry* e = ck.find("model." + names[i].first);
    check(e != nullptr, "export-hf: '" + path + "' lacks the tensor \"model." + names[i].first + "\"");
    check(e->shape == layout[i].shape && (e->dtype == "F32" || e->dtype == "F64"),
          "export-hf: '" + path + "': \"model." + names[i].first + "\" is " + e->dtype + " " +
              shape_string(e->shape) + ", the model expects F32 " + shape_string(layout[i].shape));
    tensors.push_back({names[i].second, e});
  }

  // Shards: tensors in layout order, a new file when the next would pass the limit (a tensor
  // larger than the limit gets a file of its own, as in transformers).
  std::vector<std::vector<ExportTensor>> shards(1);
  std::uint64_t in_shard = 0, total = 0;
  for (const ExportTensor& t : tensors) {
    const std::uint64_t n = out_bytes(*t.entry, options.dtype);
    if (options.max_shard_bytes > 0 && in_shard > 0 && in_shard + n > options.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(t);
    in_shard += n;
    total += n;
  }

  HfExportReport report;
  report.model = model;
  // Everything goes into a temp directory beside `out`, renamed into place at the end.
  const fs::path parent = out.parent_path().empty() ? fs::path(".") : out.parent_path();
  check(fs::is_directory(parent), "export-hf: the parent directory of '" + options.out + "' does not exist");
  const fs::path tmp = parent / ("." + out.filename().string() + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directory(tmp);
  try {
    write_text_file(tmp / "config.json", hf_config.dump(2) + "\n");
    report.files.push_back("config.json");
    if (shards.size() == 1 && options.max_shard_bytes == 0) {
      write_hf_file((tmp / kSingleFile).string(), shards[0], ck, options.dtype);
      report.files.push_back(kSingleFile);
    } else {
      nlohmann::json weight_map = nlohmann::json::object();
      const std::size_t n = shards.size();
      for (std::size_t s = 0; s < n; ++s) {
        char name[64];
        std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, n);
        write_hf_file((tmp / name).string(), shards[s], ck, options.dtype);
        for (const ExportTensor& t : shards[s]) weight_map[t.hf_name] = name;
        report.files.push_back(name);
      }
      const nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
      write_text_file(tmp / kIndexFile, index.dump(2) + "\n");
      report.files.push_back(kIndexFile);
    }
    const std::string sp = tokenizer->sentencepiece_model();
    if (!sp.empty()) {
      write_text_file(tmp / "tokenizer.model", sp);
      report.files.push_back("tokenizer.model");
    }
    if (fs::exists(out)) fs::remove(out);  // an empty directory (checked above)
    fs::rename(tmp, out);
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
  return report;
}

std::uint64_t parse_byte_size(const std::string& text, const std::string& what) {
  std::size_t i = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') ++i;
  const std::string digits = text.substr(0, i), unit = text.substr(i);
  static const std::map<std::string, std::uint64_t> units = {
      {"", 1},          {"B", 1},           {"KB", 1000},        {"MB", 1000000},
      {"GB", 1000000000}, {"KiB", 1024},    {"MiB", 1024 * 1024}, {"GiB", 1024 * 1024 * 1024}};
  const auto u = units.find(unit);
  check(!digits.empty() && digits.size() <= 12 && u != units.end(),
        what + " must be a size such as 2GB, 500MB, 4GiB or a number of bytes (got " +
            input::describe(text) + ")");
  const std::uint64_t value = std::stoull(digits) * u->second;
  check(value > 0, what + " must be positive");
  return value;
}

}  // namespace pion
