#include "pion/train/build_optimizer.h"

#include <algorithm>
#include <functional>

#include "pion/core/error.h"
#include "pion/optim/adamw.h"
#include "pion/optim/muon.h"
#include "pion/optim/pion.h"

namespace pion {

namespace {

// The enum value a string config key names (TrainConfig::validate has checked it already).
template <class Enum>
Enum parse_choice(const Choices& c, const std::string& value, const char* key) {
  for (int i = 0; i < c.count; ++i)
    if (value == c.names[i]) return static_cast<Enum>(i);
  throw Error(std::string("config key '") + key + "' must be " + allowed_text(c) + ", got '" +
              value + "'");
}

// TrainConfig keys -> Options fields: the one place run-config keys meet the optimizers'
// hyperparameters (fields, defaults and ranges: pion/optim/options.h). A field not set here
// keeps its default.
AdamW::Options adamw_options(const TrainConfig& c) {
  AdamW::Options o;
  o.beta1 = c.beta1;
  o.beta2 = c.beta2;
  o.eps = 1e-8;
  o.weight_decay = c.weight_decay;  // 2-D parameters only (see make_adamw)
  return o;
}

Muon::Options muon_options(const TrainConfig& c) {
  Muon::Options o;
  o.momentum = c.muon_momentum;
  o.weight_decay = c.weight_decay;
  return o;
}

}  // namespace

// Public (build_optimizer.h): require_device checks a run's Pion variant against the GPU's.
Pion::Options pion_options(const TrainConfig& c) {
  Pion::Options o;
  o.c = c.pion_c;
  o.beta1 = c.beta1;
  o.beta2 = c.beta2;
  o.retraction = parse_retraction(c.pion_retraction);
  o.reanchor_every = c.pion_reanchor_every;
  o.momentum = parse_choice<PionMomentum>(kPionMomenta, c.pion_momentum, "pion_momentum");
  o.update_side = parse_choice<PionUpdateSide>(kPionUpdateSides, c.pion_update_side,
                                               "pion_update_side");
  o.normalizer = parse_choice<PionNormalizer>(kPionNormalizers, c.pion_normalizer,
                                              "pion_normalizer");
  o.ns_steps = c.pion_ns_steps;
  return o;
}

namespace {

// AdamW over `params`: 2-D tensors (embeddings, LM head, or all matrices under adamw) decay,
// 1-D tensors (RMSNorm weights) do not, as nanoGPT does.
std::unique_ptr<Optimizer> make_adamw(const TrainConfig& c, const std::vector<Param>& params) {
  std::vector<Param> decay, no_decay;
  for (const auto& p : params) (p.value.ndim() >= 2 ? decay : no_decay).push_back(p);
  auto adamw = std::make_unique<AdamW>();
  AdamW::Options o = adamw_options(c);
  adamw->add_param_group(std::move(decay), c.lr, o);
  o.weight_decay = 0.0;
  adamw->add_param_group(std::move(no_decay), c.lr, o);
  return adamw;
}

}  // namespace

OptimizerSet build_optimizers(const TrainConfig& c, const std::vector<Param>& all_params,
                              const std::function<bool(const Param&)>& keep) {
  // Routing is per parameter, so a rank's shard is routed exactly as in the whole model.
  // Groups stay even when empty, so every rank's state dict has the same structure.
  std::vector<Param> params;
  for (const auto& p : all_params)
    if (!keep || keep(p)) params.push_back(p);
  OptimizerSet set;
  if (c.optimizer == "adamw") {
    set.add(make_adamw(c, params));
    return set;
  }
  RoutedParams routed = route_params(params);
  if (c.optimizer == "muon") {
    auto muon = std::make_unique<Muon>();
    muon->add_param_group(std::move(routed.matrix), c.matrix_lr, muon_options(c));
    set.add(std::move(muon));
  } else {
    auto pion = std::make_unique<Pion>();
    pion->add_param_group(std::move(routed.matrix), c.matrix_lr, pion_options(c));
    set.add(std::move(pion));
  }
  set.add(make_adamw(c, routed.other));
  return set;
}

double max_spectrum_drift(const OptimizerSet& set) {
  double drift = 0.0;
  for (const auto& o : set.optimizers())
    if (const auto* pion = dynamic_cast<const Pion*>(o.get()))
      for (const auto& [name, d] : pion->spectrum_drifts()) drift = std::max(drift, d);
  return drift;
}

}  // namespace pion
