// `pion import-hf DIR --out CKPT`: a Hugging Face LlamaForCausalLM directory to a pion
// checkpoint (pion/train/hf_checkpoint.h).
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/train/hf_checkpoint.h"

namespace pion::cli {

void add_import_hf_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "import-hf",
      "a Hugging Face LlamaForCausalLM directory (config.json, model.safetensors or shards with "
      "model.safetensors.index.json, SentencePiece tokenizer.model; BF16/F16/F32 weights) to a "
      "pion checkpoint that finetune --from, rl --from, eval and sample take");
  auto options = std::make_shared<HfImportOptions>();
  cmd->add_option("dir", options->dir, "the Hugging Face model directory")->required();
  cmd->add_option("--out", options->out,
                  "the checkpoint to write (fp32 weights, tokenizer inside); must not exist")
      ->required();
  cmd->add_option("--seq_len", options->seq_len,
                  "cap the context at this many tokens (default: max_position_embeddings); "
                  "finetune keeps the checkpoint's seq_len")
      ->check(FiniteRange(1, kMaxSeqLen));
  cmd->callback([options] {
    const HfImportReport r = import_hf(*options);
    const ModelConfig& m = r.model;
    std::printf(
        "imported %s (%s weights, %zu file%s): %d layers, d_model %d, %d heads (%d key/value), "
        "ffn %d, vocab %d, seq_len %d%s, rope_theta %g, %s embeddings; %lld parameters "
        "(%.2f GiB fp32) -> %s\n",
        options->dir.c_str(), r.dtypes.c_str(), r.files.size(), r.files.size() == 1 ? "" : "s",
        m.n_layer, m.d_model, m.n_head, m.kv_heads(), m.ffn_size(), m.vocab_size, m.seq_len,
        m.seq_len < r.max_position_embeddings
            ? (" (of " + std::to_string(r.max_position_embeddings) + ")").c_str()
            : "",
        m.rope_theta, m.tie_embeddings ? "tied" : "untied", static_cast<long long>(m.num_params()),
        static_cast<double>(r.weight_bytes) / (1024.0 * 1024.0 * 1024.0), options->out.c_str());
  });
}

}  // namespace pion::cli
