#pragma once
// Weight initialisation and spectrum reporting. Pion keeps every hidden matrix's singular
// values fixed at their initial values, so the init chooses the spectrum a Pion run trains with.
//
// "normal":   every matrix N(0, init_std); the output projections (attn.wo, mlp.w_down) use
//             init_std / sqrt(2 n_layer) (GPT-2 style, so the residual stream does not grow
//             with depth); RMSNorm weights 1.
// "spectral": hidden matrices (attn.wq/wk/wv/wo, mlp.w_gate/w_up/w_down) are (semi-)orthogonal
//             with every singular value sqrt(d_out / d_in) (the polar factor U V^T of a Gaussian
//             matrix, scaled); embedding and lm_head N(0, init_std); RMSNorm weights 1.
// Parameters are drawn in layout order, so a seed gives the same weights for float and double.
#include <cstdint>
#include <string>
#include <vector>

#include "pion/core/random.h"
#include "pion/core/tensor.h"
#include "pion/model/config.h"
#include "pion/optim/optimizer.h"

namespace pion {

// Fills the named parameters (values only; F32 or F64) as config.init says.
void init_parameters(const std::vector<Param>& params, const ModelConfig& config, Rng& rng);

// An F64 rows x cols matrix with min(rows, cols) singular values all equal to `gain`, drawn
// from a Gaussian (Haar-distributed singular vectors).
Tensor orthogonal_matrix(std::int64_t rows, std::int64_t cols, double gain, Rng& rng);

// The singular values of one hidden matrix.
struct MatrixSpectrum {
  std::string name;
  std::int64_t rows = 0, cols = 0;
  double sigma_min = 0.0, sigma_max = 0.0;
  std::vector<double> sigma;  // descending
};
// Spectra of the hidden matrices (is_hidden_matrix from optim/hybrid.h: what Muon/Pion train),
// computed in double precision.
std::vector<MatrixSpectrum> hidden_spectra(const std::vector<Param>& params);

}  // namespace pion
