// `pion sweep`: a grid of `pion train` runs from one base config, N processes at a time,
// resumable, with tables of best/final val loss (mean ± std over seeds) and a plot against lr.
// Grid parsing: sweep_grid.cpp; scheduling child processes: sweep_runner.cpp; tables and
// plot: sweep_results.cpp.
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/sweep_grid.h"
#include "cli/sweep_results.h"
#include "cli/sweep_runner.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/train/checkpoint.h"

namespace pion::cli {

namespace fs = std::filesystem;

namespace {

struct SweepOptions {
  std::string out;
  std::vector<std::string> grid;
  int jobs = 1;
  int threads_per_run = 0;
  bool report_only = false;
  bool dry_run = false;
};

std::string shell_quote(const std::string& s) {
  const bool plain = !s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"
                                                       "OPQRSTUVWXYZ0123456789_-+=.,:/@%") ==
                                       std::string::npos;
  if (plain) return s;
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The command line, rebuilt from what was parsed (so it repeats the sweep exactly).
std::string command_text(const SweepOptions& o, const ConfigFlags& flags) {
  std::string c = "pion sweep --out " + shell_quote(o.out);
  if (!flags.config_file.empty()) c += " --config " + shell_quote(flags.config_file);
  for (const auto& [k, v] : flags.values) c += " --" + k + " " + shell_quote(v);
  for (const auto& g : o.grid) c += " --grid " + shell_quote(g);
  c += " --jobs " + std::to_string(o.jobs);
  if (o.threads_per_run > 0) c += " --threads-per-run " + std::to_string(o.threads_per_run);
  return c;
}

std::string loss_text(double v) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(4) << v;
  return s.str();
}

std::string label_of(const PlannedRun& run) {
  std::string l;
  for (const auto& [k, v] : run.values) l += (l.empty() ? "" : " ") + k + "=" + v;
  return l.empty() ? run.name : l;
}

// The saved plan: what --report-only and the next rerun read back.
nlohmann::json plan_json(const std::vector<PlannedRun>& runs, const std::vector<std::string>& keys,
                         const std::string& command) {
  nlohmann::json j = {{"command", command}, {"grid_keys", keys}, {"runs", nlohmann::json::array()}};
  for (const auto& r : runs) {
    nlohmann::json values = nlohmann::json::array();
    for (const auto& [k, v] : r.values) values.push_back({k, v});
    j["runs"].push_back({{"name", r.name},
                         {"values", values},
                         {"setting", r.setting},
                         {"optimizer", r.config.optimizer},
                         {"max_iters", r.config.max_iters}});
  }
  return j;
}

std::vector<RunRecord> read_records(const std::string& out, const nlohmann::json& plan) {
  std::vector<RunRecord> records;
  for (const auto& r : plan.at("runs")) {
    const std::string name = r.at("name").get<std::string>();
    RunRecord rec = read_run_record(out + "/runs/" + name, r.at("max_iters").get<int>());
    rec.name = name;
    for (const auto& kv : r.at("values"))
      rec.values.emplace_back(kv.at(0).get<std::string>(), kv.at(1).get<std::string>());
    rec.setting = r.at("setting").get<std::string>();
    rec.optimizer = r.at("optimizer").get<std::string>();
    records.push_back(rec);
  }
  return records;
}

// Tables + plot, and the Markdown printed.
void report(const std::string& out, const nlohmann::json& plan) {
  const auto records = read_records(out, plan);
  const std::string md = write_results(
      out, plan.at("grid_keys").get<std::vector<std::string>>(), records,
      plan.at("command").get<std::string>());
  std::cout << "\n" << md << "\nwrote " << out << "/results.md, results.csv, results.json\n"
            << write_plot(out) << "\n";
}

// A run directory made by an earlier sweep with another config is refused, not mixed in.
void check_same_config(const std::string& run_dir, const TrainConfig& config) {
  const std::string saved_path = run_dir + "/run_config.json";
  if (!fs::exists(saved_path)) return;
  nlohmann::json saved = input::read_json_file(saved_path, "run config");
  nlohmann::json now = config.to_json();
  saved.erase("threads");
  now.erase("threads");
  for (const auto& [k, v] : now.items())
    check(saved.contains(k) && saved.at(k) == v,
          "'" + run_dir + "' was run with " + k + "=" + (saved.contains(k) ? saved.at(k).dump() : "?") +
              " but this sweep gives " + k + "=" + v.dump() +
              "; use another --out, or delete that run directory to run it again");
}

void run_sweep(const SweepOptions& o, const ConfigFlags& flags) {
  check(!flags.values.count("out_dir"),
        "pion sweep: --out_dir is set per run (<out>/runs/<name>); give the sweep's --out instead");
  check(!flags.values.count("threads"),
        "pion sweep: --threads is set per run; use --threads-per-run");
  const std::string out = o.out;
  const std::string plan_path = out + "/sweep.json";
  if (o.report_only) {
    check(o.grid.empty(), "pion sweep --report-only reads the grid of the sweep in --out; drop --grid");
    check(fs::exists(plan_path), "pion sweep --report-only: no sweep in '" + out +
                                     "' (no sweep.json); run the sweep first");
    report(out, input::read_json_file(plan_path, "sweep plan"));
    return;
  }
  check(!o.grid.empty(), "pion sweep: give at least one --grid key=v1,v2,...");

  // Everything is checked before the first run starts.
  TrainConfig base;
  apply_config_flags(flags, base);
  std::vector<GridEntry> entries;
  for (const auto& g : o.grid) entries.push_back(parse_grid_entry(g));
  std::vector<PlannedRun> runs = expand_grid(entries, base);
  const int threads = o.threads_per_run > 0 ? o.threads_per_run
                                            : std::max(1, available_cpus() / o.jobs);
  for (auto& r : runs) {
    r.config.out_dir = out + "/runs/" + r.name;
    r.config.threads = threads;
    check_same_config(r.config.out_dir, r.config);
  }
  const std::string command = command_text(o, flags);
  std::cout << "pion sweep: " << runs.size() << " run(s), " << o.jobs << " at a time, " << threads
            << " thread(s) each -> " << out << "/runs/\n";
  if (o.dry_run) {
    for (const auto& r : runs) std::cout << "  " << r.name << "\n";
    return;
  }
  fs::create_directories(out + "/runs");
  const nlohmann::json plan = plan_json(runs, grid_keys(entries), command);
  write_json_file(plan_path, plan);

  std::vector<ChildJob> jobs;
  std::vector<std::size_t> job_run;  // the run index of each job
  int skipped = 0;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    const std::string dir = r.config.out_dir;
    const RunRecord rec = read_run_record(dir, r.config.max_iters);
    if (rec.status == "finished") {
      ++skipped;
      std::cout << "skip " << label_of(r) << ": finished, best val loss "
                << loss_text(rec.best_val_loss) << "\n";
      continue;
    }
    fs::create_directories(dir);
    write_json_file(dir + "/run_config.json", r.config.to_json());
    ChildJob job;
    job.label = label_of(r) + (rec.has_checkpoint ? " (resuming)" : "");
    job.args = {"train", "--config", dir + "/run_config.json"};
    if (rec.has_checkpoint) job.args.push_back("--resume");
    job.log_path = dir + "/log.txt";
    std::ofstream(job.log_path, std::ios::app) << "=== pion sweep: pion train --config " << dir
                                                << "/run_config.json"
                                                << (rec.has_checkpoint ? " --resume" : "") << "\n";
    jobs.push_back(job);
    job_run.push_back(i);
  }
  if (skipped > 0)
    std::cout << "pion sweep: skipped " << skipped << " finished run(s); " << jobs.size()
              << " to run\n";
  std::cout << std::flush;

  int failed = 0;
  const SchedulerReport sched = run_children(
      jobs, o.jobs, threads, static_cast<int>(runs.size()), skipped,
      [&](std::size_t j, const ChildResult& res) {
        const auto& r = runs[job_run[j]];
        write_run_status(r.config.out_dir, res.exit_code, res.seconds);
        const RunRecord rec = read_run_record(r.config.out_dir, r.config.max_iters);
        if (rec.status == "finished") return "best val loss " + loss_text(rec.best_val_loss);
        if (res.exit_code == 0 || res.exit_code == 130 || res.exit_code == 143)
          return std::string("stopped at step ") + std::to_string(rec.iters) +
                 "; a rerun of the sweep resumes it";
        ++failed;
        return "FAILED with exit status " + std::to_string(res.exit_code) + ", see " +
               r.config.out_dir + "/log.txt";
      });
  report(out, plan);
  if (sched.stop_signal != 0) {
    std::cout << "pion sweep: stopped; rerun the same command to resume\n" << std::flush;
    throw CLI::RuntimeError(128 + sched.stop_signal);
  }
  if (failed > 0) {
    std::cerr << "pion sweep: " << failed << " run(s) failed (their log.txt says why)\n";
    throw CLI::RuntimeError(1);
  }
}

}  // namespace

void add_sweep_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "sweep",
      "run a grid of `pion train` runs, N at a time, resumable; tables of best/final val loss "
      "(mean ± std over seeds) and a plot against lr");
  cmd->footer(
      "Each run trains the base config (--config and the config-key flags, as `pion train`) with\n"
      "one combination of the --grid values, as a child `pion train` in <out>/runs/<name> (name:\n"
      "key-value pairs, sanitised; log in log.txt). --grid OPT:key=... applies only to the runs\n"
      "with optimizer OPT and replaces a plain --grid of that key for them, e.g.\n"
      "  pion sweep --out runs/sw --max_iters 300 --grid optimizer=adamw,pion \\\n"
      "    --grid adamw:lr=1e-3,3e-3 --grid pion:matrix_lr=3e-3,1e-2 --grid seed=1,2,3 --jobs 2\n"
      "Runs are the product of the keys, the first --grid outermost. A rerun skips finished runs\n"
      "(summary.json at max_iters, not interrupted) and resumes ones with a checkpoint\n"
      "(--resume); a run directory made with a different config is refused. A failed run is\n"
      "reported and the others go on (exit status 1). Ctrl-C / SIGTERM is forwarded once to the\n"
      "runs, which checkpoint and stop; the sweep exits 130 / 143 and a rerun resumes.\n"
      "Results (rows: every grid key but seed; mean ± sample std over seeds of the finished\n"
      "runs): <out>/results.md, results.csv, results.json, and val_loss_vs_lr.png (x: matrix_lr\n"
      "where gridded, else lr; needs /usr/bin/python3 with matplotlib, else skipped).\n"
      "Each run prepares its own copy of a text corpus; for bpe, `pion prepare` once and give\n"
      "--data the prepared directory.");
  auto flags = add_config_flags(*cmd);
  auto o = std::make_shared<SweepOptions>();
  cmd->add_option("--out", o->out, "the sweep's directory (runs/, results.*)")->required();
  cmd->add_option("--grid", o->grid,
                  "key=v1,v2,... or OPTIMIZER:key=v1,v2,... (repeatable; any config key but "
                  "out_dir and threads)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--jobs", o->jobs, "runs at a time")
      ->check(FiniteRange(1, 256))
      ->capture_default_str();
  cmd->add_option("--threads-per-run", o->threads_per_run,
                  "OpenMP/BLAS threads of each run (0 = the available cores / jobs, at least 1)")
      ->check(FiniteRange(0, 1024))
      ->capture_default_str();
  cmd->add_flag("--report-only", o->report_only,
                "only (re)write the tables and the plot from the runs in --out");
  cmd->add_flag("--dry-run", o->dry_run, "check the grid and list the runs; run nothing");
  cmd->callback([o, flags] { run_sweep(*o, *flags); });
}

}  // namespace pion::cli
