#pragma once
// The kernels of Pion's variants on the GPU (issue 11; definitions in src/optim/pion_math.h),
// batched over the matrices of one shape like the rest of cuda/optim/pion_cuda.cu, which
// queues them. Each reads the step's StepScalars: when the gradients are not finite, state
// stays and the direction it writes is 0. `parity` (0 or 1; -1 = always) marks a side that
// rotates only on applied steps of that parity (update_side alternate): on the others its
// direction is 0 too, which turns the two-sided taylor2 retraction into the one-sided one
// exactly (E2(0) = I and ||P + 0|| = ||P||).
#include <cstdint>

#include "batched.cuh"
#include "common.cuh"

namespace pion::cuda::detail {

struct AdamCoefficients {
  float b1, c1, b2, c2, eps;  // c = 1 - b, computed in double and rounded (as on the CPU)
};

// Ambient momentum, elementwise over count values of each matrix: m <- b1 m + c1 g,
// v <- b2 v + c2 g g, e <- -m / (sqrt(v) + eps) (pion_math::update_ambient_moments, same
// rounding), g read times the step's grad_scale. Skipped step: e <- 0, m and v stay.
void queue_ambient_moments(cudaStream_t st, const DevicePointers& g, const DevicePointers& m,
                           const DevicePointers& v, const DevicePointers& e, std::int64_t count,
                           std::size_t batch, const AdamCoefficients& k,
                           const StepScalars* scalars);

// X <- X - X^T for each d x d X (pion_math::skew_in_place), or X <- 0 when skipped or idle.
void queue_skew_in_place(cudaStream_t st, const DevicePointers& x, std::int64_t d,
                         std::size_t batch, const StepScalars* scalars, int parity);

// The msign buffer: buf <- b buf + c (X - X^T) (pion_math::update_skew_buffer); unchanged when
// skipped or idle.
void queue_skew_buffer(cudaStream_t st, const DevicePointers& x, const DevicePointers& buf,
                       std::int64_t d, std::size_t batch, float b, float c,
                       const StepScalars* scalars, int parity);

// A <- -(N - N^T) / 2 (pion_math::negated_skew_part), or A <- 0 when skipped or idle.
void queue_negated_skew_part(cudaStream_t st, const DevicePointers& n, const DevicePointers& a,
                             std::int64_t d, std::size_t batch, const StepScalars* scalars,
                             int parity);

// Muon's fp32 quintic Newton-Schulz (muon.cpp's newton_schulz_inplace, square case) of each
// d x d buf: x0 <- buf / (||buf||_F + eps), then `steps` times A = X X^T, B = b A + c A A,
// X <- a X + B X. The result is left in x[0] or x[1]; returns which. partial (batch x
// kBlocksPerMatrix doubles), inv (batch floats), gram and poly (d x d each) are scratch.
int queue_newton_schulz_square(cudaStream_t st, cublasHandle_t h, const GemmTypes& types,
                               const DevicePointers& buf, const DevicePointers (&x)[2],
                               const DevicePointers& gram, const DevicePointers& poly,
                               std::int64_t d, std::size_t batch, int steps, double eps,
                               double* partial, float* inv);

}  // namespace pion::cuda::detail
