#include "pion/optim/pion.h"

#include <algorithm>
#include <cmath>

#include "optim/pion_math.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/optim/muon.h"
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
  // Checkpoints written before the variants existed lack their keys; those runs were the
  // defaults (every other key must still be present).
  nlohmann::json filled = j;
  if (filled.is_object()) {
    const nlohmann::json defaults = options_to_json(Options{});
    for (const char* key : {"momentum", "update_side", "normalizer", "ns_steps"})
      if (!filled.contains(key)) filled[key] = defaults.at(key);
  }
  Options o = options_from_group_json<Options>(filled, "pion");
  validate_options(o, "pion");
  options_.at(g) = o;
}

std::vector<StateSlot> Pion::state_slots_for(const Shape& param, const Options& o) {
  check(param.size() == 2, "pion: state of a " + shape_string(param) + " parameter: 2-D only");
  const std::int64_t m = param[0], n = param[1];
  std::vector<StateSlot> slots;
  if (o.momentum == PionMomentum::Lie) {
    // One-sided runs never touch the other side's generator, so they do not keep its moments.
    const bool adam = o.normalizer == PionNormalizer::Adam;
    if (o.update_side != PionUpdateSide::Left) {
      slots.push_back({"m_in", {n, n}, false});
      if (adam) slots.push_back({"v_in", {n, n}, true});
    }
    if (o.update_side != PionUpdateSide::Right) {
      slots.push_back({"m_out", {m, m}, false});
      if (adam) slots.push_back({"v_out", {m, m}, true});
    }
  } else {
    slots.push_back({"m", {m, n}, false});
    slots.push_back({"v", {m, n}, true});
  }
  slots.push_back({"sigma0", {std::min(m, n)}, true});
  return slots;
}

std::vector<StateSlot> Pion::state_slots(const Shape& param) const {
  std::vector<StateSlot> slots = state_slots_for(param, options_.empty() ? Options{} : options_[0]);
  for (const Options& o : options_) {
    const std::vector<StateSlot> other = state_slots_for(param, o);
    const bool same = std::equal(slots.begin(), slots.end(), other.begin(), other.end(),
                                 [](const StateSlot& a, const StateSlot& b) { return a.key == b.key; });
    check(same, "pion: param groups with different momentum / update_side / normalizer keep "
                "different state; ask for a parameter's state slots (param_state_slots)");
  }
  return slots;
}

std::vector<StateSlot> Pion::param_state_slots(const Param& p) const {
  for (std::size_t g = 0; g < groups_.size(); ++g)
    for (const Param& q : groups_[g].params)
      if (q.name == p.name) return state_slots_for(p.value.shape(), options_[g]);
  return state_slots(p.value.shape());
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

namespace {

// The rotation of one step, applied to W and (transported momentum) to m.
struct StepRotation {
  bool left, right;
  PionRetraction retraction;
  float s;                      // lr * alpha
  const float* a_out;           // the directions of the active sides
  const float* a_in;
  const float* f_out = nullptr;  // exact retractions: the factors of the active sides
  const float* f_in = nullptr;
};

// x <- L x R for a d_out x d_in matrix x. taylor2 reads p = A_out x and q = x A_in (the
// active sides'), which the caller computed; p and q are overwritten either way.
void rotate(float* x, std::int64_t m, std::int64_t n, const StepRotation& r, float* p, float* q) {
  namespace pm = pion_math;
  if (r.retraction == PionRetraction::Taylor2) {
    if (r.left && r.right) {
      pm::apply_taylor2(x, m, n, r.a_out, r.a_in, p, q, r.s, pm::taylor2_left_first(m, n));
    } else if (r.left) {
      pm::apply_taylor2_left(x, m, n, r.a_out, p, r.s);
    } else {
      pm::apply_taylor2_right(x, m, n, r.a_in, q, r.s);
    }
  } else if (r.left && r.right) {
    pm::apply_factors(x, m, n, r.f_out, r.f_in, p);
  } else if (r.left) {
    pm::apply_left_factor(x, m, n, r.f_out, p);
  } else {
    pm::apply_right_factor(x, m, n, r.f_in, p);
  }
}

// A_out x into p and x A_in into q, for the active sides.
void first_order_products(const float* x, std::int64_t m, std::int64_t n, const StepRotation& r,
                          float* p, float* q) {
  if (r.left) gemm<float>(Trans::N, Trans::N, m, n, m, 1.0f, r.a_out, m, x, n, 0.0f, p, n);
  if (r.right) gemm<float>(Trans::N, Trans::N, m, n, n, 1.0f, x, n, r.a_in, n, 0.0f, q, n);
}

// Muon's Newton-Schulz eps on buf / (||buf||_F + eps): fixed, as in the Muon reference.
constexpr double kMsignEps = 1e-7;

}  // namespace

void Pion::compute_directions(Param& p, StateMap& state, const Options& o, Sides side,
                              Scratch& s) {
  namespace pm = pion_math;
  const std::int64_t m = p.value.rows(), n = p.value.cols();
  const float* w = p.value.data<float>();
  const float* grad = p.grad.data<float>();
  float* a_in = s.a_in.data<float>();
  float* a_out = s.a_out.data<float>();
  const pm::MomentCoefficients k{o.beta1, o.beta2, o.eps};

  if (o.momentum != PionMomentum::Lie) {
    // Ambient moments advance every step whichever side rotates; the direction -D then
    // takes the generator's place: A_in = W^T E - E^T W, A_out = E W^T - W E^T with E = -D.
    if (!s.e.defined()) s.e = Tensor::empty({m, n});
    float* e = s.e.data<float>();
    pm::update_ambient_moments(grad, state.at("m").data<float>(), state.at("v").data<float>(), e,
                               m * n, k);
    if (side.right) {
      gemm<float>(Trans::T, Trans::N, n, n, m, 1.0f, w, n, e, n, 0.0f, a_in, n);
      pm::skew_in_place(a_in, n);
    }
    if (side.left) {
      gemm<float>(Trans::N, Trans::T, m, m, n, 1.0f, e, n, w, n, 0.0f, a_out, m);
      pm::skew_in_place(a_out, m);
    }
    return;
  }
  // Lie momentum: X = W^T g and g W^T through one GEMM each (G = X - X^T is formed inside the
  // moment pass), then only the rotating sides' moments and directions, in place.
  if (side.right) gemm<float>(Trans::T, Trans::N, n, n, m, 1.0f, w, n, grad, n, 0.0f, a_in, n);
  if (side.left) gemm<float>(Trans::N, Trans::T, m, m, n, 1.0f, grad, n, w, n, 0.0f, a_out, m);
  const auto one_side = [&](float* x, std::int64_t d, const char* m_key, const char* v_key) {
    if (o.normalizer == PionNormalizer::Adam) {
      pm::update_moments_and_direction(x, state.at(m_key).data<float>(),
                                       state.at(v_key).data<float>(), d, k);
      return;
    }
    Tensor& buf = state.at(m_key);
    pm::update_skew_buffer(x, buf.data<float>(), d, o.beta1);
    const Tensor ns = newton_schulz5(buf, o.ns_steps, kMsignEps);
    pm::negated_skew_part(ns.data<float>(), d, x);
  };
  if (side.right) one_side(a_in, n, "m_in", "v_in");
  if (side.left) one_side(a_out, m, "m_out", "v_out");
}

void Pion::update_matrix(Param& p, double lr, const Options& o) {
  namespace pm = pion_math;
  const std::int64_t m = p.value.rows(), n = p.value.cols();
  StateMap& state = state_for(p);
  // The spectrum this matrix keeps: taken (in fp64) before its first update.
  if (state.find("sigma0") == state.end())
    state.emplace("sigma0", singular_values(p.value.to(DType::F64)).to(DType::F32));
  // Every moment tensor exists from the first step on, also the side an alternating run
  // rotates only from its second step: a checkpoint then always holds the full state.
  for (const StateSlot& slot : state_slots_for(p.value.shape(), o))
    if (slot.key != "sigma0") state_tensor(state, slot.key, slot.shape);

  // Alternate: left on odd applied steps (steps_ is 1 on the first), right on even ones.
  const bool odd = steps_ % 2 == 1;
  const Sides side{o.update_side == PionUpdateSide::Both || o.update_side == PionUpdateSide::Left ||
                       (o.update_side == PionUpdateSide::Alternate && odd),
                   o.update_side == PionUpdateSide::Both ||
                       o.update_side == PionUpdateSide::Right ||
                       (o.update_side == PionUpdateSide::Alternate && !odd)};

  Scratch& s = scratch_for(m, n);
  compute_directions(p, state, o, side, s);
  float* w = p.value.data<float>();
  float* pw = s.p.data<float>();
  float* wq = s.q.data<float>();
  StepRotation r{side.left, side.right, o.retraction, 0.0f, s.a_out.data<float>(),
                 s.a_in.data<float>()};

  // P = A_out W and Q = W A_in: their sum is the first-order change per unit s, whose
  // norm sets alpha; taylor2 reuses them.
  first_order_products(w, m, n, r, pw, wq);
  const double first_order = side.left && side.right ? pm::norm_of_sum(pw, wq, m * n)
                             : side.left             ? pm::frobenius_norm(pw, m * n)
                                                     : pm::frobenius_norm(wq, m * n);
  r.s = static_cast<float>(lr * pm::step_scale(o.c, m, n, first_order, o.eps));

  if (o.retraction != PionRetraction::Taylor2) {
    if (!s.f_in.defined()) {
      s.f_in = Tensor::empty({n, n});
      s.f_out = Tensor::empty({m, m});
    }
    if (side.right) {
      pm::retraction_factor(o.retraction, r.a_in, n, r.s, s.f_in.data<float>(), s.work);
      r.f_in = s.f_in.data<float>();
    }
    if (side.left) {
      pm::retraction_factor(o.retraction, r.a_out, m, r.s, s.f_out.data<float>(), s.work);
      r.f_out = s.f_out.data<float>();
    }
  }
  rotate(w, m, n, r, pw, wq);
  if (o.momentum == PionMomentum::Transported) {
    // Parallel transport: the first moment turns with the weights (v, a per-entry scale, not).
    float* mom = state.at("m").data<float>();
    if (o.retraction == PionRetraction::Taylor2) first_order_products(mom, m, n, r, pw, wq);
    rotate(mom, m, n, r, pw, wq);
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
