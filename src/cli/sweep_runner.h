#pragma once
// `pion sweep`'s scheduler: runs child processes of this same binary, N at a time, each in
// its own process group with OMP_NUM_THREADS / OPENBLAS_NUM_THREADS set and its stdout and
// stderr appended to a log file; prints a line per start and finish with the sweep's ETA.
// SIGINT/SIGTERM to the sweep are forwarded once to every running child (pion train then
// finishes its step, saves a checkpoint and exits); no new child starts after that.
#include <functional>
#include <string>
#include <vector>

namespace pion::cli {

struct ChildJob {
  std::string label;              // printed in the progress lines
  std::vector<std::string> args;  // after the program name, e.g. {"train", "--config", ...}
  std::string log_path;           // stdout + stderr, appended
};

struct ChildResult {
  bool started = false;
  int exit_code = -1;  // 128 + signal when a signal ended it
  double seconds = 0;
};

struct SchedulerReport {
  std::vector<ChildResult> results;  // one per job, in order
  int stop_signal = 0;               // SIGINT or SIGTERM when the sweep was asked to stop
};

// Runs `jobs` with at most `parallel` at once and `threads` OpenMP/BLAS threads each.
// `on_finish(i, result)` returns the text shown after the job's label in its finish line
// (e.g. its best val loss); `total` / `already_done` make the [k/total] counter count the
// runs the sweep skipped as well.
SchedulerReport run_children(const std::vector<ChildJob>& jobs, int parallel, int threads,
                             int total, int already_done,
                             const std::function<std::string(std::size_t, const ChildResult&)>&
                                 on_finish);

// CPUs this process may run on (sched_getaffinity; at least 1).
int available_cpus();

}  // namespace pion::cli
