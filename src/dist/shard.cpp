#include "pion/dist/shard.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numeric>

#include "pion/core/error.h"

namespace pion::dist {

namespace {

std::string meta_key(std::size_t i) {
  return "optim." + std::to_string(i) + ".meta";
}
std::string prefix_of(std::size_t i) {
  return "optim." + std::to_string(i) + ".";
}

// The parameter of optimizer i that owns state tensor `rest` ("<param>.<key>"): the longest
// name followed by '.', as Optimizer::load_state decides.
const std::string* owner_of(const std::string& rest,
                            const std::vector<std::vector<std::string>>& groups) {
  const std::string* best = nullptr;
  for (const auto& g : groups)
    for (const auto& name : g)
      if (rest.size() > name.size() && rest.compare(0, name.size(), name) == 0 &&
          rest[name.size()] == '.' && (!best || name.size() > best->size()))
        best = &name;
  return best;
}

}  // namespace

OptimizerLayout layout_of(const OptimizerSet& set) {
  OptimizerLayout out;
  for (const auto& o : set.optimizers()) {
    out.kinds.push_back(o->kind());
    auto& groups = out.names.emplace_back();
    for (const auto& g : o->groups()) {
      auto& names = groups.emplace_back();
      for (const auto& p : g.params) names.push_back(p.name);
    }
  }
  return out;
}

double step_cost(const std::string& kind, const Shape& shape) {
  double numel = 1.0;
  for (auto d : shape) numel *= static_cast<double>(d);
  if (shape.size() == 2 && (kind == "pion" || kind == "muon")) {
    const double m = static_cast<double>(shape[0]), n = static_cast<double>(shape[1]);
    if (kind == "pion") return 7.0 * m * n * (m + n);
    const double r = std::min(m, n), c = std::max(m, n);
    return 5.0 * (4.0 * r * r * c + 2.0 * r * r * r);
  }
  return 10.0 * numel;
}

OwnershipPlan plan_ownership(const OptimizerSet& full, int world_size) {
  check(world_size >= 1, "plan_ownership: world size must be >= 1");
  OwnershipPlan plan;
  plan.world_size = world_size;
  plan.load.assign(static_cast<std::size_t>(world_size), 0.0);
  for (const auto& o : full.optimizers()) {
    struct Item {
      std::string name;
      double cost;
    };
    std::vector<Item> items;
    for (const auto& g : o->groups())
      for (const auto& p : g.params)
        items.push_back({p.name, step_cost(o->kind(), p.value.shape())});
    // Heaviest first; ties by name so every rank computes the same plan.
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
      return a.cost != b.cost ? a.cost > b.cost : a.name < b.name;
    });
    std::vector<double> load(static_cast<std::size_t>(world_size), 0.0);
    for (const auto& it : items) {
      const auto r =
          static_cast<std::size_t>(std::min_element(load.begin(), load.end()) - load.begin());
      load[r] += it.cost;
      plan.load[r] += it.cost;
      plan.owner[it.name] = static_cast<int>(r);
    }
  }
  return plan;
}

std::string pack(const TensorFile& file) {
  for (const auto& [name, t] : file.tensors)
    check(t.dtype() == DType::F32, "pack: tensor '" + name + "' is not F32");
  return serialize_safetensors(file);
}

TensorFile unpack(const std::string& bytes) {
  return parse_safetensors(bytes, "optimizer state from another rank");
}

TensorFile merge_optimizer_states(const std::vector<TensorFile>& shards,
                                  const OptimizerLayout& layout) {
  check(!shards.empty(), "merge_optimizer_states: no shards");
  TensorFile out;
  for (const auto& s : shards)
    for (const auto& [name, t] : s.tensors)
      check(out.tensors.emplace(name, t).second,
            "merge_optimizer_states: tensor '" + name + "' comes from two ranks");
  out.metadata = shards.front().metadata;
  for (std::size_t i = 0; i < layout.names.size(); ++i) {
    auto meta = nlohmann::json::parse(shards.front().metadata.at(meta_key(i)));
    std::set<std::string> stateful;
    for (const auto& s : shards) {
      const auto m = nlohmann::json::parse(s.metadata.at(meta_key(i)));
      check(m.at("steps") == meta.at("steps"),
            "merge_optimizer_states: ranks disagree on the step count of optimizer " +
                std::to_string(i));
      for (const auto& name : m.at("stateful")) stateful.insert(name.get<std::string>());
    }
    for (std::size_t g = 0; g < layout.names[i].size(); ++g)
      meta["groups"][g]["params"] = layout.names[i][g];
    // A single process lists stateful parameters in name order (std::map), as a set does.
    meta["stateful"] = std::vector<std::string>(stateful.begin(), stateful.end());
    out.metadata[meta_key(i)] = meta.dump();
  }
  return out;
}

TensorFile shard_optimizer_state(const TensorFile& file, const OptimizerLayout& layout,
                                 const std::set<std::string>& owned) {
  TensorFile out;
  out.metadata = file.metadata;
  for (std::size_t i = 0; i < layout.names.size(); ++i) {
    auto it = file.metadata.find(meta_key(i));
    check(it != file.metadata.end(), "optimizer state: metadata '" + meta_key(i) + "' is missing");
    nlohmann::json meta;
    try {
      meta = nlohmann::json::parse(it->second);
      auto& groups = meta.at("groups");
      check(groups.size() == layout.names[i].size(),
            "optimizer state: number of param groups differs from this optimizer's");
      for (auto& g : groups) {
        nlohmann::json kept = nlohmann::json::array();
        for (const auto& name : g.at("params"))
          if (owned.count(name.get<std::string>())) kept.push_back(name);
        g["params"] = kept;
      }
      if (meta.contains("stateful")) {
        nlohmann::json kept = nlohmann::json::array();
        for (const auto& name : meta.at("stateful"))
          if (owned.count(name.get<std::string>())) kept.push_back(name);
        meta["stateful"] = kept;
      }
    } catch (const nlohmann::json::exception& e) {
      throw Error("optimizer state: metadata '" + meta_key(i) + "' is malformed (" + e.what() +
                  ")");
    }
    out.metadata[meta_key(i)] = meta.dump();
    const std::string prefix = prefix_of(i);
    for (const auto& [key, t] : file.tensors) {
      if (key.rfind(prefix, 0) != 0) continue;
      const std::string* name = owner_of(key.substr(prefix.size()), layout.names[i]);
      // Tensors of no known parameter are passed on so load_state reports them.
      if (name == nullptr || owned.count(*name)) out.tensors[key] = t;
    }
  }
  return out;
}

}  // namespace pion::dist
