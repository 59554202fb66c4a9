// `pion export-hf CKPT --out DIR`: a pion checkpoint to a Hugging Face LlamaForCausalLM
// directory (pion/train/hf_checkpoint.h).
#include <iostream>

#include "cli/commands.h"
#include "pion/core/error.h"
#include "pion/train/hf_checkpoint.h"

namespace pion::cli {

void add_export_hf_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "export-hf",
      "a pion checkpoint to a Hugging Face LlamaForCausalLM directory (config.json, "
      "model.safetensors or shards + index, tokenizer.model when the tokenizer is SentencePiece)");
  auto options = std::make_shared<HfExportOptions>();
  auto shard = std::make_shared<std::string>();
  cmd->add_option("checkpoint", options->checkpoint, "the pion checkpoint")->required();
  cmd->add_option("--out", options->out, "the directory to create (must not exist, or be empty)")
      ->required();
  cmd->add_option("--dtype", options->dtype, "weights dtype: fp32 | bf16 | fp16")
      ->check(CLI::IsMember({"fp32", "bf16", "fp16"}))
      ->capture_default_str();
  cmd->add_option("--max_shard_size", *shard,
                  "split the weights into shards of at most this size (e.g. 2GB, 500MB, 4GiB) "
                  "with model.safetensors.index.json; default: one model.safetensors");
  cmd->callback([options, shard] {
    if (!shard->empty()) options->max_shard_bytes = parse_byte_size(*shard, "--max_shard_size");
    const HfExportReport r = export_hf(*options);
    std::cout << "exported " << options->checkpoint << " (" << r.model.num_params()
              << " parameters, " << options->dtype << ") -> " << options->out << ":";
    for (const auto& f : r.files) std::cout << " " << f;
    std::cout << "\n";
  });
}

}  // namespace pion::cli
