// `pion make-task`: write a verifiable finetuning task as JSONL (multi-digit addition).
#include <iostream>

#include "cli/commands.h"
#include "cli/validators.h"
#include "pion/data/arithmetic.h"
#include "pion/data/finetune.h"

namespace pion::cli {

namespace {
struct TaskArgs {
  std::string task = "arithmetic";
  std::string out;
  std::int64_t n = 5000;
  std::uint64_t seed = 1;
  int min_digits = 1;
  int max_digits = 3;
  std::string ops = "+";
  std::string answer_key = "response";
};
}  // namespace

void add_make_task_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("make-task", "generate a verifiable prompt/response task (JSONL)");
  auto args = std::make_shared<TaskArgs>();
  cmd->add_option("task", args->task, "task kind")->check(CLI::IsMember({"arithmetic"}));
  cmd->add_option("--out", args->out, "output JSONL file")->required();
  cmd->add_option("--n", args->n, "number of examples")
      ->check(FiniteRange(1, 10000000))
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "random seed");
  cmd->add_option("--min_digits", args->min_digits, "fewest digits per operand")
      ->check(FiniteRange(1, 1000))
      ->capture_default_str();
  cmd->add_option("--max_digits", args->max_digits, "most digits per operand")
      ->check(FiniteRange(1, 1000))
      ->capture_default_str();
  cmd->add_option("--ops", args->ops, "operators to draw from, e.g. + or +-* (harder tasks)")
      ->capture_default_str();
  cmd->add_option("--answer_key", args->answer_key,
                  "the answer's key: response (pion finetune) or answer (pion rl)")
      ->check(CLI::IsMember({"response", "answer"}))
      ->capture_default_str();
  cmd->callback([args] {
    const auto examples = arithmetic_examples(
        args->n, args->seed, ArithmeticOptions{args->min_digits, args->max_digits, args->ops});
    write_finetune_jsonl(args->out, examples, args->answer_key);
    std::cout << "wrote " << args->n << (args->ops == "+" ? " addition" : " arithmetic")
              << " examples to " << args->out << "\n";
  });
}

}  // namespace pion::cli
