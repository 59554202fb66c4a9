#pragma once
// Sharding the optimizer's work across data-parallel ranks (ZeRO-1 style, per parameter).
//
// Every parameter that an optimizer updates is OWNED by exactly one rank. The owner alone
// keeps that parameter's optimizer state and computes its update; afterwards the updated
// weights are broadcast from their owners so every rank holds the whole model again. Ranks
// build their optimizers with only the parameters they own, so state for the others is
// never allocated: that is what divides optimizer memory and time by about N.
//
// Ownership is assigned by cost (longest-processing-time greedy: heaviest parameter first,
// to the least-loaded rank), separately for each optimizer of the set so both the matrix
// optimizer's work and AdamW's memory are balanced. Per-parameter (not per-element) shards
// keep every optimizer's update rule untouched; the price is coarser balance when one
// matrix dominates (see docs/SCALING.md).
//
// Checkpoints stay the same whatever N: rank 0 merges the ranks' state dicts into exactly the
// file a single process writes (merge_optimizer_states), and every rank loading a file keeps
// only its own parameters' state (shard_optimizer_state).
#include <map>
#include <set>
#include <string>
#include <vector>

#include "pion/optim/hybrid.h"

namespace pion::dist {

// Names of each optimizer's parameters, group by group: layout[optimizer][group][i].
struct OptimizerLayout {
  std::vector<std::string> kinds;
  std::vector<std::vector<std::vector<std::string>>> names;
};
OptimizerLayout layout_of(const OptimizerSet& set);

// Relative cost of one step of `kind` ("adamw", "muon", "pion") on a parameter of this shape,
// in flop-like units: Pion ~ 7 m n (m + n) (its 7 GEMMs), Muon ~ 5 Newton-Schulz iterations
// of (4 r^2 c + 2 r^3) with r = min(m, n), c = max(m, n), AdamW ~ 10 per element.
double step_cost(const std::string& kind, const Shape& shape);

struct OwnershipPlan {
  int world_size = 1;
  std::map<std::string, int> owner;  // parameter name -> rank
  std::vector<double> load;          // summed step_cost per rank
  bool owns(int rank, const std::string& name) const { return owner.at(name) == rank; }
};
OwnershipPlan plan_ownership(const OptimizerSet& full, int world_size);

// A TensorFile (F32 tensors + metadata) as the bytes of a safetensors file, and back.
std::string pack(const TensorFile& file);
TensorFile unpack(const std::string& bytes);

// The optimizer state a single process would save, from the ranks' sharded states.
TensorFile merge_optimizer_states(const std::vector<TensorFile>& shards,
                                  const OptimizerLayout& layout);
// The part of a saved optimizer state (any N) that belongs to the `owned` parameters, in the
// form load_state of a set built from only those parameters expects.
TensorFile shard_optimizer_state(const TensorFile& file, const OptimizerLayout& layout,
                                 const std::set<std::string>& owned);

}  // namespace pion::dist
