// `pion`: one binary, one subcommand per file under src/cli/.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <new>
#include <streambuf>
#include <string>

#include "cli/commands.h"
#include "pion/core/device.h"
#include "pion/core/error.h"
#include "pion/dist/communicator.h"

namespace {

// Under mpirun only rank 0 prints progress: the other ranks' std::cout goes nowhere. Errors
// (std::cerr) stay visible on every rank, prefixed with the rank.
class NullBuffer : public std::streambuf {
 protected:
  int overflow(int c) override { return c; }
};

int fail(const std::string& what) {
  pion::dist::Communicator& comm = pion::dist::world();
  if (comm.distributed()) {
    std::cerr << "pion: error: rank " << comm.rank() << ": " << what << "\n" << std::flush;
    // The other ranks may be waiting in a collective for this one: end the whole job now.
    comm.abort(2);
  }
  std::cerr << "pion: error: " << what << "\n";
  return 2;
}

}  // namespace

// libgomp's idle workers spin for a long while after each parallel region (its default when
// OMP_WAIT_POLICY is unset); on the cores OpenBLAS's own threads need, that made training steps
// 1.5-3x slower on 2 cores (Muon 9.6K -> 3.1K tok/s on the baby config). libgomp reads the
// policy once, before main(), so the only way to set it for ourselves is to re-execute with it.
// A user who sets OMP_WAIT_POLICY keeps their choice.
void ensure_passive_openmp_wait(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  if (setenv("OMP_WAIT_POLICY", "PASSIVE", 0) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: carry on with the default policy
}

int main(int argc, char** argv) {
  ensure_passive_openmp_wait(argv);
  pion::dist::Session mpi(argc, argv);  // MPI only when launched by mpirun
  NullBuffer null_buffer;
  std::streambuf* cout_buffer = std::cout.rdbuf();
  if (!pion::dist::world().is_root()) std::cout.rdbuf(&null_buffer);
  struct RestoreCout {
    std::streambuf* buffer;
    ~RestoreCout() { std::cout.rdbuf(buffer); }
  } restore_cout{cout_buffer};
  CLI::App app{
      "pion: train language models with the spectrum-preserving Pion optimizer, AdamW or Muon"};
  app.require_subcommand(1);
  app.set_version_flag("--version",
                       std::string("pion 0.1.0; back ends: ") + pion::backend_summary());
  // Command-line mistakes read like every other error: one "pion: error:" line. Set before the
  // subcommands are added, which copy it.
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    return "pion: error: " + what + " (run with --help for usage)\n";
  });
  pion::cli::add_train_command(app);
  pion::cli::add_finetune_command(app);
  pion::cli::add_rl_command(app);
  pion::cli::add_eval_command(app);
  pion::cli::add_sample_command(app);
  pion::cli::add_prepare_command(app);
  pion::cli::add_make_task_command(app);
  pion::cli::add_optim_trace_command(app);
  pion::cli::add_bench_command(app);
  pion::cli::add_sweep_command(app);
  pion::cli::add_import_hf_command(app);
  pion::cli::add_export_hf_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::RuntimeError& e) {
    // A command that finished but reports an outcome through its exit status (pion sweep: a
    // run failed, or it was stopped by a signal); its message is already printed.
    return e.get_exit_code();
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  } catch (const pion::Error& e) {
    return fail(e.what());
  } catch (const std::bad_alloc&) {
    // Inputs are checked against the memory they imply before allocating (memory.h); this is
    // what is left: the machine itself ran out.
    return fail("out of memory: this run needs more memory than the process may use; lower "
                "batch_size, seq_len or the model size, or raise `ulimit -v`");
  } catch (const std::exception& e) {
    return fail(e.what());
  }
  return 0;
}
