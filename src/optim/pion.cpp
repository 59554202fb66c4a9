#include "pion/optim/pion.h"

#include <algorithm>
#include <cmath>

#include "optim/pion_math.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/optim/options_json.h"
#include "pion/optim/state_util.h"

namespace pion {

PionRetraction parse_retraction(const std::string& name) {
  for (int i = 0; i < kPionRetractions.count; ++i)
    if (name == kPionRetractions.names[i]) return static_cast<PionRetraction>(i);
  throw Error("pion: unknown retraction '" + name +
              "'; choose taylor2 (the paper's E2), cayley or exp (both exactly orthogonal)");
}

namespace {

// W <- U diag(sigma0) V^T: the nearest matrix (in Frobenius norm) with the initial spectrum
// and W's singular vectors.
void reanchor(Tensor& w, const Tensor& sigma0) {
  const std::int64_t m = w.rows(), n = w.cols(), k = sigma0.numel();
  Svd d = svd(w);
  float* u = d.u.data<float>();
  const float* s0 = sigma0.data<float>();
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < k; ++j) u[i * k + j] *= s0[j];
  gemm<float>(Trans::N, Trans::N, m, n, k, 1.0f, u, k, d.vt.data<float>(), n, 0.0f, w.data<float>(),
              n);
}

}  // namespace

std::size_t Pion::add_param_group(std::vector<Param> params, double lr, const Options& options) {
  validate_options(options, "pion");
  for (const Param& p : params) {
    if (!p.value.defined()) continue;  // add_group reports it
    check(p.value.ndim() == 2,
          "pion: parameter '" + p.name + "' has shape " + shape_string(p.value.shape()) +
              "; Pion updates 2-D weight matrices only. Route biases, norms and embeddings "
              "to AdamW (see route_params in pion/optim/hybrid.h)");
    check(p.value.rows() > 0 && p.value.cols() > 0,
          "pion: parameter '" + p.name + "' is an empty matrix");
  }
  std::size_t g = add_group(std::move(params), lr);
  options_.push_back(options);
  return g;
}

nlohmann::json Pion::group_options(std::size_t g) const {
  return options_to_json(options_.at(g));
}

void Pion::set_group_options(std::size_t g, const nlohmann::json& j) {
  options_.at(g) = options_from_group_json<Options>(j, "pion");
}

std::vector<StateSlot> Pion::state_slots(const Shape& param) const {
  check(param.size() == 2, "pion: state of a " + shape_string(param) + " parameter: 2-D only");
  const std::int64_t m = param[0], n = param[1];
  return {{"m_in", {n, n}, false},
          {"v_in", {n, n}, true},
          {"m_out", {m, m}, false},
          {"v_out", {m, m}, true},
          {"sigma0", {std::min(m, n)}, true}};
}

Pion::Scratch& Pion::scratch_for(std::int64_t d_out, std::int64_t d_in) {
  Scratch& s = scratch_[{d_out, d_in}];
  if (!s.p.defined()) {
    s.a_in = Tensor::empty({d_in, d_in});
    s.a_out = Tensor::empty({d_out, d_out});
    s.p = Tensor::empty({d_out, d_in});
    s.q = Tensor::empty({d_out, d_in});
  }
  return s;
}

void Pion::update_group(std::size_t g) {
  ParamGroup& group = groups_[g];
  for (Param& p : group.params) update_matrix(p, group.lr, options_[g]);
}

void Pion::update_matrix(Param& p, double lr, const Options& o) {
  namespace pm = pion_math;
  const std::int64_t m = p.value.rows(), n = p.value.cols();
  StateMap& state = state_for(p);
  // The spectrum this matrix keeps: taken (in fp64) before its first update.
  if (state.find("sigma0") == state.end())
    state.emplace("sigma0", singular_values(p.value.to(DType::F64)).to(DType::F32));
  float* m_in = state_tensor(state, "m_in", {n, n}).data<float>();
  float* v_in = state_tensor(state, "v_in", {n, n}).data<float>();
  float* m_out = state_tensor(state, "m_out", {m, m}).data<float>();
  float* v_out = state_tensor(state, "v_out", {m, m}).data<float>();

  Scratch& s = scratch_for(m, n);
  float* w = p.value.data<float>();
  const float* grad = p.grad.data<float>();
  float* a_in = s.a_in.data<float>();
  float* a_out = s.a_out.data<float>();
  float* pw = s.p.data<float>();
  float* wq = s.q.data<float>();

  // Generators through one GEMM each (G = X - X^T is formed inside the moment pass), then
  // moments and directions A_in, A_out in place.
  gemm<float>(Trans::T, Trans::N, n, n, m, 1.0f, w, n, grad, n, 0.0f, a_in, n);
  gemm<float>(Trans::N, Trans::T, m, m, n, 1.0f, grad, n, w, n, 0.0f, a_out, m);
  const pm::MomentCoefficients k{o.beta1, o.beta2, o.eps};
  pm::update_moments_and_direction(a_in, m_in, v_in, n, k);
  pm::update_moments_and_direction(a_out, m_out, v_out, m, k);

  // P = A_out W and Q = W A_in: their sum is the first-order change per unit s, whose
  // norm sets alpha; taylor2 reuses them.
  gemm<float>(Trans::N, Trans::N, m, n, m, 1.0f, a_out, m, w, n, 0.0f, pw, n);
  gemm<float>(Trans::N, Trans::N, m, n, n, 1.0f, w, n, a_in, n, 0.0f, wq, n);
  const double alpha = pm::step_scale(o.c, m, n, pm::norm_of_sum(pw, wq, m * n), o.eps);
  const auto step = static_cast<float>(lr * alpha);

  if (o.retraction == PionRetraction::Taylor2) {
    pm::apply_taylor2(w, m, n, a_out, a_in, pw, wq, step, pm::taylor2_left_first(m, n));
  } else {
    if (!s.f_in.defined()) {
      s.f_in = Tensor::empty({n, n});
      s.f_out = Tensor::empty({m, m});
    }
    float* f_in = s.f_in.data<float>();
    float* f_out = s.f_out.data<float>();
    pm::retraction_factor(o.retraction, a_in, n, step, f_in, s.work);
    pm::retraction_factor(o.retraction, a_out, m, step, f_out, s.work);
    pm::apply_factors(w, m, n, f_out, f_in, pw);
  }
  if (o.reanchor_every > 0 && steps_ % o.reanchor_every == 0) reanchor(p.value, state.at("sigma0"));
}

double relative_spectrum_drift(const Tensor& w, const Tensor& sigma0) {
  const Tensor sigma = singular_values(w.to(DType::F64));
  check(sigma.numel() == sigma0.numel(), "spectrum drift: " + std::to_string(sigma0.numel()) +
                                             " reference singular values for a matrix with " +
                                             std::to_string(sigma.numel()));
  const Tensor ref32 = sigma0.to(DType::F32);
  const double* now = sigma.data<double>();
  const float* ref = ref32.data<float>();
  double worst = 0.0, largest = 0.0;
  for (std::int64_t i = 0; i < sigma0.numel(); ++i) {
    worst = std::max(worst, std::abs(now[i] - static_cast<double>(ref[i])));
    largest = std::max(largest, static_cast<double>(ref[i]));
  }
  return largest > 0.0 ? worst / largest : worst;
}

const Param& Pion::find_param(const std::string& name) const {
  for (const auto& g : groups_)
    for (const auto& p : g.params)
      if (p.name == name) return p;
  throw Error("pion: no parameter named '" + name + "' in this optimizer");
}

double Pion::spectrum_drift(const std::string& param_name) const {
  const Param& p = find_param(param_name);
  const StateMap* st = state(param_name);
  if (st == nullptr || st->find("sigma0") == st->end()) return 0.0;
  return relative_spectrum_drift(p.value, st->at("sigma0"));
}

std::map<std::string, double> Pion::spectrum_drifts() const {
  std::map<std::string, double> out;
  for (const auto& g : groups_)
    for (const auto& p : g.params) out[p.name] = spectrum_drift(p.name);
  return out;
}

}  // namespace pion
