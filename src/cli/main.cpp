// `pion`: one binary, one subcommand per file under src/cli/.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <iostream>

#include "cli/commands.h"
#include "pion/core/device.h"
#include "pion/core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"pion: train language models with the spectrum-preserving Pion optimizer, AdamW or Muon"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("pion 0.1.0; back ends: ") + pion::backend_summary());
  // Command-line mistakes read like every other error: one "pion: error:" line. Set before the
  // subcommands are added, which copy it.
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    return "pion: error: " + what + " (run with --help for usage)\n";
  });
  pion::cli::add_train_command(app);
  pion::cli::add_finetune_command(app);
  pion::cli::add_eval_command(app);
  pion::cli::add_sample_command(app);
  pion::cli::add_prepare_command(app);
  pion::cli::add_make_task_command(app);
  pion::cli::add_optim_trace_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  } catch (const pion::Error& e) {
    std::cerr << "pion: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "pion: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
