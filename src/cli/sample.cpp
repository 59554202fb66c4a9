// `pion sample`: generate text from a checkpoint (temperature, top-k).
#include <iostream>

#include "cli/commands.h"
#include "cli/validators.h"
#include "pion/train/session.h"

namespace pion::cli {

namespace {
struct SampleArgs {
  std::string checkpoint;
  std::string prompt = "\n";
  std::uint64_t seed = 1;
  SampleOptions options;
};
}  // namespace

void add_sample_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("sample", "generate text from a checkpoint");
  auto args = std::make_shared<SampleArgs>();
  cmd->add_option("--checkpoint", args->checkpoint, "checkpoint.safetensors from pion train/finetune")->required();
  cmd->add_option("--prompt", args->prompt, "text to continue");
  cmd->add_option("--tokens", args->options.max_new_tokens, "tokens to generate")
      ->check(FiniteRange(1, 100000));
  cmd->add_option("--temperature", args->options.temperature, "softmax temperature (0 = greedy)")
      ->check(FiniteRange(0, 100));
  cmd->add_option("--top_k", args->options.top_k, "sample among the k most likely tokens (0 = all)")
      ->check(FiniteRange(0, 65536));
  cmd->add_option("--stop", args->options.stop, "stop once the output contains this text");
  cmd->add_option("--seed", args->seed, "random seed");
  cmd->callback([args] {
    LoadedCheckpoint ck = load_checkpoint(args->checkpoint);
    Rng rng(args->seed);
    std::cout << args->prompt << generate(*ck.model, *ck.tokenizer, args->prompt, args->options, rng) << "\n";
  });
}

}  // namespace pion::cli
