#pragma once
// Muon as in the single-device reference implementation (github KellerJordan/Muon), in fp32
// on CPU. For each 2-D parameter W (rows x cols) with gradient g and momentum buffer buf:
//   buf <- buf + (1 - beta) (g - buf)                  (buf.lerp_(g, 1 - beta))
//   U   <- g + beta (buf - g) if nesterov, else buf    (g.lerp(buf, beta))
//   X   <- U / (||U||_F + eps), transposed when rows > cols so that X is wide
//   ns_steps times: A = X X^T; B = b A + c A A; X = a X + B X, (a, b, c) = (3.4445,
//   -4.7750, 2.0315) W   <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) X (transposed back)
// Muon is meant for hidden matrices only; route embeddings, the LM head, norms and biases
// to AdamW (see hybrid.h). The gradient is never modified.
#include <vector>

#include "pion/optim/optimizer.h"
#include "pion/optim/options.h"

namespace pion {

class Muon : public Optimizer {
 public:
  using Options = MuonOptions;  // its fields: pion/optim/options.h

  std::string kind() const override { return "muon"; }
  // Every parameter must be 2-D (throws pion::Error naming the first that is not).
  std::size_t add_param_group(std::vector<Param> params, double lr, const Options& options);
  const Options& options(std::size_t g) const { return options_.at(g); }

  nlohmann::json group_options(std::size_t g) const override;
  void set_group_options(std::size_t g, const nlohmann::json& options) override;
  std::vector<StateSlot> state_slots(const Shape& param) const override;

 protected:
  void update_group(std::size_t g) override;

 private:
  std::vector<Options> options_;
  // Work buffers reused across parameters and steps (grown to the largest matrix seen), so
  // a step allocates nothing once warm. Not optimizer state: never saved.
  struct Scratch {
    std::vector<float> x, x_next, gram, poly;
  };
  Scratch scratch_;
};

// The quintic Newton-Schulz iteration Muon uses, on its own (for tests and tools): returns
// an approximately semi-orthogonal matrix with the shape of the 2-D fp32 tensor `g`
// (singular values near 1, not exactly 1: the coefficients trade accuracy for speed).
Tensor newton_schulz5(const Tensor& g, int steps = 5, double eps = 1e-7);

}  // namespace pion
