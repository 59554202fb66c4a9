#include "pion/model/init.h"

#include <cmath>

#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/optim/hybrid.h"

namespace pion {

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool is_norm(const std::string& name) {
  return name.find("norm") != std::string::npos;
}
bool is_output_projection(const std::string& name) {
  return ends_with(name, ".attn.wo") || ends_with(name, ".mlp.w_down");
}
bool is_block_matrix(const std::string& name) {
  return name.find(".attn.w") != std::string::npos || name.find(".mlp.w") != std::string::npos;
}
}  // namespace

Tensor orthogonal_matrix(std::int64_t rows, std::int64_t cols, double gain, Rng& rng) {
  check(rows > 0 && cols > 0, "orthogonal_matrix: shape must be positive");
  Tensor g = Tensor::empty({rows, cols}, DType::F64);
  fill_normal(g, rng);
  // The polar factor U V^T of a Gaussian matrix has all singular values 1.
  Svd d = svd(g);
  Tensor q = matmul(d.u, d.vt);
  for (double& x : q.span<double>()) x *= gain;
  return q;
}

void init_parameters(const std::vector<Param>& params, const ModelConfig& config, Rng& rng) {
  config.validate();
  const bool spectral = config.init == "spectral";
  for (const auto& p : params) {
    Tensor value = p.value;
    if (is_norm(p.name)) {
      value.fill(1.0);
    } else if (spectral && is_block_matrix(p.name)) {
      check(value.ndim() == 2, "init: " + p.name + " is not a matrix");
      const double gain =
          std::sqrt(static_cast<double>(value.rows()) / static_cast<double>(value.cols()));
      value.copy_from(orthogonal_matrix(value.rows(), value.cols(), gain, rng).to(value.dtype()));
    } else {
      double std = config.init_std;
      if (is_output_projection(p.name)) std /= std::sqrt(2.0 * config.n_layer);
      fill_normal(value, rng, 0.0, std);
    }
  }
}

std::vector<MatrixSpectrum> hidden_spectra(const std::vector<Param>& params) {
  std::vector<MatrixSpectrum> out;
  for (const auto& p : params) {
    if (!is_hidden_matrix(p)) continue;
    MatrixSpectrum s;
    s.name = p.name;
    s.rows = p.value.rows();
    s.cols = p.value.cols();
    Tensor sv = singular_values(p.value.to(DType::F64));
    s.sigma.assign(sv.span<double>().begin(), sv.span<double>().end());
    s.sigma_max = s.sigma.front();
    s.sigma_min = s.sigma.back();
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace pion
