// `pion finetune`: supervised finetuning from a checkpoint on {prompt, response} pairs, with
// the loss on response tokens only; ends with the exact-match accuracy of greedy answers on
// the held-out examples.
#include <filesystem>
#include <fstream>
#include <iostream>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/exact_match_eval.h"
#include "cli/from_checkpoint.h"
#include "cli/run_on_device.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/dist/communicator.h"
#include "pion/model/memory.h"
#include "pion/train/session.h"

namespace pion::cli {

namespace {

struct FinetuneArgs {
  std::string from;
  std::string tasks;
  bool resume = false;
  int stop_after = 0;
  int eval_examples = 200;
};

void run_finetune(const ConfigFlags& flags, const FinetuneArgs& args) {
  check(!args.from.empty(), "finetune: give --from CHECKPOINT (a pion train checkpoint)");
  check(!args.tasks.empty(), "finetune: give --tasks TASKS.jsonl ({\"prompt\", \"response\"} per line)");
  LoadedCheckpoint base = load_checkpoint(args.from);
  // Model keys come from the checkpoint; the rest from the defaults below, then file/flags.
  TrainConfig config = config_from_checkpoint(base, flags, "finetune", [](TrainConfig& c) {
    c.out_dir = "runs/finetune";
    c.max_iters = 500;
    c.warmup_iters = 20;
    c.eval_interval = 100;
    c.checkpoint_interval = 0;
    c.dropout = 0.0;
  });
  config.data = args.tasks;
  config.validate();
  require_device(config);
  // batch_size x seq_len come from the checkpoint's metadata and the flags: checked before the
  // data loaders or the activations are allocated.
  if (config.device == "cpu")
    check_batch_memory(base.model->config(), config.batch_size, config.seq_len, true,
                       "pion finetune");

  std::vector<FinetuneExample> examples = load_finetune_jsonl(args.tasks);
  check(examples.size() >= 2, "finetune: need at least 2 examples in '" + args.tasks + "'");
  const auto n_val = std::max<std::size_t>(1, static_cast<std::size_t>(examples.size() * config.val_fraction));
  std::vector<FinetuneExample> train(examples.begin(), examples.end() - static_cast<long>(n_val));
  std::vector<FinetuneExample> val(examples.end() - static_cast<long>(n_val), examples.end());
  FinetuneDataset train_set(train, *base.tokenizer);
  FinetuneDataset val_set(val, *base.tokenizer);
  const auto cut = train_set.count_truncated(config.seq_len);
  std::cout << "finetune: " << train.size() << " train / " << val.size() << " held-out examples";
  if (cut > 0) std::cout << " (" << cut << " truncated to seq_len " << config.seq_len << ")";
  std::cout << "\n";

  std::filesystem::create_directories(config.out_dir);
  const std::string tokenizer_copy = config.out_dir + "/tokenizer.json";
  if (dist::world().is_root()) base.tokenizer->save(tokenizer_copy);  // one writer under mpirun
  Llama<float>& model = *base.model;
  model.dropout_rng() = Rng(config.seed ^ 0xd50f07ULL);

  TrainInputs in;
  in.config = config;
  in.resume = args.resume;
  in.stop_after = args.stop_after;
  in.extra_metadata = {{"mode", "finetune"}, {"tokenizer", tokenizer_copy}, {"from", args.from}, {"tasks", args.tasks}};
  in.train_source = make_finetune_source(train_set, config);
  const int eval_batches = static_cast<int>(std::min<std::int64_t>(config.eval_iters, (val.size() + config.batch_size - 1) / config.batch_size));
  in.evaluate = make_finetune_evaluator(val_set, config, std::max(1, eval_batches));
  TrainSummary s = run_training_on_device(std::move(in), model);

  const std::size_t k = std::min<std::size_t>(val.size(), static_cast<std::size_t>(args.eval_examples));
  // The held-out answers are decoded where the model trained (on cuda from a GPU copy of the
  // final weights, which the back end downloaded into `model`).
  const TokenGenerator generator =
      generator_on_device(config.device, config.matmul_precision, model);
  const double acc =
      exact_match_accuracy(generator, *base.tokenizer, std::span(val).first(k), std::cout);
  nlohmann::json summary = s.to_json();
  summary["exact_match"] = acc;
  summary["exact_match_examples"] = k;
  if (dist::world().is_root()) {
    std::ofstream out(config.out_dir + "/summary.json");
    out << summary.dump(2) << "\n";
  }
  std::cout << "done: held-out exact match " << acc * 100.0 << "% on " << k << " examples, best val loss "
            << s.best_val_loss << " -> " << config.out_dir << "/summary.json\n";
}

}  // namespace

void add_finetune_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("finetune", "finetune a checkpoint on prompt/response pairs (loss on responses)");
  auto args = std::make_shared<FinetuneArgs>();
  cmd->add_option("--from", args->from, "checkpoint to start from (from pion train)")->required();
  cmd->add_option("--tasks", args->tasks, "JSONL of {\"prompt\", \"response\"} (see pion make-task)")->required();
  cmd->add_option("--eval_examples", args->eval_examples,
                  "held-out examples for the exact-match accuracy")
      ->check(FiniteRange(1, 10000000))
      ->capture_default_str();
  cmd->add_flag("--resume", args->resume, "continue from <out_dir>/checkpoint.safetensors");
  cmd->add_option("--stop_after", args->stop_after,
                  "stop with a checkpoint after this many steps (continue with --resume)")
      ->check(FiniteRange(0, 1 << 30));
  auto flags = add_config_flags(*cmd);
  cmd->callback([flags, args] { run_finetune(*flags, *args); });
}

}  // namespace pion::cli
