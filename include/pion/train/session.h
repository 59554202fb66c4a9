#pragma once
// What the `pion` subcommands share: resolving a config's data into a prepared dataset,
// adapting the data loaders to the trainer's BatchSource, validation evaluators, loading a
// model back from a checkpoint, and sampling text from a model.
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "pion/core/random.h"
#include "pion/data/finetune.h"
#include "pion/data/loader.h"
#include "pion/data/prepare.h"
#include "pion/data/tokenizer.h"
#include "pion/model/generate.h"
#include "pion/model/llama.h"
#include "pion/train/trainer.h"

namespace pion {

// config.data is "fortunes" (the built-in corpus), a prepared dataset directory, or a text
// file. The last two kinds of text are tokenized into <out_dir>/data once; a later run (or
// --resume) with the same out_dir reuses it.
DatasetSummary resolve_dataset(const TrainConfig& config);

ModelConfig model_config_for(const TrainConfig& config, int vocab_size);

// Pretraining batches: random windows of a token shard.
std::unique_ptr<BatchSource> make_shard_source(const std::string& shard_path, const TrainConfig& config);
// Finetuning batches: prompt/response examples with the loss on responses only.
std::unique_ptr<BatchSource> make_finetune_source(FinetuneDataset dataset, const TrainConfig& config);

// Mean loss over the first `batches` fixed evaluation batches of a shard / finetune set.
Evaluator make_shard_evaluator(const std::string& shard_path, const TrainConfig& config, int batches);
Evaluator make_finetune_evaluator(FinetuneDataset dataset, const TrainConfig& config, int batches);

// A model and what it was trained with, read back from a training checkpoint.
struct LoadedCheckpoint {
  TrainConfig config;
  nlohmann::json extra;  // includes "tokenizer": path of the tokenizer file
  std::unique_ptr<Llama<float>> model;
  std::unique_ptr<Tokenizer> tokenizer;
};
LoadedCheckpoint load_checkpoint(const std::string& path);
// The tokenizer of the checkpoint at `path` with this metadata and pion.extra: the one embedded
// under pion.tokenizer (checkpoint.h), else the file pion.extra's "tokenizer" names, else
// tokenizer.json beside the checkpoint (a moved run directory).
std::unique_ptr<Tokenizer> load_checkpoint_tokenizer(
    const std::map<std::string, std::string>& metadata, const nlohmann::json& extra,
    const std::string& path);

struct SampleOptions {
  int max_new_tokens = 200;
  double temperature = 1.0;  // 0 = greedy
  int top_k = 0;             // 0 = no top-k filter
  double top_p = 1.0;        // nucleus: the most likely tokens holding this much mass (1 = all)
  std::string stop;          // stop once the generated text contains this ("" = never)
  int batch = 0;             // sequences decoded together (0 = up to 64; see generate.h)
};
// Continues `prompt` and returns the new text (pion/model/generate.h: KV-cached; a context
// longer than seq_len slides, keeping the last seq_len tokens).
std::string generate(Llama<float>& model, const Tokenizer& tokenizer, const std::string& prompt,
                     const SampleOptions& options, Rng& rng);
// Continues every prompt, decoded together as one batch; texts in prompt order. With
// sampling, the prompts share `rng` (draws interleave step by step); with one prompt this is
// the single-prompt generate() exactly.
std::vector<std::string> generate(Llama<float>& model, const Tokenizer& tokenizer,
                                  std::span<const std::string> prompts,
                                  const SampleOptions& options, Rng& rng);
// The same with any generator (cli/run_on_device.h's generator_on_device: the CPU model or
// its GPU copy).
std::vector<std::string> generate(const TokenGenerator& generator, const Tokenizer& tokenizer,
                                  std::span<const std::string> prompts,
                                  const SampleOptions& options, Rng& rng);

}  // namespace pion
