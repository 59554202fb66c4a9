#include "pion/train/session.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <numeric>
#include <span>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/core/safetensors.h"
#include "pion/data/corpus.h"
#include "pion/dist/communicator.h"
#include "pion/model/mapped_weights.h"
#include "pion/train/checkpoint.h"

namespace pion {

namespace fs = std::filesystem;

namespace {

// A prepared dataset is checked whole when a run starts, not when a later eval first needs a
// piece of it: its tokenizer must load and agree with meta.json's vocabulary.
DatasetSummary checked(DatasetSummary s) {
  const auto tokenizer = load_tokenizer(s.tokenizer_path);
  check(tokenizer->vocab_size() == s.vocab_size,
        "dataset '" + s.dir + "': tokenizer '" + s.tokenizer_path + "' has " +
            std::to_string(tokenizer->vocab_size()) + " tokens but meta.json says " +
            std::to_string(s.vocab_size) + "; prepare the dataset again with `pion prepare`");
  return s;
}

}  // namespace

DatasetSummary resolve_dataset(const TrainConfig& config) {
  if (config.data != "fortunes" && is_prepared_dataset(config.data))
    return checked(load_dataset_summary(config.data));
  const std::string dir = (fs::path(config.out_dir) / "data").string();
  if (is_prepared_dataset(dir)) {
    DatasetSummary s = checked(load_dataset_summary(dir));
    check(s.tokenizer_kind == config.tokenizer,
          "'" + dir + "' was prepared with the " + s.tokenizer_kind + " tokenizer, not " +
              config.tokenizer + "; use another out_dir or delete that directory");
    return s;
  }
  if (config.data == "fortunes") {
    std::cout << "preparing the built-in corpus (Debian fortunes) with the " << config.tokenizer
              << " tokenizer in " << dir << "\n";
    return prepare_dataset_from_text(default_corpus_text(), "fortunes", config.tokenizer,
                                     config.vocab_size, dir, config.val_fraction);
  }
  check(fs::exists(config.data), "data '" + config.data +
                                     "' does not exist: give a UTF-8 text file, a directory made by "
                                     "`pion prepare`, or 'fortunes' for the built-in corpus");
  check(fs::is_regular_file(config.data), "data '" + config.data +
                                              "' is a directory without meta.json; prepare it with `pion prepare`");
  std::cout << "tokenizing " << config.data << " with the " << config.tokenizer << " tokenizer into "
            << dir << "\n";
  return prepare_dataset(config.data, config.tokenizer, config.vocab_size, dir, config.val_fraction);
}

ModelConfig model_config_for(const TrainConfig& c, int vocab_size) {
  ModelConfig m;
  m.vocab_size = vocab_size;
  m.n_layer = c.n_layer;
  m.n_head = c.n_head;
  m.d_model = c.d_model;
  m.ffn_hidden = c.ffn_hidden;
  m.seq_len = c.seq_len;
  m.dropout = c.dropout;
  m.init = c.init;
  m.init_std = c.init_std;
  m.norm = c.norm;
  m.norm_eps = c.norm_eps;
  m.rope_theta = c.rope_theta;
  m.n_kv_head = c.n_kv_head;
  m.tie_embeddings = c.tie_embeddings;
  m.validate();
  return m;
}

namespace {

LoaderOptions loader_options(const TrainConfig& c) {
  LoaderOptions o;
  o.batch_size = c.batch_size;
  o.seq_len = c.seq_len;
  o.seed = c.seed;
  // Data parallelism: every rank draws the same global batch and keeps its slice.
  o.rank = dist::world().rank();
  o.world_size = dist::world().size();
  return o;
}

// A loader (DataLoader: pretraining windows; FinetuneLoader: prompt/response pairs) as the
// trainer's BatchSource; its position is the loader's state string.
template <class Loader>
class LoaderSource : public BatchSource {
 public:
  explicit LoaderSource(Loader loader) : loader_(std::move(loader)) {}
  void next(std::vector<std::int32_t>& inputs, std::vector<std::int32_t>& targets) override {
    Batch b = loader_.next_batch();
    inputs = std::move(b.inputs);
    targets = std::move(b.targets);
  }
  nlohmann::json state() const override { return loader_.state(); }
  void restore(const nlohmann::json& s) override { loader_.set_state(s.get<std::string>()); }

 private:
  Loader loader_;
};

// Mean of per-batch losses weighted by their target counts (so padding-heavy finetuning
// batches do not skew the mean).
template <class Loader>
Evaluator make_evaluator(std::shared_ptr<Loader> loader, const TrainConfig& c, int batches) {
  const int T = c.seq_len;
  return [loader, batches, T](const BatchLoss& batch_loss) {
    // Each rank evaluates its rows of every eval batch; the sums are reduced over ranks.
    double sums[2] = {0.0, 0.0};  // loss * count, count
    for (int k = 0; k < batches; ++k) {
      Batch b = loader->eval_batch(k);
      std::int64_t counted = 0;
      const double loss = batch_loss(b.inputs, b.targets, static_cast<int>(b.rows), T, counted);
      const double n = static_cast<double>(counted);
      sums[0] += loss * n;
      sums[1] += n;
    }
    dist::world().allreduce_sum(std::span<double>(sums, 2));
    return sums[1] > 0 ? sums[0] / sums[1] : std::nan("");
  };
}

}  // namespace

std::unique_ptr<BatchSource> make_shard_source(const std::string& shard_path, const TrainConfig& config) {
  return std::make_unique<LoaderSource<DataLoader>>(
      DataLoader::from_shard(shard_path, loader_options(config)));
}

std::unique_ptr<BatchSource> make_finetune_source(FinetuneDataset dataset, const TrainConfig& config) {
  return std::make_unique<LoaderSource<FinetuneLoader>>(
      FinetuneLoader(std::move(dataset), loader_options(config)));
}

Evaluator make_shard_evaluator(const std::string& shard_path, const TrainConfig& config, int batches) {
  auto loader = std::make_shared<DataLoader>(DataLoader::from_shard(shard_path, loader_options(config)));
  return make_evaluator(loader, config, batches);
}

Evaluator make_finetune_evaluator(FinetuneDataset dataset, const TrainConfig& config, int batches) {
  auto loader = std::make_shared<FinetuneLoader>(std::move(dataset), loader_options(config));
  return make_evaluator(loader, config, batches);
}

LoadedCheckpoint load_checkpoint(const std::string& path) {
  // Mapped, not read: the weights go from the file straight into the model, so a large
  // (e.g. imported) model is in memory once.
  const MappedSafetensors mapped(path);
  TensorFile file;  // the metadata only
  file.metadata = mapped.index().metadata;
  file.checksummed = mapped.index().checksummed;
  check_pion_checkpoint(file, path);
  LoadedCheckpoint out;
  apply_config_json(out.config, checkpoint_metadata(file, "pion.config", path));
  out.config.validate();
  out.extra = file.metadata.count("pion.extra") ? checkpoint_metadata(file, "pion.extra", path)
                                                : nlohmann::json::object();
  check(out.extra.is_object(), "checkpoint '" + path + "': metadata 'pion.extra' must be an object");
  // The model's shape comes from metadata: compare it with the tensors before allocating.
  const ModelConfig model_config =
      ModelConfig::from_json(checkpoint_metadata(file, "pion.model_config", path));
  const std::string source = "checkpoint '" + path + "'";
  check_model_weights(mapped, "model.", model_config, source);
  out.model = std::make_unique<Llama<float>>(model_config);
  load_model_weights(*out.model, mapped, "model.", source);
  out.tokenizer = load_checkpoint_tokenizer(file.metadata, out.extra, path);
  check(out.tokenizer->vocab_size() == out.model->config().vocab_size,
        "the tokenizer of checkpoint '" + path + "' has " +
            std::to_string(out.tokenizer->vocab_size()) +
            " tokens, which does not match the checkpoint's vocabulary size " +
            std::to_string(out.model->config().vocab_size));
  return out;
}

std::unique_ptr<Tokenizer> load_checkpoint_tokenizer(
    const std::map<std::string, std::string>& metadata, const nlohmann::json& extra,
    const std::string& path) {
  if (auto it = metadata.find(kEmbeddedTokenizerKey); it != metadata.end())
    return tokenizer_from_json(it->second, "checkpoint '" + path + "' metadata '" +
                                               kEmbeddedTokenizerKey + "'");
  check(extra.is_object() && extra.contains("tokenizer"),
        "'" + path + "' does not name its tokenizer");
  std::string tok = input::to_string(extra["tokenizer"], 4096,
                                     "checkpoint '" + path + "' pion.extra key 'tokenizer'");
  if (!fs::exists(tok)) {
    // The run directory may have moved: look beside the checkpoint.
    const fs::path beside = fs::path(path).parent_path() / "tokenizer.json";
    check(fs::exists(beside), "tokenizer '" + tok + "' of checkpoint '" + path + "' is missing");
    tok = beside.string();
  }
  return load_tokenizer(tok);
}

std::vector<std::string> generate(Llama<float>& model, const Tokenizer& tokenizer,
                                  std::span<const std::string> prompts,
                                  const SampleOptions& options, Rng& rng) {
  const TokenGenerator on_cpu = [&model](std::span<const std::vector<std::int32_t>> ids,
                                         const GenerateOptions& g, std::span<Rng> rngs) {
    return generate_tokens(model, ids, g, rngs);
  };
  return generate(on_cpu, tokenizer, prompts, options, rng);
}

std::vector<std::string> generate(const TokenGenerator& generator, const Tokenizer& tokenizer,
                                  std::span<const std::string> prompts,
                                  const SampleOptions& options, Rng& rng) {
  std::vector<std::vector<std::int32_t>> ids;
  ids.reserve(prompts.size());
  for (const auto& p : prompts) {
    ids.push_back(tokenizer.encode(p));
    check(!ids.back().empty(), "sample: the prompt must not be empty");
  }
  GenerateOptions g;
  g.max_new_tokens = options.max_new_tokens;
  g.sampling = {options.temperature, options.top_k, options.top_p};
  g.max_batch = options.batch;
  if (!options.stop.empty()) {
    g.stop = [&](std::size_t, std::span<const std::int32_t> new_tokens) {
      return tokenizer.decode(new_tokens).find(options.stop) != std::string::npos;
    };
  }
  const auto results = generator(ids, g, std::span<Rng>(&rng, 1));
  std::vector<std::string> texts;
  texts.reserve(results.size());
  for (const auto& r : results) texts.push_back(tokenizer.decode(r.tokens));
  return texts;
}

std::string generate(Llama<float>& model, const Tokenizer& tokenizer, const std::string& prompt,
                     const SampleOptions& options, Rng& rng) {
  return generate(model, tokenizer, std::span<const std::string>(&prompt, 1), options, rng)[0];
}

}  // namespace pion
