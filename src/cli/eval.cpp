// `pion eval`: validation loss and perplexity of a checkpoint, and the exact-match accuracy of
// its greedy answers on a prompt/response set.
#include <cmath>
#include <iostream>

#include "cli/commands.h"
#include "cli/exact_match_eval.h"
#include "cli/run_on_device.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/data/prepare.h"
#include "pion/model/memory.h"
#include "pion/train/session.h"

namespace pion::cli {

namespace {

struct EvalArgs {
  std::string checkpoint;
  std::string data;   // prepared dataset dir; default: the one the checkpoint trained on
  std::string tasks;  // JSONL of prompt/response pairs
  int batches = 50;
  int max_examples = 200;
  std::string device = "cpu";  // the validation loss's and the greedy answers' device
};

void run_eval(const EvalArgs& args) {
  require_device(args.device);  // before loading anything
  LoadedCheckpoint ck = load_checkpoint(args.checkpoint);
  nlohmann::json result = {{"checkpoint", args.checkpoint}};
  std::string dataset = args.data;
  if (dataset.empty() && args.tasks.empty() && ck.extra.contains("dataset"))
    dataset = input::to_string(ck.extra["dataset"], 4096,
                               "checkpoint '" + args.checkpoint + "' metadata key 'dataset'");
  if (!dataset.empty()) {
    DatasetSummary data = load_dataset_summary(dataset);
    check(data.vocab_size == ck.model->config().vocab_size,
          "eval: dataset '" + dataset + "' has vocabulary " + std::to_string(data.vocab_size) +
              ", the checkpoint " + std::to_string(ck.model->config().vocab_size));
    // batch_size x seq_len come from the checkpoint's metadata: checked before the evaluation
    // batches or the activations are allocated.
    if (args.device == "cpu")
      check_batch_memory(ck.model->config(), ck.config.batch_size, ck.config.seq_len, false,
                         "pion eval (checkpoint '" + args.checkpoint + "')");
    Evaluator evaluate = make_shard_evaluator(data.val_path, ck.config, args.batches);
    ck.model->set_training(false);
    TrainConfig on_device = ck.config;
    on_device.device = args.device;
    const double loss = evaluate(batch_loss_on_device(on_device, *ck.model));
    result["device"] = args.device;
    result["val_loss"] = loss;
    result["perplexity"] = std::exp(loss);
    std::cout << "val loss " << loss << " | perplexity " << std::exp(loss) << " (" << args.batches
              << " batches of " << ck.config.batch_size << " x " << ck.config.seq_len << ")\n";
  }
  if (!args.tasks.empty()) {
    auto examples = load_finetune_jsonl(args.tasks);
    const std::size_t k = std::min<std::size_t>(examples.size(), static_cast<std::size_t>(args.max_examples));
    ck.model->set_training(false);
    const TokenGenerator generator =
        generator_on_device(args.device, ck.config.matmul_precision, *ck.model);
    const double acc =
        exact_match_accuracy(generator, *ck.tokenizer, std::span(examples).first(k), std::cout);
    result["exact_match"] = acc;
    result["examples"] = k;
    std::cout << "exact match " << acc * 100.0 << "% on " << k << " examples\n";
  }
  check(result.size() > 1, "eval: nothing to evaluate: give --data DATASET_DIR or --tasks FILE.jsonl");
  std::cout << result.dump() << "\n";
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "validation loss / perplexity and exact-match accuracy of a checkpoint");
  auto args = std::make_shared<EvalArgs>();
  cmd->add_option("--checkpoint", args->checkpoint, "checkpoint.safetensors from pion train/finetune")->required();
  cmd->add_option("--data", args->data, "prepared dataset dir (default: the checkpoint's own)");
  cmd->add_option("--tasks", args->tasks, "JSONL of {\"prompt\", \"response\"} for exact-match accuracy");
  cmd->add_option("--batches", args->batches, "validation batches")
      ->check(FiniteRange(1, 1000000))
      ->capture_default_str();
  cmd->add_option("--max_examples", args->max_examples, "prompt/response examples to answer")
      ->check(FiniteRange(1, 10000000))
      ->capture_default_str();
  cmd->add_option("--device", args->device,
                  "cpu | cuda: where the validation loss and the exact-match answers are "
                  "computed (the checkpoint's matmul_precision and attention apply on cuda)")
      ->capture_default_str();
  cmd->callback([args] { run_eval(*args); });
}

}  // namespace pion::cli
