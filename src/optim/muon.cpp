#include "pion/optim/muon.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/optim/options_json.h"
#include "pion/optim/state_util.h"

namespace pion {

namespace {

// The reference's quintic coefficients: chosen to push every singular value in (0, 1] into
// roughly [0.7, 1.2] in five steps rather than to converge to exactly 1.
constexpr float kNsA = 3.4445f;
constexpr float kNsB = -4.7750f;
constexpr float kNsC = 2.0315f;

// torch.lerp's formula (start + w (end - start) for w < 0.5, else end - (end - start)(1 - w)),
// so rounding follows the PyTorch reference as closely as fp32 allows. The caller passes
// 1 - w computed in double: 1.0f - float(0.95) is off by 2.4e-7 relative.
inline float lerp(float start, float end, float w, float one_minus_w) {
  const float diff = end - start;
  return w < 0.5f ? start + w * diff : end - diff * one_minus_w;
}

struct NsBuffers {
  float* x;       // rows x cols: the input on entry, the result on exit
  float* x_next;  // rows x cols
  float* gram;    // r x r, r = min(rows, cols)
  float* poly;    // r x r
};

// Newton-Schulz on the row-major rows x cols matrix in buf.x, in place. The reference
// transposes a tall matrix so the Gram matrix is the small side; here the transpose is folded
// into the GEMM flags instead of copied: for tall X, with Y = X^T,
//   A = Y Y^T = X^T X,   Y' = a Y + B Y  <=>  X' = a X + X B^T.
void newton_schulz_inplace(NsBuffers buf, std::int64_t rows, std::int64_t cols, int steps,
                           double eps) {
  const std::int64_t n = rows * cols;
  // These elementwise passes stay serial on purpose: an OpenMP team between OpenBLAS-threaded
  // GEMMs leaves libgomp threads spin-waiting on the cores OpenBLAS needs, which made the
  // whole Muon step 3x slower with 2 threads (9.6K -> 3.1K tok/s on the baby config).
  double sum_sq = 0.0;
  for (std::int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(buf.x[i]) * buf.x[i];
  const float inv_norm = static_cast<float>(1.0 / (std::sqrt(sum_sq) + eps));
  for (std::int64_t i = 0; i < n; ++i) buf.x[i] *= inv_norm;

  const bool tall = rows > cols;
  const std::int64_t r = tall ? cols : rows;
  for (int step = 0; step < steps; ++step) {
    if (tall) {
      gemm<float>(Trans::T, Trans::N, r, r, rows, 1.0f, buf.x, cols, buf.x, cols, 0.0f, buf.gram,
                  r);
    } else {
      gemm<float>(Trans::N, Trans::T, r, r, cols, 1.0f, buf.x, cols, buf.x, cols, 0.0f, buf.gram,
                  r);
    }
    // B = b A + c A A
    std::memcpy(buf.poly, buf.gram, static_cast<std::size_t>(r * r) * sizeof(float));
    gemm<float>(Trans::N, Trans::N, r, r, r, kNsC, buf.gram, r, buf.gram, r, kNsB, buf.poly, r);
    // X' = a X + B X (wide) or a X + X B^T (tall)
    std::memcpy(buf.x_next, buf.x, static_cast<std::size_t>(n) * sizeof(float));
    if (tall) {
      gemm<float>(Trans::N, Trans::T, rows, cols, cols, 1.0f, buf.x, cols, buf.poly, r, kNsA,
                  buf.x_next, cols);
    } else {
      gemm<float>(Trans::N, Trans::N, rows, cols, rows, 1.0f, buf.poly, r, buf.x, cols, kNsA,
                  buf.x_next, cols);
    }
    std::swap(buf.x, buf.x_next);
  }
  // After an odd number of swaps the result sits in the caller's x_next: copy it back to x.
  if (steps % 2 == 1) std::memcpy(buf.x_next, buf.x, static_cast<std::size_t>(n) * sizeof(float));
}

}  // namespace

Tensor newton_schulz5(const Tensor& g, int steps, double eps) {
  check(g.ndim() == 2 && g.dtype() == DType::F32,
        "newton_schulz5: need a 2-D fp32 matrix, got " + shape_string(g.shape()));
  check(steps >= 0, "newton_schulz5: steps must be >= 0");
  const std::int64_t rows = g.rows(), cols = g.cols(), r = std::min(rows, cols);
  Tensor out = g.clone();
  std::vector<float> x_next(static_cast<std::size_t>(rows * cols));
  std::vector<float> gram(static_cast<std::size_t>(r * r)), poly(gram.size());
  newton_schulz_inplace({out.data<float>(), x_next.data(), gram.data(), poly.data()}, rows, cols,
                        steps, eps);
  return out;
}

std::size_t Muon::add_param_group(std::vector<Param> params, double lr, const Options& options) {
  validate_options(options, "muon");
  for (const auto& p : params)
    check(p.value.ndim() == 2, "muon: parameter '" + p.name + "' has shape " +
                                   shape_string(p.value.shape()) +
                                   "; Muon only updates 2-D matrices, route it to AdamW");
  std::size_t g = add_group(std::move(params), lr);
  options_.push_back(options);
  return g;
}

nlohmann::json Muon::group_options(std::size_t g) const {
  return options_to_json(options_.at(g));
}

void Muon::set_group_options(std::size_t g, const nlohmann::json& j) {
  options_.at(g) = options_from_group_json<Options>(j, "muon");
}

std::vector<StateSlot> Muon::state_slots(const Shape& param) const {
  return {{"momentum_buffer", param, false}};
}

void Muon::update_group(std::size_t g) {
  ParamGroup& group = groups_[g];
  const Options& o = options_[g];
  const float beta = static_cast<float>(o.momentum);
  const float one_minus_beta = static_cast<float>(1.0 - o.momentum);
  // W -= (lr wd) W + lr s U, not W * float(1 - lr wd): the rounded factor would carry an
  // error of up to 3e-8 |W| into every step.
  const float decay_rate = static_cast<float>(group.lr * o.weight_decay);
  for (Param& p : group.params) {
    const std::int64_t rows = p.value.rows(), cols = p.value.cols();
    const std::int64_t n = rows * cols, r = std::min(rows, cols);
    auto grow = [](std::vector<float>& v, std::int64_t size) {
      if (static_cast<std::int64_t>(v.size()) < size) v.resize(static_cast<std::size_t>(size));
    };
    grow(scratch_.x, n);
    grow(scratch_.x_next, n);
    grow(scratch_.gram, r * r);
    grow(scratch_.poly, r * r);

    float* buf = state_tensor(state_for(p), "momentum_buffer", p.value.shape()).data<float>();
    const float* grad = p.grad.data<float>();
    float* x = scratch_.x.data();
    const bool nesterov = o.nesterov;
    for (std::int64_t i = 0; i < n; ++i) {
      buf[i] = lerp(buf[i], grad[i], one_minus_beta, beta);
      x[i] = nesterov ? lerp(grad[i], buf[i], beta, one_minus_beta) : buf[i];
    }
    newton_schulz_inplace({x, scratch_.x_next.data(), scratch_.gram.data(), scratch_.poly.data()},
                          rows, cols, o.ns_steps, o.eps);

    // Tall matrices get a larger step so the update RMS does not shrink with aspect ratio.
    const double shape_scale =
        std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
    const float step = static_cast<float>(group.lr * shape_scale);
    float* w = p.value.data<float>();
    for (std::int64_t i = 0; i < n; ++i) w[i] -= decay_rate * w[i] + step * x[i];
  }
}

}  // namespace pion
