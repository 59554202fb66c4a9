// `pion sample`: generate text from a checkpoint (temperature, top-k, top-p), one sample or
// several decoded together.
#include <iostream>
#include <vector>

#include "cli/commands.h"
#include "cli/run_on_device.h"
#include "cli/validators.h"
#include "pion/train/session.h"

namespace pion::cli {

namespace {
struct SampleArgs {
  std::string checkpoint;
  std::string prompt = "\n";
  std::uint64_t seed = 1;
  int samples = 1;
  std::string device = "cpu";
  std::string matmul_precision;  // "" = the checkpoint's
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
  cmd->add_option("--top_p", args->options.top_p,
                  "then among the most likely tokens holding this probability mass (1 = all)")
      ->check(FiniteRange(0, 1, /*lo_open=*/true));
  cmd->add_option("--samples", args->samples,
                  "continuations of the prompt, decoded together (printed one after another, "
                  "separated by a line ---)")
      ->check(FiniteRange(1, 4096));
  cmd->add_option("--stop", args->options.stop, "stop once the output contains this text");
  cmd->add_option("--seed", args->seed, "random seed");
  cmd->add_option("--device", args->device,
                  "cpu | cuda: where the model decodes (sampling itself stays on the CPU, so a "
                  "seed gives the same draws on both)")
      ->capture_default_str();
  cmd->add_option("--matmul_precision", args->matmul_precision,
                  "cuda: the model's GEMMs, bf16 | tf32 | fp32 (default: the checkpoint's)")
      ->check(CLI::IsMember({"bf16", "tf32", "fp32"}));  // refused on the CPU too, not ignored
  cmd->callback([args] {
    require_device(args->device);  // before loading anything
    LoadedCheckpoint ck = load_checkpoint(args->checkpoint);
    Rng rng(args->seed);
    const std::vector<std::string> prompts(static_cast<std::size_t>(args->samples), args->prompt);
    const std::string precision =
        args->matmul_precision.empty() ? ck.config.matmul_precision : args->matmul_precision;
    const TokenGenerator generator = generator_on_device(args->device, precision, *ck.model);
    const auto texts = generate(generator, *ck.tokenizer, prompts, args->options, rng);
    for (std::size_t i = 0; i < texts.size(); ++i)
      std::cout << (i > 0 ? "---\n" : "") << args->prompt << texts[i] << "\n";
  });
}

}  // namespace pion::cli
