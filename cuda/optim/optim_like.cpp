#include "pion/cuda/optim_like.h"

#include "pion/core/error.h"

namespace pion::cuda {

namespace {
double number(const nlohmann::json& options, const char* key) {
  return options.at(key).get<double>();
}
}  // namespace

std::unique_ptr<CudaOptimizer> make_cuda_optimizer_like(Context& ctx, const Optimizer& cpu,
                                                        std::size_t group,
                                                        std::vector<DeviceParam> params,
                                                        const CudaPrecisions& precision) {
  const std::string kind = cpu.kind();
  const nlohmann::json options = cpu.group_options(group);
  if (kind == "pion") {
    const std::string retraction = options.at("retraction").get<std::string>();
    check(retraction == "taylor2", "--device cuda runs Pion's taylor2 retraction only ('" +
                                       retraction +
                                       "' is CPU-only for now): use taylor2 or the CPU");
    check(options.at("reanchor_every").get<std::int64_t>() == 0,
          "--device cuda does not re-anchor Pion yet: set reanchor_every 0 or use the CPU");
    CudaPionOptions o;
    o.c = number(options, "c");
    o.beta1 = number(options, "beta1");
    o.beta2 = number(options, "beta2");
    o.eps = number(options, "eps");
    o.precision = precision.pion;
    return make_cuda_pion(ctx, std::move(params), o);
  }
  if (kind == "muon") {
    CudaMuonOptions o;
    o.momentum = number(options, "momentum");
    o.nesterov = options.at("nesterov").get<bool>();
    o.ns_steps = options.at("ns_steps").get<int>();
    o.weight_decay = number(options, "weight_decay");
    o.eps = number(options, "eps");
    o.precision = precision.muon;
    return make_cuda_muon(ctx, std::move(params), o);
  }
  check(kind == "adamw", "--device cuda: no GPU optimizer for '" + kind + "'");
  CudaAdamWOptions o;
  o.beta1 = number(options, "beta1");
  o.beta2 = number(options, "beta2");
  o.eps = number(options, "eps");
  o.weight_decay = number(options, "weight_decay");
  return make_cuda_adamw(ctx, std::move(params), o);
}

Shape cpu_state_shape(const std::string& kind, const std::string& key, const Shape& param) {
  if (kind == "pion") {
    if (key == "m_in" || key == "v_in") return {param[1], param[1]};
    if (key == "m_out" || key == "v_out") return {param[0], param[0]};
  }
  return param;
}

}  // namespace pion::cuda
