#pragma once
// `pion import-hf` and `pion export-hf`: a Hugging Face LlamaForCausalLM directory to a pion
// checkpoint and back (names and config: pion/model/hf.h).
//
// Import reads DIR/config.json, DIR/tokenizer.model (SentencePiece; it becomes the run's
// tokenizer, embedded in the checkpoint) and the weights of DIR/model.safetensors or of the
// shards DIR/model.safetensors.index.json lists. Each file is mapped (MappedSafetensors) and
// validated before anything is allocated; then every tensor is converted (BF16, F16, F32 ->
// F32) straight into the one parameter buffer, so the model is in memory once. The result is
// an ordinary pion training checkpoint at step 0 without optimizer state: `pion finetune
// --from`, `pion rl --from`, `pion eval` and `pion sample` take it as they take their own.
//
// Export maps a pion checkpoint and writes config.json, model.safetensors (or shards of at most
// max_shard_bytes + model.safetensors.index.json) in fp32, bf16 or fp16, and tokenizer.model
// when the run's tokenizer is SentencePiece, converting tensor by tensor.
//
// Both validate everything they can before writing, and write atomically (the checkpoint
// through a temp file + rename, the export directory as a temp directory renamed into place),
// so a refused or failed command leaves nothing behind. Errors are pion::Error, one line.
#include <cstdint>
#include <string>
#include <vector>

#include "pion/model/config.h"

namespace pion {

struct HfImportOptions {
  std::string dir;  // the Hugging Face model directory
  std::string out;  // the checkpoint to write; must not exist
  int seq_len = 0;  // > 0: cap the context (max_position_embeddings) at this many tokens
};

struct HfImportReport {
  ModelConfig model;
  std::vector<std::string> files;  // the safetensors files read
  std::string dtypes;              // the weights' dtypes, e.g. "BF16"
  int max_position_embeddings = 0;
  std::int64_t weight_bytes = 0;  // of the fp32 checkpoint's weights
};

HfImportReport import_hf(const HfImportOptions& options);

struct HfExportOptions {
  std::string checkpoint;
  std::string out;                  // the directory to create; must not exist (or be empty)
  std::string dtype = "fp32";       // fp32 | bf16 | fp16
  std::uint64_t max_shard_bytes = 0;  // 0: one model.safetensors
};

struct HfExportReport {
  ModelConfig model;
  std::vector<std::string> files;  // written, relative to out
};

HfExportReport export_hf(const HfExportOptions& options);

// "5GB", "500MB", "2GiB", "123456" -> bytes (decimal units as Hugging Face's max_shard_size,
// binary ones with an i); errors name `what`.
std::uint64_t parse_byte_size(const std::string& text, const std::string& what);

}  // namespace pion
