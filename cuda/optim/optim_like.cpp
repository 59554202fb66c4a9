#include "pion/cuda/optim_like.h"

#include "pion/core/error.h"
#include "pion/optim/options_json.h"

namespace pion::cuda {

namespace {

// The GPU options for one CPU param group: the CPU Options read back from the group's JSON
// (every field, typed and range-checked) plus the GPU-only precision.
template <class Options, class CudaOptions = Options>
CudaOptions like(const Optimizer& cpu, std::size_t group) {
  CudaOptions o;
  static_cast<Options&>(o) = options_from_group_json<Options>(cpu.group_options(group), cpu.kind());
  return o;
}

}  // namespace

std::unique_ptr<CudaOptimizer> make_cuda_optimizer_like(Context& ctx, const Optimizer& cpu,
                                                        std::size_t group,
                                                        std::vector<DeviceParam> params,
                                                        const CudaPrecisions& precision) {
  const std::string kind = cpu.kind();
  if (kind == "pion") {
    auto o = like<PionOptions, CudaPionOptions>(cpu, group);
    o.precision = precision.pion;
    return make_cuda_pion(ctx, std::move(params), o);
  }
  if (kind == "muon") {
    auto o = like<MuonOptions, CudaMuonOptions>(cpu, group);
    o.precision = precision.muon;
    return make_cuda_muon(ctx, std::move(params), o);
  }
  check(kind == "adamw", "--device cuda: no GPU optimizer for '" + kind + "'");
  return make_cuda_adamw(ctx, std::move(params), like<AdamWOptions>(cpu, group));
}

}  // namespace pion::cuda
