#pragma once
// `pion sweep`'s grid: parsing the `--grid` entries, checking them against the TrainConfig key
// table before anything runs, and expanding them into the list of runs (one TrainConfig each).
#include <string>
#include <utility>
#include <vector>

#include "pion/train/config.h"

namespace pion::cli {

// One `--grid` entry: `key=v1,v2,...` (every run) or `OPT:key=v1,v2,...` (only the runs whose
// optimizer is OPT; it replaces a global entry of the same key for those runs).
struct GridEntry {
  std::string scope;  // "" = every optimizer
  std::string key;
  std::vector<std::string> values;  // as given (the run names use this text)
};

// Parses one entry; pion::Error (one line: what is wrong and the expected form) when malformed.
GridEntry parse_grid_entry(const std::string& text);

struct PlannedRun {
  std::string name;  // directory name under <out>/runs/: grid values, sanitised, deterministic
  std::vector<std::pair<std::string, std::string>> values;  // grid key -> value, grid order
  std::string setting;  // the values without `seed`: the runs a table row averages over
  TrainConfig config;   // base config + the values; out_dir and threads still to be set
};

// Expands the entries over the base config: for each optimizer (the `optimizer` entry's
// values, else the base's), the cartesian product of the keys that apply to it, keys in
// order of first appearance, the first one outermost. Every key is checked against the
// config table, every value with the key's own check, every run config with
// TrainConfig::validate(); unknown keys, empty or repeated values, a key given twice in one
// scope, keys the sweep sets itself (out_dir, threads) and scopes naming an optimizer that is
// not swept are pion::Error.
std::vector<PlannedRun> expand_grid(const std::vector<GridEntry>& entries,
                                    const TrainConfig& base);

// Keys in the order the entries first name them (every scope); `optimizer` included if gridded.
std::vector<std::string> grid_keys(const std::vector<GridEntry>& entries);

}  // namespace pion::cli
