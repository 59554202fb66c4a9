#pragma once
// The Pion update (docs/PION.md) as small pure functions on raw row-major
// buffers. The CPU optimizer (src/optim/pion.cpp) is a thin loop over these, and a device
// path should follow the same definitions, so there is one statement of the algorithm:
//
//   X_in  = W^T g      G_in  = X_in  - X_in^T     (d_in x d_in, skew)
//   X_out = g W^T      G_out = X_out - X_out^T    (d_out x d_out, skew)
//   m = b1 m + (1 - b1) G;  v = b2 v + (1 - b2) G*G;  A = -m / (sqrt(v) + eps)
//   alpha = c sqrt(d_out d_in) / (||A_out W + W A_in||_F + eps),  s = lr * alpha
//   W <- R(s A_out) W R(s A_in),  R = E2 (taylor2), Cayley or exp.
//
// Every function is templated on float and double (instantiated in pion_math.cpp) so tests
// can run the same code in fp64.
#include <cstdint>
#include <string>
#include <vector>

#include "pion/optim/pion.h"

namespace pion::pion_math {

// The retraction enum and its names live in the public header (Pion::Options uses them).
using Retraction = PionRetraction;

struct MomentCoefficients {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

// G = X - X^T for a d x d matrix X (the generator from its one-GEMM product). Exactly skew:
// IEEE subtraction is antisymmetric.
template <class T>
void skew_from_product(const T* x, std::int64_t d, T* g);
// The same in place: X <- X - X^T.
template <class T>
void skew_in_place(T* x, std::int64_t d);
// G_in = W^T g - g^T W (d_in x d_in) and G_out = g W^T - W g^T (d_out x d_out) for W and
// g of shape d_out x d_in, one GEMM each.
template <class T>
void input_generator(const T* w, const T* grad, std::int64_t d_out, std::int64_t d_in, T* g_in);
template <class T>
void output_generator(const T* w, const T* grad, std::int64_t d_out, std::int64_t d_in, T* g_out);

// The fused moment pass, in place. On entry x holds the d x d product X (W^T g or g W^T);
// on return it holds the direction A = -m / (sqrt(v) + eps), where m and v were updated
// with G = X - X^T. Works on tile pairs so X can be overwritten in place; computes the
// upper triangle and mirrors it, so m and A come out exactly skew and v exactly symmetric.
// For Pion's own state (exactly skew m, symmetric v from the first step on) that equals
// the elementwise formula on every element.
template <class T>
void update_moments_and_direction(T* x, T* m, T* v, std::int64_t d, const MomentCoefficients& k);

// The msign normalizer's buffer, in place: buf <- b buf + (1 - b) G with G = X - X^T for the
// d x d product X on entry (x is not modified). A skew buf stays exactly skew: the two
// mirrored elements see negated operands, and IEEE rounding is symmetric.
template <class T>
void update_skew_buffer(const T* x, T* buf, std::int64_t d, double beta);
// A = -(N - N^T) / 2 for the d x d Newton-Schulz result N of a skew buffer: N is skew up to
// rounding (an odd polynomial of a skew matrix), and taking its skew part keeps the direction
// an exact generator, so the Cayley and exp factors stay orthogonal to roundoff.
template <class T>
void negated_skew_part(const T* n, std::int64_t d, T* a);

// Ambient moments, elementwise over `count` values: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
// and e = -m / (sqrt(v) + eps) = -D. The directions are then A_out = E W^T - W E^T and
// A_in = W^T E - E^T W, i.e. skew_from_product of g W^T and W^T g with g replaced by E.
template <class T>
void update_ambient_moments(const T* g, T* m, T* v, T* e, std::int64_t count,
                            const MomentCoefficients& k);

// ||P + Q||_F accumulated in double (P = A_out W, Q = W A_in: the first-order change per
// unit step).
template <class T>
double norm_of_sum(const T* p, const T* q, std::int64_t count);
// ||P||_F accumulated in double (the first-order change of a one-sided step).
template <class T>
double frobenius_norm(const T* p, std::int64_t count);
// alpha = c sqrt(d_out d_in) / (first_order_norm + eps).
double step_scale(double c, std::int64_t d_out, std::int64_t d_in, double first_order_norm,
                  double eps);

// True when W <- E2(A_out) W E2(A_in) is cheaper applied left side first: the first side
// reuses its product with W (one GEMM), the second side needs two. Left first costs
// 8 m n^2 + 6 m^2 n flops in all (with the generators and alpha), right first
// 6 m n^2 + 8 m^2 n, so the left goes first when d_out >= d_in.
bool taylor2_left_first(std::int64_t d_out, std::int64_t d_in);

// W <- E2(s A_out) W E2(s A_in) without forming either factor, in three GEMMs, given
// p = A_out W and q = W A_in (both d_out x d_in, already computed for alpha). p and q are
// overwritten (they are the only scratch used). Left first:
//   LW = W + s P + (s^2/2) A_out P;  R = LW A_in;  W = LW + s R + (s^2/2) R A_in
// and the mirror image when right first.
template <class T>
void apply_taylor2(T* w, std::int64_t d_out, std::int64_t d_in, const T* a_out, const T* a_in, T* p,
                   T* q, T s, bool left_first);

// One-sided E2 steps without forming the factor, given p = A_out W (left) or q = W A_in
// (right), which are left unchanged:
//   left:  W <- W + s P + (s^2/2) A_out P         right: W <- W + s Q + (s^2/2) Q A_in
template <class T>
void apply_taylor2_left(T* w, std::int64_t d_out, std::int64_t d_in, const T* a_out, const T* p,
                        T s);
template <class T>
void apply_taylor2_right(T* w, std::int64_t d_out, std::int64_t d_in, const T* a_in, const T* q,
                         T s);

// The d x d factor R(sA) of a retraction for a skew d x d A, written to out. `work` is
// scratch that is resized as needed (keep it between calls to avoid reallocating).
template <class T>
void retraction_factor(Retraction r, const T* a, std::int64_t d, T s, T* out, std::vector<T>& work);
// W <- F_out W F_in for factors F_out (d_out x d_out) and F_in (d_in x d_in); tmp holds
// d_out x d_in values.
template <class T>
void apply_factors(T* w, std::int64_t d_out, std::int64_t d_in, const T* f_out, const T* f_in,
                   T* tmp);
// One-sided: W <- F_out W, or W <- W F_in; tmp holds d_out x d_in values.
template <class T>
void apply_left_factor(T* w, std::int64_t d_out, std::int64_t d_in, const T* f_out, T* tmp);
template <class T>
void apply_right_factor(T* w, std::int64_t d_out, std::int64_t d_in, const T* f_in, T* tmp);

}  // namespace pion::pion_math
