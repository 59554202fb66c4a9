// `pion optim-trace`: placeholder registration; the command is implemented in this file.
#include "cli/commands.h"
#include "pion/core/error.h"

namespace pion::cli {

void add_optim_trace_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("optim-trace", "apply T optimizer steps from a safetensors trace");
  cmd->callback([] { throw Error("optim-trace: not implemented yet"); });
}

}  // namespace pion::cli
