// `pion rl`: GRPO from a checkpoint on verifiable tasks ({"prompt", "answer"} JSONL, or
// generated arithmetic), in the one training loop through RlSource (pion/train/rl_source.h), on
// the CPU or the CUDA back end (--device); ends with the held-out exact match of greedy answers
// (on the CPU model, which holds the current weights whenever it is asked).
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/exact_match_eval.h"
#include "cli/from_checkpoint.h"
#include "cli/run_on_device.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/data/arithmetic.h"
#include "pion/dist/communicator.h"
#include "pion/model/memory.h"
#include "pion/train/rl_source.h"
#include "pion/train/session.h"

namespace pion::cli {

namespace {

struct RlArgs {
  std::string from;
  std::string tasks;
  std::string task;  // "arithmetic": generate the tasks
  std::int64_t task_n = 5000;
  ArithmeticOptions arithmetic;
  bool resume = false;
  int stop_after = 0;
  int eval_examples = 200;
};

std::vector<FinetuneExample> load_tasks(const RlArgs& args, const TrainConfig& config) {
  check(args.tasks.empty() != args.task.empty(),
        "rl: give exactly one of --tasks FILE.jsonl and --task arithmetic");
  if (!args.tasks.empty()) return load_finetune_jsonl(args.tasks, "answer");
  return arithmetic_examples(args.task_n, config.seed ^ 0x7a5cULL, args.arithmetic);
}

void run_rl(const ConfigFlags& flags, const RlArgs& args) {
  LoadedCheckpoint base = load_checkpoint(args.from);
  TrainConfig config = config_from_checkpoint(base, flags, "rl", [](TrainConfig& c) {
    c.out_dir = "runs/rl";
    c.max_iters = 200;
    c.warmup_iters = 0;
    c.schedule = "constant";
    c.eval_interval = 50;
    c.checkpoint_interval = 0;
    c.dropout = 0.0;
    c.grad_accum = 1;
  });
  const int rows = config.rl_prompts_per_step * config.rl_group_size;
  const int world = dist::world().size();
  check(config.rl_prompts_per_step % world == 0,
        "rl: rl_prompts_per_step " + std::to_string(config.rl_prompts_per_step) +
            " must be divisible by the " + std::to_string(world) +
            " ranks (each samples whole groups of an equal share of the prompts)");
  check(rows % (config.grad_accum * world) == 0,
        "rl: rl_prompts_per_step x rl_group_size = " + std::to_string(rows) +
            " completions must split evenly into grad_accum " +
            std::to_string(config.grad_accum) + " micro-batches on each of " +
            std::to_string(world) + " rank(s)");
  check(rows % config.grad_accum == 0,
        "rl: rl_prompts_per_step x rl_group_size = " + std::to_string(rows) +
            " completions must split evenly into grad_accum " +
            std::to_string(config.grad_accum) + " micro-batches");
  config.batch_size = rows / config.grad_accum;  // rows per micro-batch, derived
  config.data = args.tasks.empty() ? "arithmetic" : args.tasks;
  config.validate();
  require_training_device(config);  // before anything is prepared or written
  // Activations for a training batch live where the back end runs: checked here for the CPU
  // (the CUDA back end's forward, backward and reference forward are on the device; the host
  // keeps weights and the sampler's KV cache, bounded by its max_cache_bytes).
  if (config.device == "cpu")
    check_batch_memory(base.model->config(), config.batch_size, config.seq_len, true, "pion rl");

  std::vector<FinetuneExample> tasks = load_tasks(args, config);
  check(tasks.size() >= 2, "rl: need at least 2 tasks (some are held out for evaluation)");
  check_rl_prompts(tasks, *base.tokenizer, config);
  const auto n_val = std::max<std::size_t>(
      1, static_cast<std::size_t>(static_cast<double>(tasks.size()) * config.val_fraction));
  std::vector<FinetuneExample> train(tasks.begin(), tasks.end() - static_cast<long>(n_val));
  std::vector<FinetuneExample> val(tasks.end() - static_cast<long>(n_val), tasks.end());
  std::cout << "rl: " << train.size() << " train / " << val.size() << " held-out tasks; "
            << config.rl_prompts_per_step << " prompts x " << config.rl_group_size
            << " completions per step\n";

  std::filesystem::create_directories(config.out_dir);
  const std::string tokenizer_copy = config.out_dir + "/tokenizer.json";
  if (dist::world().is_root()) base.tokenizer->save(tokenizer_copy);  // one writer under mpirun
  // The model being trained: on --device cuda the back end's host mirror, which it refreshes
  // from the device before each sampling phase and each held-out evaluation (backend.h's
  // policy_sampler and sync_host_weights) and leaves holding the final weights.
  Llama<float>& model = *base.model;
  // The reference policy: a frozen copy of the starting weights, scored on the training device
  // (TrainBackend::frozen_scorer: a device copy under --device cuda).
  auto reference = std::make_unique<Llama<float>>(model.config());
  {
    TensorFile weights;
    model.save_weights(weights);
    reference->load_weights(weights);
  }
  // The source checks every prompt fits the context before anything trains.
  auto source = std::make_unique<RlSource>(model, std::move(reference), *base.tokenizer, train,
                                           config);

  TrainInputs in;
  in.config = config;
  in.resume = args.resume;
  in.stop_after = args.stop_after;
  in.extra_metadata = {{"mode", "rl"}, {"tokenizer", tokenizer_copy}, {"from", args.from},
                       {"tasks", config.data}};
  in.train_source = std::move(source);
  FinetuneDataset val_set(val, *base.tokenizer);
  const std::size_t k =
      std::min<std::size_t>(val.size(), static_cast<std::size_t>(args.eval_examples));
  in.evaluate = make_finetune_evaluator(val_set, config, 1);
  std::ostringstream quiet;
  in.extra_eval = [&](nlohmann::json& record) {
    const double acc = exact_match_accuracy(model, *base.tokenizer, std::span(val).first(k), quiet);
    model.set_training(true);
    record["exact_match"] = acc;
    std::cout << "step " << record.value("step", 0) << " | held-out exact match "
              << acc * 100.0 << "% on " << k << "\n";
  };
  // The starting point, so a run shows what RL changed (a resumed run measures its checkpoint
  // later, after loading; here the weights are the --from ones).
  double before = -1.0;
  if (!args.resume) {
    before = exact_match_accuracy(model, *base.tokenizer, std::span(val).first(k), quiet);
    model.set_training(true);
    std::cout << "before rl: held-out exact match " << before * 100.0 << "% on " << k << "\n";
  }
  TrainSummary s = run_training_on_device(std::move(in), model);

  const double acc = exact_match_accuracy(model, *base.tokenizer, std::span(val).first(k), std::cout);
  nlohmann::json summary = s.to_json();
  summary["exact_match"] = acc;
  summary["exact_match_examples"] = k;
  if (before >= 0) summary["exact_match_before"] = before;
  if (dist::world().is_root()) {
    std::ofstream out(config.out_dir + "/summary.json");
    out << summary.dump(2) << "\n";
  }
  std::cout << "done: held-out exact match " << acc * 100.0 << "% on " << k << " tasks -> "
            << config.out_dir << "/summary.json\n";
}

}  // namespace

void add_rl_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("rl", "GRPO on verifiable tasks from a checkpoint");
  auto args = std::make_shared<RlArgs>();
  cmd->add_option("--from", args->from, "checkpoint to start from (pion train / finetune)")
      ->required();
  cmd->add_option("--tasks", args->tasks,
                  "JSONL of {\"prompt\", \"answer\"} (pion make-task --answer_key answer)");
  cmd->add_option("--task", args->task, "generate the tasks instead: arithmetic")
      ->check(CLI::IsMember({"arithmetic"}));
  cmd->add_option("--task_n", args->task_n, "--task: number of tasks")
      ->check(FiniteRange(2, 10000000))
      ->capture_default_str();
  cmd->add_option("--min_digits", args->arithmetic.min_digits, "--task arithmetic: fewest digits")
      ->check(FiniteRange(1, 1000))
      ->capture_default_str();
  cmd->add_option("--max_digits", args->arithmetic.max_digits, "--task arithmetic: most digits")
      ->check(FiniteRange(1, 1000))
      ->capture_default_str();
  cmd->add_option("--ops", args->arithmetic.ops, "--task arithmetic: operators, e.g. +-*")
      ->capture_default_str();
  cmd->add_option("--eval_examples", args->eval_examples, "held-out tasks for the exact match")
      ->check(FiniteRange(1, 10000000))
      ->capture_default_str();
  cmd->add_flag("--resume", args->resume,
                "continue bit-exactly from <out_dir>/checkpoint.safetensors (sampling RNG and "
                "a batch between PPO epochs included)");
  cmd->add_option("--stop_after", args->stop_after,
                  "stop with a checkpoint after this many steps (continue with --resume)")
      ->check(FiniteRange(0, 1 << 30));
  auto flags = add_config_flags(*cmd);
  cmd->callback([flags, args] { run_rl(*flags, *args); });
}

}  // namespace pion::cli
