#pragma once
// Pion (Shi et al., "Pion: A Spectrum-Preserving Optimizer via Orthogonal Equivalence
// Transformation", arXiv:2605.12492): every weight matrix is multiplied on both sides by
// orthogonal matrices, W <- R W P, so it keeps the singular values it started with and
// training only turns its singular vectors. The update (see docs/PION.md and
// src/optim/pion_math.h for the formulas):
//   G_in = W^T g - g^T W, G_out = g W^T - W g^T (skew); Adam-style moments m, v of each;
//   A = -m / (sqrt(v) + eps); alpha = c sqrt(d_out d_in) / (||A_out W + W A_in||_F + eps);
//   W <- R(s A_out) W R(s A_in), s = lr * alpha.
// No bias correction: it would rescale A by a scalar that alpha cancels (up to eps).
// The first-order change has RMS lr * c whatever the gradient scale: c is a target RMS.
//
// Cost per d_out x d_in matrix and step: 7 GEMMs, 8 m n^2 + 6 m^2 n flops (m = d_out, n =
// d_in; the expansion is mirrored when m < n, costing 6 m n^2 + 8 m^2 n), plus a few
// memory-bound passes. Exact retractions build the d x d factors (more GEMMs or an LU).
//
// Variants (PionOptions in options.h; our reading of the paper, fixed by issue 11):
//   momentum lie (above, default) | ambient: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g*g on
//     the d_out x d_in gradient, D = m / (sqrt(v) + eps), A_in = -(W^T D - D^T W),
//     A_out = -(D W^T - W D^T) | transported: as ambient, and after W <- L W R also
//     m <- L m R with the same factors (v is not moved).
//   update_side both (default) | left (R = I, A_in = 0) | right (L = I, A_out = 0) |
//     alternate (left on the optimizer's odd applied steps, right on its even ones; the
//     count is steps(), which checkpoints keep, and every parameter of an optimizer steps
//     with it). alpha uses ||A_out W + W A_in||_F with the inactive A = 0. With lie momentum
//     only the rotating side's moments advance on a step.
//   normalizer adam (default) | msign (lie only): buf = b1 buf + (1-b1) G per side, no v;
//     A = -NS(buf), Muon's quintic Newton-Schulz (ns_steps iterations) on
//     buf / (||buf||_F + 1e-7); an odd polynomial of a skew matrix is skew.
//
// Only 2-D parameters are accepted: route embeddings, the LM head, norms and biases to
// AdamW (see hybrid.h). State per d_out x d_in matrix (state_slots_for): lie momentum keeps
// m_in, v_in (d_in x d_in) for the input side and m_out, v_out (d_out x d_out) for the output
// side, only for the sides it rotates (msign: m_in, m_out only); ambient and transported keep
// m, v (d_out x d_in, as AdamW). Every variant keeps sigma0, the singular values at the first
// step.
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "pion/optim/optimizer.h"
#include "pion/optim/options.h"

namespace pion {

// PionRetraction (taylor2, cayley, exp) and Pion's Options: pion/optim/options.h.
// Parses "taylor2", "cayley" or "exp"; throws pion::Error naming the choices otherwise.
PionRetraction parse_retraction(const std::string& name);

// max_i |sigma_i(w) - sigma0_i| / max_i sigma0_i, with w's singular values from an fp64 SVD:
// how far a matrix's spectrum has moved from sigma0 (the drift Pion reports).
double relative_spectrum_drift(const Tensor& w, const Tensor& sigma0);

class Pion : public Optimizer {
 public:
  using Options = PionOptions;  // its fields: pion/optim/options.h

  std::string kind() const override { return "pion"; }
  std::size_t add_param_group(std::vector<Param> params, double lr, const Options& options);
  const Options& options(std::size_t g) const { return options_.at(g); }

  nlohmann::json group_options(std::size_t g) const override;
  void set_group_options(std::size_t g, const nlohmann::json& options) override;
  // The state a parameter of shape `param` keeps under options `o`: the one statement of
  // Pion's state tensors.
  static std::vector<StateSlot> state_slots_for(const Shape& param, const Options& o);
  // state_slots_for with the options all groups share (the defaults while there is none);
  // throws pion::Error when groups keep different tensors (use param_state_slots then).
  std::vector<StateSlot> state_slots(const Shape& param) const override;
  std::vector<StateSlot> param_state_slots(const Param& p) const override;

  // max_i |sigma_i(W) - sigma0_i| / max_i sigma0_i for one parameter, computed now with an
  // fp64 SVD. 0 before the parameter's first step (W is still its own reference). Throws
  // pion::Error for a name this optimizer does not hold.
  double spectrum_drift(const std::string& param_name) const;
  // The same for every parameter, by name.
  std::map<std::string, double> spectrum_drifts() const;

 protected:
  void update_group(std::size_t g) override;

 private:
  // Per-shape work buffers (not optimizer state: never saved, rebuilt on demand).
  struct Scratch {
    Tensor a_in, a_out;       // X = W^T g / g W^T, overwritten in place by the directions
    Tensor p, q;              // A_out W and W A_in, then the retraction's intermediates
    Tensor f_in, f_out;       // exact retractions only: the d x d orthogonal factors
    Tensor e;                 // ambient momentum only: -D = -m / (sqrt(v) + eps)
    std::vector<float> work;  // exact retractions only: factor workspace
  };
  // Which sides rotate on one step.
  struct Sides {
    bool left;   // output side: L = R(s A_out)
    bool right;  // input side: R = R(s A_in)
  };
  Scratch& scratch_for(std::int64_t d_out, std::int64_t d_in);
  void update_matrix(Param& p, double lr, const Options& o);
  // Writes the directions of the active sides into s.a_out / s.a_in, advancing the moments.
  void compute_directions(Param& p, StateMap& state, const Options& o, Sides side, Scratch& s);
  const Param& find_param(const std::string& name) const;

  std::vector<Options> options_;
  std::map<std::pair<std::int64_t, std::int64_t>, Scratch> scratch_;
};

}  // namespace pion
