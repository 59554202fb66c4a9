#include "cli/sweep_results.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/train/checkpoint.h"

#ifndef PION_SCRIPTS_DIR
#define PION_SCRIPTS_DIR "scripts"
#endif

namespace pion::cli {

namespace fs = std::filesystem;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double loss_value(const nlohmann::json& j, const char* key) {
  if (!j.contains(key) || !j.at(key).is_number()) return kNaN;
  return j.at(key).get<double>();
}

nlohmann::json number_or_null(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}

struct Stats {
  std::vector<double> values;  // finite values only
  double mean() const {
    if (values.empty()) return kNaN;
    double s = 0;
    for (double v : values) s += v;
    return s / static_cast<double>(values.size());
  }
  // Sample standard deviation (n - 1); NaN for fewer than two values.
  double std() const {
    if (values.size() < 2) return kNaN;
    const double m = mean();
    double s = 0;
    for (double v : values) s += (v - m) * (v - m);
    return std::sqrt(s / static_cast<double>(values.size() - 1));
  }
};

struct Setting {
  std::string setting;
  std::string optimizer;
  std::map<std::string, std::string> values;  // grid keys but seed
  std::vector<std::string> runs;
  int failed = 0, unfinished = 0, non_finite = 0;
  Stats best, final;
};

std::string fixed(double v, int digits = 4) {
  if (!std::isfinite(v)) return "";
  std::ostringstream o;
  o << std::fixed << std::setprecision(digits) << v;
  return o.str();
}

std::string mean_std(const Stats& s) {
  if (s.values.empty()) return "–";
  const double sd = s.std();
  return fixed(s.mean()) + " ± " + (std::isfinite(sd) ? fixed(sd) : std::string("–"));
}

std::string notes(const Setting& s) {
  std::string n;
  auto add = [&](int count, const char* what) {
    if (count > 0) n += (n.empty() ? "" : ", ") + std::to_string(count) + " " + what;
  };
  add(s.failed, "failed");
  add(s.unfinished, "unfinished");
  add(s.non_finite, "non-finite loss");
  return n;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string md_cell(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '|' ? std::string("\\|") : std::string(1, c);
  return out.empty() ? "–" : out;
}

void write_text_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    check(static_cast<bool>(out), "could not write '" + tmp + "' (disk full or read-only?)");
  }
  fs::rename(tmp, path);
}

// The lr a setting is plotted at: matrix_lr if it is one of its grid keys, else lr.
std::string lr_key_of(const Setting& s) {
  if (s.values.count("matrix_lr")) return "matrix_lr";
  if (s.values.count("lr")) return "lr";
  return "";
}

}  // namespace

RunRecord read_run_record(const std::string& run_dir, int max_iters) {
  RunRecord r;
  r.best_val_loss = r.final_val_loss = kNaN;
  r.has_checkpoint = fs::exists(fs::path(run_dir) / "checkpoint.safetensors");
  bool finished = false;
  try {
    const auto summary_path = fs::path(run_dir) / "summary.json";
    if (fs::exists(summary_path)) {
      const auto s = input::read_json_file(summary_path.string(), "summary");
      r.iters = s.value("iters", 0);
      r.best_val_loss = loss_value(s, "best_val_loss");
      r.final_val_loss = loss_value(s, "final_val_loss");
      finished = r.iters == max_iters && !s.value("interrupted", false);
    }
    const auto status_path = fs::path(run_dir) / "sweep_status.json";
    if (fs::exists(status_path))
      r.exit_code = input::read_json_file(status_path.string(), "run status").value("exit_code", 0);
  } catch (const std::exception&) {
    finished = false;  // a damaged file: the run counts as unfinished and is run again
  }
  // 130 / 143: stopped by a second Ctrl-C / SIGTERM, not a failure; a rerun resumes it.
  const bool failed = r.exit_code != 0 && r.exit_code != 130 && r.exit_code != 143;
  r.status = finished ? "finished" : failed ? "failed" : "unfinished";
  return r;
}

void write_run_status(const std::string& run_dir, int exit_code, double seconds) {
  write_json_file(run_dir + "/sweep_status.json",
                  {{"exit_code", exit_code}, {"seconds", seconds}});
}

std::string write_results(const std::string& out_dir, const std::vector<std::string>& keys,
                          const std::vector<RunRecord>& runs, const std::string& command) {
  std::vector<std::string> columns;  // the table's key columns: every grid key but seed
  for (const auto& k : keys)
    if (k != "seed" && k != "optimizer") columns.push_back(k);
  std::vector<Setting> settings;
  for (const auto& run : runs) {
    auto it = std::find_if(settings.begin(), settings.end(),
                           [&](const Setting& s) { return s.setting == run.setting; });
    if (it == settings.end()) {
      Setting s;
      s.setting = run.setting;
      s.optimizer = run.optimizer;
      for (const auto& [k, v] : run.values)
        if (k != "seed") s.values[k] = v;
      settings.push_back(s);
      it = settings.end() - 1;
    }
    it->runs.push_back(run.name);
    if (run.status == "failed") ++it->failed;
    if (run.status == "unfinished") ++it->unfinished;
    if (run.status != "finished") continue;
    if (!std::isfinite(run.best_val_loss) || !std::isfinite(run.final_val_loss)) ++it->non_finite;
    if (std::isfinite(run.best_val_loss)) it->best.values.push_back(run.best_val_loss);
    if (std::isfinite(run.final_val_loss)) it->final.values.push_back(run.final_val_loss);
  }
  // Per optimizer, the setting with the lowest mean best val loss.
  std::vector<const Setting*> best;
  for (const auto& s : settings) {
    if (s.best.values.empty()) continue;
    auto it = std::find_if(best.begin(), best.end(),
                           [&](const Setting* b) { return b->optimizer == s.optimizer; });
    if (it == best.end())
      best.push_back(&s);
    else if (s.best.mean() < (*it)->best.mean())
      *it = &s;
  }

  // Markdown.
  std::ostringstream md;
  md << "# pion sweep results\n\nBest and final validation loss per setting: mean ± sample std "
        "over the seeds (n = finished runs with a finite loss).\n\n| optimizer |";
  for (const auto& c : columns) md << " " << c << " |";
  md << " n | best val loss | final val loss | notes |\n|---|";
  for (std::size_t i = 0; i < columns.size(); ++i) md << "---|";
  md << "---|---|---|---|\n";
  for (const auto& s : settings) {
    md << "| " << s.optimizer << " |";
    for (const auto& c : columns)
      md << " " << md_cell(s.values.count(c) ? s.values.at(c) : "") << " |";
    md << " " << s.best.values.size() << " | " << mean_std(s.best) << " | " << mean_std(s.final)
       << " | " << md_cell(notes(s)) << " |\n";
  }
  md << "\n## Best setting per optimizer (lowest mean best val loss)\n\n"
        "| optimizer | setting | n | best val loss | final val loss |\n|---|---|---|---|---|\n";
  for (const Setting* s : best)
    md << "| " << s->optimizer << " | " << md_cell(s->setting) << " | " << s->best.values.size()
       << " | " << mean_std(s->best) << " | " << mean_std(s->final) << " |\n";
  md << "\nMade by:\n\n    " << command << "\n";

  // CSV.
  std::ostringstream csv;
  csv << "optimizer";
  for (const auto& c : columns) csv << "," << csv_field(c);
  csv << ",n,n_failed,n_unfinished,best_val_loss_mean,best_val_loss_std,final_val_loss_mean,"
         "final_val_loss_std\n";
  for (const auto& s : settings) {
    csv << csv_field(s.optimizer);
    for (const auto& c : columns) csv << "," << csv_field(s.values.count(c) ? s.values.at(c) : "");
    csv << "," << s.best.values.size() << "," << s.failed << "," << s.unfinished << ","
        << fixed(s.best.mean(), 6) << "," << fixed(s.best.std(), 6) << ","
        << fixed(s.final.mean(), 6) << "," << fixed(s.final.std(), 6) << "\n";
  }

  // JSON (also what scripts/sweep_plot.py reads).
  nlohmann::json j;
  j["command"] = command;
  j["grid_keys"] = keys;
  j["settings"] = nlohmann::json::array();
  for (const auto& s : settings) {
    auto stats = [](const Stats& st) {
      nlohmann::json v = nlohmann::json::array();
      for (double x : st.values) v.push_back(x);
      return nlohmann::json{{"mean", number_or_null(st.mean())},
                            {"std", number_or_null(st.std())},
                            {"values", v}};
    };
    nlohmann::json e = {{"setting", s.setting},
                        {"optimizer", s.optimizer},
                        {"values", s.values},
                        {"n", s.best.values.size()},
                        {"n_failed", s.failed},
                        {"n_unfinished", s.unfinished},
                        {"best_val_loss", stats(s.best)},
                        {"final_val_loss", stats(s.final)},
                        {"runs", s.runs}};
    const std::string lr_key = lr_key_of(s);
    if (!lr_key.empty()) {
      e["lr_key"] = lr_key;
      e["lr"] = std::strtod(s.values.at(lr_key).c_str(), nullptr);
      // One plotted line per optimizer and combination of the other keys.
      std::string series = s.optimizer;
      for (const auto& [k, v] : s.values)
        if (k != lr_key && k != "optimizer") series += " " + k + "=" + v;
      e["series"] = series;
    }
    j["settings"].push_back(e);
  }
  j["best_per_optimizer"] = nlohmann::json::array();
  for (const Setting* s : best)
    j["best_per_optimizer"].push_back({{"optimizer", s->optimizer},
                                       {"setting", s->setting},
                                       {"best_val_loss_mean", number_or_null(s->best.mean())},
                                       {"best_val_loss_std", number_or_null(s->best.std())},
                                       {"n", s->best.values.size()}});
  j["runs"] = nlohmann::json::array();
  for (const auto& r : runs) {
    nlohmann::json values = nlohmann::json::object();
    for (const auto& [k, v] : r.values) values[k] = v;
    j["runs"].push_back({{"name", r.name},
                         {"status", r.status},
                         {"values", values},
                         {"iters", r.iters},
                         {"best_val_loss", number_or_null(r.best_val_loss)},
                         {"final_val_loss", number_or_null(r.final_val_loss)}});
  }

  write_text_file(out_dir + "/results.md", md.str());
  write_text_file(out_dir + "/results.csv", csv.str());
  write_json_file(out_dir + "/results.json", j);
  return md.str();
}

std::string write_plot(const std::string& out_dir) {
  const std::string python = "/usr/bin/python3";
  const std::string script = std::string(PION_SCRIPTS_DIR) + "/sweep_plot.py";
  const std::string png = out_dir + "/val_loss_vs_lr.png";
  if (!fs::exists(python)) return "val_loss_vs_lr.png skipped: no " + python;
  if (!fs::exists(script)) return "val_loss_vs_lr.png skipped: " + script + " is missing";
  auto quote = [](const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
  };
  const std::string cmd = python + " " + quote(script) + " " + quote(out_dir + "/results.json") +
                          " " + quote(png) + " 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) return "val_loss_vs_lr.png skipped: could not run " + python;
  std::string output;
  char buf[512];
  while (std::fgets(buf, sizeof buf, pipe) != nullptr) output += buf;
  const int status = ::pclose(pipe);
  while (!output.empty() && output.back() == '\n') output.pop_back();
  if (status == 0) return output.empty() ? "wrote " + png : output;
  const std::string last = output.substr(output.rfind('\n') == std::string::npos ? 0 : output.rfind('\n') + 1);
  return "val_loss_vs_lr.png skipped: " + last;
}

}  // namespace pion::cli
