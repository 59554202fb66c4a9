#pragma once
// Builds the optimizer set a training run uses, from its config:
//   adamw: every parameter to AdamW (lr); 2-D parameters decay, 1-D (norm weights) do not,
//          as in nanoGPT.
//   muon:  hidden matrices to Muon (matrix_lr, muon_momentum, weight_decay); embeddings,
//          LM head and norms to AdamW (lr) as above. A tied embedding (the LM head) is one
//          AdamW parameter; GQA's [kv, d] wk and wv are hidden matrices like the others.
//   pion:  hidden matrices to Pion (matrix_lr, pion_c, beta1/beta2, pion_retraction,
//          pion_reanchor_every, pion_momentum, pion_update_side, pion_normalizer,
//          pion_ns_steps; no weight decay: Pion keeps the spectrum, so the weight norm
//          cannot grow); the rest to AdamW (lr) as above.
#include <functional>
#include <vector>

#include "pion/optim/hybrid.h"
#include "pion/optim/options.h"
#include "pion/train/config.h"

namespace pion {

// `keep` (data-parallel sharding): only parameters it accepts get an optimizer (and state);
// empty = all.
OptimizerSet build_optimizers(const TrainConfig& config, const std::vector<Param>& params,
                              const std::function<bool(const Param&)>& keep = {});

// The Pion options of a run (pion_c, beta1/beta2 and the pion_* keys).
PionOptions pion_options(const TrainConfig& config);

// The largest Pion spectrum drift over the set's Pion matrices (0 when there is no Pion).
double max_spectrum_drift(const OptimizerSet& set);

}  // namespace pion
