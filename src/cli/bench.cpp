// `pion bench`: benchmarks built into the binary, one sub-subcommand each.
//
//   pion bench optim   one optimizer step over the hidden matrices of a GPT-2-small-shaped
//                      LLaMA (CPU or GPU), beside the machine's GEMM roofline measured in the
//                      same run; Pion's spectrum drift on the GPU (src/cli/bench_optim.h).
//   pion bench train   training tokens/s of each optimizer through the real trainer
//                      (src/cli/bench_train.h).
//   pion bench generate  KV-cached batched generation vs the uncached path, CPU
//                      (src/cli/bench_generate.h).
#include "cli/bench_generate.h"
#include "cli/bench_optim.h"
#include "cli/bench_train.h"
#include "cli/commands.h"

namespace pion::cli {

void add_bench_command(CLI::App& app) {
  auto* bench = app.add_subcommand(
      "bench", "benchmarks: `pion bench optim --help`, `pion bench train --help`, `pion bench generate --help`");
  bench->require_subcommand(1);
  add_bench_optim_command(*bench);
  add_bench_train_command(*bench);
  add_bench_generate_command(*bench);
}

}  // namespace pion::cli
