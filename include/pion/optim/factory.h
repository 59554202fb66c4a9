#pragma once
// Builds an optimizer by name from a JSON object of hyperparameters, with every parameter in
// one group: what `pion optim-trace` and run configs use, so that a typo in a key or a value
// out of range is caught before any step is taken instead of silently using a default.
//
// Keys per kind: "lr" and the fields of the kind's Options, with their ranges, as declared in
// pion/optim/options.h (AdamWOptions, MuonOptions, PionOptions); optimizer_config_keys lists
// them. Every key is optional: a missing key takes the optimizer's default, lr included.
// An unknown key, a value of the wrong JSON type or an invalid value throws pion::Error naming
// the key and listing the valid keys; an unknown kind throws listing adamw|muon|pion.
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "pion/optim/optimizer.h"

namespace pion {

std::unique_ptr<Optimizer> make_optimizer(const std::string& kind, const nlohmann::json& config,
                                          std::vector<Param> params);

// "adamw", "muon", "pion".
const std::vector<std::string>& optimizer_kinds();
// The config keys make_optimizer accepts for `kind`, in documentation order (throws pion::Error
// for an unknown kind, so it doubles as a cheap check of a kind before any data is loaded).
const std::vector<std::string>& optimizer_config_keys(const std::string& kind);
// The learning rate make_optimizer uses when the config has no "lr".
double default_lr(const std::string& kind);

}  // namespace pion
