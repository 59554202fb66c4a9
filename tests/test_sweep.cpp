// End-to-end tests of `pion sweep` through the binary: a 2x2 grid runs and its tables match the
// runs' summary.json files; a rerun skips finished runs and resumes unfinished ones; per-
// optimizer grids make the right runs; bad grids are one-line errors with exit status 2; a
// failing run is reported without stopping the others; SIGTERM stops every run with a
// checkpoint and a rerun resumes them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <vector>

#include "expect_error.h"
#include "helpers.h"

using namespace pion;
namespace fs = std::filesystem;

namespace {

std::string write_corpus(const std::string& dir) {
  const std::string path = dir + "/corpus.txt";
  std::ofstream(path) << test::fallback_corpus(20000);
  return path;
}

// A model small enough that each run takes well under a second.
std::string tiny(const std::string& data) {
  return "--data " + data +
         " --n_layer 1 --n_head 2 --d_model 16 --seq_len 16 --batch_size 4 --max_iters 4"
         " --warmup_iters 1 --eval_interval 2 --eval_iters 1 --log_interval 2"
         " --checkpoint_minutes 0";
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::stringstream s(text);
  std::string line;
  while (std::getline(s, line))
    if (!line.empty()) lines.push_back(line);
  return lines;
}

std::set<std::string> run_dirs(const std::string& out) {
  std::set<std::string> names;
  if (!fs::exists(out + "/runs")) return names;
  for (const auto& e : fs::directory_iterator(out + "/runs")) names.insert(e.path().filename());
  return names;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (auto p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

double sample_std(const std::vector<double>& v) {
  const double m = mean(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

}  // namespace

TEST(Sweep, GridRunsTabulatesAndRerunSkipsFinishedRuns) {
  const std::string dir = test::temp_dir("sweep_grid");
  const std::string out = dir + "/sw";
  const std::string args = "sweep --out " + out + " " + tiny(write_corpus(dir)) +
                           " --grid optimizer=adamw,pion --grid seed=1,2 --jobs 2";
  auto r = test::run_pion(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::set<std::string> expected = {"optimizer-adamw_seed-1", "optimizer-adamw_seed-2",
                                          "optimizer-pion_seed-1", "optimizer-pion_seed-2"};
  EXPECT_EQ(run_dirs(out), expected);
  EXPECT_EQ(count(r.output, "[done "), 4u) << r.output;

  // The tables, recomputed from the runs' own summary.json files.
  const auto results = read_json(out + "/results.json");
  ASSERT_EQ(results.at("settings").size(), 2u);
  const auto csv = lines_of(read_text(out + "/results.csv"));
  ASSERT_EQ(csv.size(), 3u) << "header + one row per optimizer";
  EXPECT_EQ(csv[0].rfind("optimizer,n,n_failed,n_unfinished,best_val_loss_mean", 0), 0u) << csv[0];
  const std::string md = read_text(out + "/results.md");
  for (const char* opt : {"adamw", "pion"}) {
    std::vector<double> best, final;
    for (int seed : {1, 2}) {
      const auto s = read_json(out + "/runs/optimizer-" + opt + "_seed-" + std::to_string(seed) +
                               "/summary.json");
      EXPECT_EQ(s.at("iters"), 4);
      best.push_back(s.at("best_val_loss").get<double>());
      final.push_back(s.at("final_val_loss").get<double>());
    }
    const auto& rows = results.at("settings");
    const auto row = std::find_if(rows.begin(), rows.end(),
                                  [&](const nlohmann::json& x) { return x.at("optimizer") == opt; });
    ASSERT_NE(row, rows.end()) << opt;
    EXPECT_EQ(row->at("n"), 2);
    EXPECT_NEAR(row->at("best_val_loss").at("mean").get<double>(), mean(best), 1e-12);
    EXPECT_NEAR(row->at("best_val_loss").at("std").get<double>(), sample_std(best), 1e-12);
    EXPECT_NEAR(row->at("final_val_loss").at("mean").get<double>(), mean(final), 1e-12);
    EXPECT_NEAR(row->at("final_val_loss").at("std").get<double>(), sample_std(final), 1e-12);
    // The CSV row: optimizer, n, n_failed, n_unfinished, best mean/std, final mean/std.
    const auto line = std::find_if(csv.begin(), csv.end(), [&](const std::string& l) {
      return l.rfind(std::string(opt) + ",", 0) == 0;
    });
    ASSERT_NE(line, csv.end());
    std::vector<std::string> cells;
    std::stringstream cs(*line);
    for (std::string c; std::getline(cs, c, ',');) cells.push_back(c);
    ASSERT_EQ(cells.size(), 8u) << *line;
    EXPECT_EQ(cells[1], "2");
    EXPECT_NEAR(std::stod(cells[4]), mean(best), 1e-6);
    EXPECT_NEAR(std::stod(cells[5]), sample_std(best), 1e-6);
    EXPECT_NEAR(std::stod(cells[6]), mean(final), 1e-6);
    EXPECT_NEAR(std::stod(cells[7]), sample_std(final), 1e-6);
    EXPECT_NE(md.find("| " + std::string(opt) + " | 2 | "), std::string::npos) << md;
  }
  EXPECT_EQ(results.at("best_per_optimizer").size(), 2u);
  EXPECT_NE(md.find("Best setting per optimizer"), std::string::npos);
  EXPECT_NE(md.find("pion sweep --out " + out), std::string::npos) << "the command line";
  EXPECT_TRUE(fs::exists(out + "/runs/optimizer-pion_seed-1/log.txt"));

  // A rerun skips every finished run and leaves its files as they were.
  const std::string summary = out + "/runs/optimizer-pion_seed-2/summary.json";
  const auto mtime = fs::last_write_time(summary);
  const std::string before = read_text(summary);
  r = test::run_pion(args);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count(r.output, "skip "), 4u) << r.output;
  EXPECT_NE(r.output.find("skipped 4 finished run(s); 0 to run"), std::string::npos) << r.output;
  EXPECT_EQ(count(r.output, "[start "), 0u) << r.output;
  EXPECT_EQ(fs::last_write_time(summary), mtime);
  EXPECT_EQ(read_text(summary), before);

  // --report-only rebuilds the same tables from the runs.
  const std::string csv_before = read_text(out + "/results.csv");
  fs::remove(out + "/results.csv");
  r = test::run_pion("sweep --out " + out + " --report-only");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_text(out + "/results.csv"), csv_before);
}

TEST(Sweep, ResumesAnUnfinishedRunAndPlotsAgainstLr) {
  const std::string dir = test::temp_dir("sweep_resume");
  const std::string out = dir + "/sw";
  const std::string flags = tiny(write_corpus(dir));
  // A run stopped half way, as an interrupted sweep leaves it: a checkpoint at step 2.
  auto r = test::run_pion("train " + flags + " --lr 0.003 --stop_after 2 --threads 1 --out_dir " +
                          out + "/runs/lr-0.003");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = test::run_pion("sweep --out " + out + " " + flags + " --grid lr=0.001,0.003");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("lr=0.003 (resuming)"), std::string::npos) << r.output;
  EXPECT_NE(read_text(out + "/runs/lr-0.003/log.txt").find("--resume"), std::string::npos);
  EXPECT_EQ(read_json(out + "/runs/lr-0.003/summary.json").at("iters"), 4);
  EXPECT_EQ(read_json(out + "/results.json").at("settings").size(), 2u);
  if (test::python_has("matplotlib"))
    EXPECT_TRUE(fs::exists(out + "/val_loss_vs_lr.png")) << r.output;
  else
    EXPECT_NE(r.output.find("val_loss_vs_lr.png skipped"), std::string::npos) << r.output;
}

TEST(Sweep, PerOptimizerGridsMakeTheRightRuns) {
  const std::string dir = test::temp_dir("sweep_scoped");
  auto r = test::run_pion("sweep --out " + dir +
                          "/sw --dry-run --grid optimizer=muon,pion --grid matrix_lr=0.01"
                          " --grid pion:matrix_lr=0.03,0.1 --grid seed=1,2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::vector<std::string> names;
  for (const auto& line : lines_of(r.output))
    if (line.rfind("  ", 0) == 0) names.push_back(line.substr(2));
  const std::vector<std::string> expected = {
      "optimizer-muon_matrix_lr-0.01_seed-1", "optimizer-muon_matrix_lr-0.01_seed-2",
      "optimizer-pion_matrix_lr-0.03_seed-1", "optimizer-pion_matrix_lr-0.03_seed-2",
      "optimizer-pion_matrix_lr-0.1_seed-1",  "optimizer-pion_matrix_lr-0.1_seed-2"};
  EXPECT_EQ(names, expected) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/sw")) << "--dry-run writes nothing";

  // A scoped key the other optimizer does not have: only pion's runs get it.
  r = test::run_pion("sweep --out " + dir +
                     "/sw --dry-run --grid optimizer=adamw,pion --grid pion:pion_c=0.1,0.2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("3 run(s)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("  optimizer-adamw\n"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("  optimizer-pion_pion_c-0.2\n"), std::string::npos) << r.output;
}

TEST(Sweep, BadGridsAreOneLineErrorsWithExitStatus2) {
  const std::string dir = test::temp_dir("sweep_bad");
  const std::string out = " --out " + dir + "/sw";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--grid nosuch=1,2", "unknown config key 'nosuch'"},
      {"--grid seed=", "empty value"},
      {"--grid seed=1,,2", "empty value"},
      {"--grid seed=1,1", "listed twice"},
      {"--grid lr=-1", "config key 'lr'"},
      {"--grid n_layer=1.5", "config key 'n_layer'"},
      {"--grid optimizer=adamw,sgd", "optimizer"},
      {"--grid seed", "no '='"},
      {"--grid seed=1 --grid seed=2", "given twice"},
      {"--grid pion:matrix_lr=0.1", "no pion runs"},
      {"--grid sgd:lr=0.1", "not an optimizer"},
      {"--grid out_dir=a,b", "sets 'out_dir' itself"},
      {"--grid d_model=30 --n_head 4", "d_model"},
      {"", "at least one --grid"},
      {"--grid seed=1 --jobs 0", "--jobs"},
  };
  for (const auto& [args, message] : cases) {
    test::expect_cli_error("sweep" + out + " " + args, {message});
    EXPECT_FALSE(fs::exists(dir + "/sw")) << args << ": nothing may start";
  }
}

TEST(Sweep, AFailedRunIsReportedAndTheOthersGoOn) {
  const std::string dir = test::temp_dir("sweep_fail");
  const std::string out = dir + "/sw";
  const std::string data = write_corpus(dir);
  // Seed 2's run is made to fail: its directory holds a file where the checkpoint would go.
  fs::create_directories(out + "/runs/seed-2/checkpoint.safetensors");
  auto r = test::run_pion("sweep --out " + out + " " + tiny(data) + " --grid seed=1,2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("seed=2 (resuming)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("FAILED with exit status"), std::string::npos) << r.output;
  EXPECT_EQ(read_json(out + "/runs/seed-1/summary.json").at("iters"), 4);
  const auto results = read_json(out + "/results.json");
  ASSERT_EQ(results.at("settings").size(), 1u);
  EXPECT_EQ(results.at("settings")[0].at("n"), 1);
  EXPECT_EQ(results.at("settings")[0].at("n_failed"), 1);
  EXPECT_NE(read_text(out + "/results.md").find("1 failed"), std::string::npos);
}

// SIGTERM to the sweep reaches each running `pion train` once: both checkpoint and stop, the
// sweep exits 143, and a rerun resumes them.
TEST(Sweep, SigtermStopsTheRunsWithACheckpointAndARerunResumes) {
  const std::string dir = test::temp_dir("sweep_sigterm");
  const std::string out = dir + "/sw";
  // Runs far longer than the test waits, so the signal always lands mid-run.
  const std::string cmd = std::string(PION_BINARY) + " sweep --out " + out + " " +
                          tiny(write_corpus(dir)) +
                          " --max_iters 1000000 --eval_interval 100000 --log_interval 1"
                          " --grid seed=1,2 --jobs 2";
  const std::string both_running =
      "[ -s " + out + "/runs/seed-1/metrics.jsonl ] && [ -s " + out + "/runs/seed-2/metrics.jsonl ]";
  auto r = test::run_command("(" + cmd + " > " + dir + "/log1 2>&1 & pid=$!; for i in $(seq 600); do " +
                             both_running + " && break; sleep 0.1; done; kill -TERM $pid; wait $pid;"
                             " echo rc=$?)");
  const std::string log1 = read_text(dir + "/log1");
  EXPECT_NE(r.output.find("rc=143"), std::string::npos) << r.output << log1;
  EXPECT_NE(log1.find("forwarded to 2 running run(s)"), std::string::npos) << log1;
  for (const char* run : {"seed-1", "seed-2"}) {
    const std::string run_dir = out + "/runs/" + run;
    ASSERT_TRUE(fs::exists(run_dir + "/summary.json")) << run << "\n" << log1;
    EXPECT_TRUE(read_json(run_dir + "/summary.json").at("interrupted").get<bool>()) << run;
    EXPECT_TRUE(fs::exists(run_dir + "/checkpoint.safetensors")) << run;
  }
  EXPECT_NE(read_text(out + "/results.md").find("2 unfinished"), std::string::npos)
      << "one setting (seed is not one), both runs unfinished";

  // The rerun resumes both from their checkpoints (stopped again once they have).
  const std::string resumed = "grep -q 'resumed from' " + out + "/runs/seed-1/log.txt && grep -q "
                              "'resumed from' " + out + "/runs/seed-2/log.txt";
  r = test::run_command("(" + cmd + " > " + dir + "/log2 2>&1 & pid=$!; for i in $(seq 600); do " +
                        resumed + " && break; sleep 0.1; done; kill -TERM $pid; wait $pid;"
                        " echo rc=$?)");
  const std::string log2 = read_text(dir + "/log2");
  EXPECT_NE(log2.find("seed=1 (resuming)"), std::string::npos) << log2;
  EXPECT_NE(log2.find("seed=2 (resuming)"), std::string::npos) << log2;
  EXPECT_NE(read_text(out + "/runs/seed-2/log.txt").find("resumed from"), std::string::npos);
}
