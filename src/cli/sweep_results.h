#pragma once
// `pion sweep`'s results: the state of each run read back from its directory, and the tables
// over them: per setting (all grid keys but `seed`) the mean and sample std over seeds of
// best_val_loss and final_val_loss, and per optimizer the setting with the lowest mean best
// val loss. Written as <out>/results.md, results.csv and results.json; the PNG of val loss
// against lr comes from scripts/sweep_plot.py reading results.json.
#include <string>
#include <utility>
#include <vector>

namespace pion::cli {

struct RunRecord {
  std::string name;
  std::vector<std::pair<std::string, std::string>> values;  // the run's grid values
  std::string setting;
  std::string optimizer;
  // "finished" (summary.json at max_iters, not interrupted), "failed" (the last attempt
  // exited non-zero), "unfinished" (not run yet, or interrupted: a rerun resumes it).
  std::string status = "unfinished";
  bool has_checkpoint = false;
  double best_val_loss = 0;  // NaN when missing or non-finite
  double final_val_loss = 0;
  int iters = 0;
  int exit_code = 0;  // of the last attempt, from <run>/sweep_status.json
};

// Reads <run_dir>/summary.json and sweep_status.json; `max_iters` is the run's config's.
RunRecord read_run_record(const std::string& run_dir, int max_iters);

// Records the exit status of a run's last attempt in <run_dir>/sweep_status.json.
void write_run_status(const std::string& run_dir, int exit_code, double seconds);

// Writes results.md, results.csv, results.json under `out_dir`; `keys` are the grid keys in
// order, `command` the command line that made the sweep. Returns the Markdown text.
std::string write_results(const std::string& out_dir, const std::vector<std::string>& keys,
                          const std::vector<RunRecord>& runs, const std::string& command);

// Runs scripts/sweep_plot.py on results.json with /usr/bin/python3; returns a line saying
// where the PNG went, or why it was skipped (no python3, no matplotlib); never throws.
std::string write_plot(const std::string& out_dir);

}  // namespace pion::cli
