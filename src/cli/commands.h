#pragma once
// Each subcommand of `pion` lives in its own file and registers itself on the app here.
// A command's callback throws pion::Error for bad input; main() prints it on one line and
// exits with code 2.
#include <CLI/CLI.hpp>

namespace pion::cli {

void add_optim_trace_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_finetune_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_sample_command(CLI::App& app);
void add_prepare_command(CLI::App& app);
void add_make_task_command(CLI::App& app);
// `pion sweep`: src/cli/sweep.cpp (+ sweep_grid, sweep_runner, sweep_results).
void add_sweep_command(CLI::App& app);
void add_rl_command(CLI::App& app);
// `pion import-hf`, `pion export-hf`: src/cli/import_hf.cpp, export_hf.cpp.
void add_import_hf_command(CLI::App& app);
void add_export_hf_command(CLI::App& app);
// `pion bench optim` (and later `pion bench train`): src/cli/bench.cpp.
void add_bench_command(CLI::App& app);

}  // namespace pion::cli
