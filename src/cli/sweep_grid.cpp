#include "cli/sweep_grid.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <set>

#include "cli/config_flags.h"
#include "pion/core/error.h"

namespace pion::cli {

namespace {

const char* kForm = "expected --grid key=v1,v2,... or --grid OPTIMIZER:key=v1,v2,...";

bool is_config_key(const std::string& key) {
  for (const auto& k : train_config_keys())
    if (k.name == key) return true;
  return false;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

// Directory-safe text: letters, digits and . + - stay, anything else becomes '-'.
std::string sanitise(const std::string& s) {
  std::string out;
  for (char c : s) {
    const bool keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                      c == '.' || c == '+' || c == '-';
    out += keep ? c : '-';
  }
  return out;
}

std::string fnv1a_hex(const std::string& s) {
  std::uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return std::string(buf, 8);
}

// `key-value` pairs joined by '_' (key names keep their own '_'); when sanitising changed a
// value or the name is long, a hash of the exact values keeps two runs from sharing a name.
std::string run_name(const std::vector<std::pair<std::string, std::string>>& values) {
  std::string name, exact;
  bool changed = false;
  for (const auto& [key, value] : values) {
    const std::string v = sanitise(value);
    changed = changed || v != value || value.empty();
    name += (name.empty() ? "" : "_") + key + "-" + v;
    exact += key + "=" + value + "\n";
  }
  if (name.empty()) return "base";
  if (changed || name.size() > 120) name = name.substr(0, 120) + "_" + fnv1a_hex(exact);
  return name;
}

}  // namespace

GridEntry parse_grid_entry(const std::string& text) {
  GridEntry e;
  const auto eq = text.find('=');
  check(eq != std::string::npos, "--grid '" + text + "': no '='; " + kForm);
  std::string lhs = trim(text.substr(0, eq));
  const auto colon = lhs.find(':');
  if (colon != std::string::npos) {
    e.scope = trim(lhs.substr(0, colon));
    lhs = trim(lhs.substr(colon + 1));
    check(!e.scope.empty(), "--grid '" + text + "': empty optimizer before ':'; " + kForm);
    check(e.scope == "adamw" || e.scope == "muon" || e.scope == "pion",
          "--grid '" + text + "': '" + e.scope + "' is not an optimizer (adamw, muon, pion)");
  }
  e.key = lhs;
  check(!e.key.empty(), "--grid '" + text + "': no key before '='; " + kForm);
  check(is_config_key(e.key), "--grid '" + text + "': unknown config key '" + e.key +
                                  "' (`pion train --help` lists the keys)");
  check(e.key != "out_dir" && e.key != "threads",
        "--grid '" + text + "': the sweep sets '" + e.key +
            "' itself (runs go to <out>/runs/<name>; threads come from --threads-per-run)");
  check(!(e.key == "optimizer" && !e.scope.empty()),
        "--grid '" + text + "': the optimizer key cannot be scoped to an optimizer");
  const std::string list = text.substr(eq + 1);
  std::size_t start = 0;
  while (true) {
    const auto comma = list.find(',', start);
    const std::string v =
        trim(list.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    check(!v.empty(), "--grid '" + text + "': empty value in the list; " + kForm);
    check(std::find(e.values.begin(), e.values.end(), v) == e.values.end(),
          "--grid '" + text + "': value '" + v + "' is listed twice");
    e.values.push_back(v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  // Each value passes the key's own check (type, range) now, before any run starts.
  for (const auto& v : e.values) {
    TrainConfig scratch;
    try {
      set_config_from_text(scratch, e.key, v);
    } catch (const Error& err) {
      throw Error("--grid '" + text + "': " + err.what());
    }
  }
  return e;
}

std::vector<std::string> grid_keys(const std::vector<GridEntry>& entries) {
  std::vector<std::string> keys;
  for (const auto& e : entries)
    if (std::find(keys.begin(), keys.end(), e.key) == keys.end()) keys.push_back(e.key);
  return keys;
}

std::vector<PlannedRun> expand_grid(const std::vector<GridEntry>& entries,
                                    const TrainConfig& base) {
  // One entry per (scope, key).
  std::set<std::pair<std::string, std::string>> seen;
  for (const auto& e : entries)
    check(seen.insert({e.scope, e.key}).second,
          "--grid: key '" + e.key + "' is given twice" +
              (e.scope.empty() ? std::string() : " for " + e.scope) + "; give its values in one list");
  std::vector<std::string> optimizers = {base.optimizer};
  for (const auto& e : entries)
    if (e.key == "optimizer") optimizers = e.values;
  for (const auto& e : entries)
    check(e.scope.empty() ||
              std::find(optimizers.begin(), optimizers.end(), e.scope) != optimizers.end(),
          "--grid " + e.scope + ":" + e.key + ": the sweep has no " + e.scope +
              " runs (add it to --grid optimizer=... or the base config)");
  const std::vector<std::string> keys = grid_keys(entries);

  std::vector<PlannedRun> runs;
  std::set<std::string> names;
  for (const auto& opt : optimizers) {
    // The entries that apply to this optimizer: its own scoped one, else the global one.
    std::vector<const GridEntry*> axes;
    for (const auto& key : keys) {
      const GridEntry* global = nullptr;
      const GridEntry* scoped = nullptr;
      for (const auto& e : entries) {
        if (e.key != key) continue;
        if (e.scope.empty()) global = &e;
        if (e.scope == opt) scoped = &e;
      }
      if (scoped || global) axes.push_back(scoped ? scoped : global);
    }
    std::vector<std::size_t> index(axes.size(), 0);
    while (true) {
      PlannedRun run;
      run.config = base;
      for (std::size_t a = 0; a < axes.size(); ++a) {
        const std::string& v = axes[a]->key == "optimizer" ? opt : axes[a]->values[index[a]];
        run.values.emplace_back(axes[a]->key, v);
        set_config_from_text(run.config, axes[a]->key, v);
      }
      run.name = run_name(run.values);
      for (const auto& [k, v] : run.values)
        if (k != "seed") run.setting += (run.setting.empty() ? "" : " ") + k + "=" + v;
      if (run.setting.empty()) run.setting = "base";
      try {
        run.config.validate();
      } catch (const Error& err) {
        throw Error("--grid: run '" + run.name + "' is not a valid config: " + err.what());
      }
      check(names.insert(run.name).second,
            "--grid: two runs would share the directory name '" + run.name + "'");
      runs.push_back(std::move(run));
      // Next index: the last axis varies fastest; the optimizer axis has one value here.
      bool advanced = false;
      for (std::size_t a = axes.size(); a-- > 0;) {
        const std::size_t n = axes[a]->key == "optimizer" ? 1 : axes[a]->values.size();
        if (++index[a] < n) {
          advanced = true;
          break;
        }
        index[a] = 0;
      }
      if (!advanced) break;
    }
  }
  return runs;
}

}  // namespace pion::cli
