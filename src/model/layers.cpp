#include "pion/model/layers.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "pion/core/error.h"
#include "pion/core/linalg.h"

namespace pion::layers {

namespace {
// Loops with less work than this run serially. The GEMMs already use OpenBLAS's own thread
// pool; an OpenMP region next to them leaves its threads spinning (libgomp's default wait
// policy) while OpenBLAS's threads need the same cores. On a 2-core machine that made a
// training step of the 4-layer d=128 model ~2x slower than running these loops serially,
// so only loops large enough to amortise that (big models) go parallel.
constexpr i64 kMinParallelWork = i64{1} << 24;
bool worth_parallel(i64 work) {
  return work >= kMinParallelWork;
}

// Inlined into the loops (a call would stop them vectorising); fast_exp() is its public face.
// Cephes-style: x = k ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, 2^k by building
// the exponent bits. The range checks are integer masks on the bit pattern, not float compares
// and selects: under GCC's default -ftrapping-math those would keep the loops scalar.
[[gnu::always_inline]] inline float fast_exp_inline(float x) {
  const std::uint32_t bits = __builtin_bit_cast(std::uint32_t, x);
  const std::uint32_t mag = bits & 0x7fffffffu;
  const std::uint32_t not_nan = mag <= 0x7f800000u;
  const std::uint32_t neg = bits >> 31;
  const std::uint32_t below = neg & (mag > 0x42ae0000u) & not_nan;         // x < -87
  const std::uint32_t above = (neg ^ 1u) & (mag > 0x42b00000u) & not_nan;  // x > 88
  const std::uint32_t mb = 0u - below, ma = 0u - above;                    // all-ones masks
  // Clamp to [-87, 88] (NaN passes through and makes the result NaN).
  const float xc =
      __builtin_bit_cast(float, (bits & ~(mb | ma)) | (0xc2ae0000u & mb) | (0x42b00000u & ma));
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kf = xc * 1.44269504088896341f + magic;
  const float k = kf - magic;
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t ki =
      __builtin_bit_cast(std::int32_t, kf) - __builtin_bit_cast(std::int32_t, magic);
  const float scale = __builtin_bit_cast(float, (ki + 127) << 23);  // 2^k, k in [-126, 127]
  return __builtin_bit_cast(float, __builtin_bit_cast(std::uint32_t, p * scale) & ~mb);
}

// exp for the float path: std::exp for double keeps the fp64 reference exact.
template <class T>
[[gnu::always_inline]] inline T exp_t(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return fast_exp_inline(x);
  } else {
    return std::exp(x);
  }
}
}  // namespace

float fast_exp(float x) {
  return fast_exp_inline(x);
}

// ---- embedding ---------------------------------------------------------------------------------

template <class T>
void embedding_forward(T* out, const std::int32_t* tokens, const T* table, i64 n, i64 c) {
#pragma omp parallel for schedule(static) if (worth_parallel(n * c))
  for (i64 i = 0; i < n; ++i) std::copy_n(table + tokens[i] * c, c, out + i * c);
}

template <class T>
void embedding_backward(T* dtable, const T* dout, const std::int32_t* tokens, i64 n, i64 c) {
  // Serial: rows with the same token would race, and this is n * c adds.
  for (i64 i = 0; i < n; ++i) {
    T* row = dtable + tokens[i] * c;
    const T* g = dout + i * c;
    for (i64 j = 0; j < c; ++j) row[j] += g[j];
  }
}

// ---- RMSNorm -----------------------------------------------------------------------------------

template <class T>
void rmsnorm_forward(T* out, T* rstd, const T* x, const T* weight, i64 n, i64 c, double eps) {
#pragma omp parallel for schedule(static) if (worth_parallel(3 * n * c))
  for (i64 i = 0; i < n; ++i) {
    const T* xi = x + i * c;
    T ss = 0;
    for (i64 j = 0; j < c; ++j) ss += xi[j] * xi[j];
    const T r = T(1) / std::sqrt(ss / static_cast<T>(c) + static_cast<T>(eps));
    rstd[i] = r;
    T* oi = out + i * c;
    for (i64 j = 0; j < c; ++j) oi[j] = weight[j] * (xi[j] * r);
  }
}

template <class T>
void rmsnorm_backward(T* dx, T* dweight, const T* dout, const T* x, const T* weight, const T* rstd,
                      i64 n, i64 c) {
  // y = w x r, r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / c, so
  // dx_j = r w_j dy_j - (r^3 / c) x_j sum_k w_k dy_k x_k.
#pragma omp parallel for schedule(static) if (worth_parallel(5 * n * c))
  for (i64 i = 0; i < n; ++i) {
    const T* xi = x + i * c;
    const T* gi = dout + i * c;
    const T r = rstd[i];
    T dot = 0;
    for (i64 j = 0; j < c; ++j) dot += weight[j] * gi[j] * xi[j];
    const T coef = dot * r * r * r / static_cast<T>(c);
    T* dxi = dx + i * c;
    for (i64 j = 0; j < c; ++j) dxi[j] += r * weight[j] * gi[j] - coef * xi[j];
  }
  // dweight is a sum over rows: serial over rows keeps it race-free; n * c multiply-adds.
  for (i64 i = 0; i < n; ++i) {
    const T* xi = x + i * c;
    const T* gi = dout + i * c;
    const T r = rstd[i];
    for (i64 j = 0; j < c; ++j) dweight[j] += gi[j] * xi[j] * r;
  }
}

// ---- linear ------------------------------------------------------------------------------------

template <class T>
void linear_forward(T* out, const T* in, const T* weight, i64 n, i64 d_in, i64 d_out) {
  gemm<T>(Trans::N, Trans::T, n, d_out, d_in, T(1), in, d_in, weight, d_in, T(0), out, d_out);
}

template <class T>
void linear_backward(T* din, T* dweight, const T* dout, const T* in, const T* weight, i64 n,
                     i64 d_in, i64 d_out) {
  if (din != nullptr) {
    gemm<T>(Trans::N, Trans::N, n, d_in, d_out, T(1), dout, d_out, weight, d_in, T(1), din, d_in);
  }
  gemm<T>(Trans::T, Trans::N, d_out, d_in, n, T(1), dout, d_out, in, d_in, T(1), dweight, d_in);
}

// ---- RoPE --------------------------------------------------------------------------------------

template <class T>
RopeTable<T> make_rope_table(i64 seq_len, i64 head_dim, double theta) {
  check(head_dim % 2 == 0, "RoPE: head_dim must be even (got " + std::to_string(head_dim) + ")");
  RopeTable<T> t;
  t.seq_len = seq_len;
  t.half = head_dim / 2;
  t.cos.resize(static_cast<std::size_t>(seq_len * t.half));
  t.sin.resize(t.cos.size());
  for (i64 pos = 0; pos < seq_len; ++pos) {
    for (i64 i = 0; i < t.half; ++i) {
      const double inv_freq =
          1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
      const double angle = static_cast<double>(pos) * inv_freq;
      t.cos[static_cast<std::size_t>(pos * t.half + i)] = static_cast<T>(std::cos(angle));
      t.sin[static_cast<std::size_t>(pos * t.half + i)] = static_cast<T>(std::sin(angle));
    }
  }
  return t;
}

namespace {
// Rotates every (i, i + half) pair by +angle (sign = 1) or -angle (sign = -1).
template <class T>
void rope_apply(T* x, const RopeTable<T>& table, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                i64 row_stride, T sign) {
  check(seq <= table.seq_len && 2 * table.half == head_dim,
        "RoPE: table built for seq_len " + std::to_string(table.seq_len) + ", head_dim " +
            std::to_string(2 * table.half) + " used with seq " + std::to_string(seq) +
            ", head_dim " + std::to_string(head_dim));
  const i64 half = table.half;
#pragma omp parallel for schedule(static) if (worth_parallel(batch * seq * n_head * head_dim))
  for (i64 row = 0; row < batch * seq; ++row) {
    const i64 pos = row % seq;
    const T* cs = table.cos.data() + pos * half;
    const T* sn = table.sin.data() + pos * half;
    T* r = x + row * row_stride;
    for (i64 h = 0; h < n_head; ++h) {
      T* a = r + h * head_dim;
      T* b = a + half;
      for (i64 i = 0; i < half; ++i) {
        const T s = sign * sn[i];
        const T xa = a[i], xb = b[i];
        a[i] = xa * cs[i] - xb * s;
        b[i] = xb * cs[i] + xa * s;
      }
    }
  }
}
}  // namespace

template <class T>
void rope_forward(T* x, const RopeTable<T>& table, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                  i64 row_stride) {
  rope_apply(x, table, batch, seq, n_head, head_dim, row_stride, T(1));
}

template <class T>
void rope_backward(T* dx, const RopeTable<T>& table, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                   i64 row_stride) {
  // A rotation's transpose is the rotation by the opposite angle.
  rope_apply(dx, table, batch, seq, n_head, head_dim, row_stride, T(-1));
}

// ---- attention ---------------------------------------------------------------------------------

namespace {
// The K/V head count and row stride of a fused [q | k | v] buffer; checks the grouping.
struct QkvShape {
  i64 d, kv_heads, kv, stride, group;  // group: query heads per K/V head
};
QkvShape qkv_shape(i64 n_head, i64 head_dim, i64 n_kv_head) {
  const i64 kv_heads = n_kv_head > 0 ? n_kv_head : n_head;
  check(n_head % kv_heads == 0, "attention: n_kv_head " + std::to_string(kv_heads) +
                                    " does not divide n_head " + std::to_string(n_head));
  const i64 d = n_head * head_dim, kv = kv_heads * head_dim;
  return {d, kv_heads, kv, d + 2 * kv, n_head / kv_heads};
}
}  // namespace

template <class T>
void attention_forward(T* out, T* probs, const T* qkv, i64 batch, i64 seq, i64 n_head, i64 head_dim,
                       i64 n_kv_head) {
  const QkvShape s = qkv_shape(n_head, head_dim, n_kv_head);
  const i64 d = s.d, stride = s.stride;
  const T scale = T(1) / std::sqrt(static_cast<T>(head_dim));
  // One (batch, head) pair per task: two small GEMMs and a causal softmax in between. Heads of
  // one group read the same K and V (no copy: repeat_kv is only an index).
#pragma omp parallel for collapse(2) \
    schedule(static) if (worth_parallel(batch * n_head * seq * seq * head_dim))
  for (i64 b = 0; b < batch; ++b) {
    for (i64 h = 0; h < n_head; ++h) {
      const T* row0 = qkv + b * seq * stride;
      const T* q = row0 + h * head_dim;
      const T* k = row0 + d + (h / s.group) * head_dim;
      const T* v = k + s.kv;
      T* p = probs + (b * n_head + h) * seq * seq;
      gemm<T>(Trans::N, Trans::T, seq, seq, head_dim, scale, q, stride, k, stride, T(0), p, seq);
      for (i64 i = 0; i < seq; ++i) {
        T* row = p + i * seq;
        T mx = row[0];
        for (i64 j = 1; j <= i; ++j) mx = std::max(mx, row[j]);
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (i64 j = 0; j <= i; ++j) {
          row[j] = exp_t(row[j] - mx);
          sum += row[j];
        }
        const T inv = T(1) / sum;
        for (i64 j = 0; j <= i; ++j) row[j] *= inv;
        for (i64 j = i + 1; j < seq; ++j) row[j] = T(0);
      }
      gemm<T>(Trans::N, Trans::N, seq, head_dim, seq, T(1), p, seq, v, stride, T(0),
              out + b * seq * d + h * head_dim, d);
    }
  }
}

template <class T>
void attention_backward(T* dqkv, T* scratch, const T* dout, const T* probs, const T* qkv, i64 batch,
                        i64 seq, i64 n_head, i64 head_dim, i64 n_kv_head) {
  const QkvShape s = qkv_shape(n_head, head_dim, n_kv_head);
  const i64 d = s.d, stride = s.stride;
  const T scale = T(1) / std::sqrt(static_cast<T>(head_dim));
  // One (batch, K/V head) pair per task, its group's query heads in turn: they all add into
  // the same dK and dV, so splitting a group across threads would race.
#pragma omp parallel for collapse(2) \
    schedule(static) if (worth_parallel(batch * n_head * seq * seq * head_dim))
  for (i64 b = 0; b < batch; ++b) {
    for (i64 g = 0; g < s.kv_heads; ++g) {
      const i64 off = b * seq * stride;
      const T* k = qkv + off + d + g * head_dim;
      const T* v = k + s.kv;
      T* dk = dqkv + off + d + g * head_dim;
      T* dv = dk + s.kv;
      for (i64 h = g * s.group; h < (g + 1) * s.group; ++h) {
        const T* q = qkv + off + h * head_dim;
        T* dq = dqkv + off + h * head_dim;
        const T* go = dout + b * seq * d + h * head_dim;
        const T* p = probs + (b * n_head + h) * seq * seq;
        T* ds = scratch + (b * n_head + h) * seq * seq;
        // out = P V: dP = dout V^T, dV += P^T dout.
        gemm<T>(Trans::N, Trans::T, seq, seq, head_dim, T(1), go, d, v, stride, T(0), ds, seq);
        gemm<T>(Trans::T, Trans::N, seq, head_dim, seq, T(1), p, seq, go, d, T(1), dv, stride);
        // Softmax: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik); P is 0 above the diagonal, so dS
        // is too.
        for (i64 i = 0; i < seq; ++i) {
          T* row = ds + i * seq;
          const T* pr = p + i * seq;
          T dot = 0;
          for (i64 j = 0; j <= i; ++j) dot += pr[j] * row[j];
          for (i64 j = 0; j <= i; ++j) row[j] = pr[j] * (row[j] - dot);
          for (i64 j = i + 1; j < seq; ++j) row[j] = T(0);
        }
        // S = scale Q K^T: dQ += scale dS K, dK += scale dS^T Q.
        gemm<T>(Trans::N, Trans::N, seq, head_dim, seq, scale, ds, seq, k, stride, T(1), dq,
                stride);
        gemm<T>(Trans::T, Trans::N, seq, head_dim, seq, scale, ds, seq, q, stride, T(1), dk,
                stride);
      }
    }
  }
}

// ---- SwiGLU ------------------------------------------------------------------------------------

template <class T>
void swiglu_forward(T* out, const T* gu, i64 n, i64 f) {
#pragma omp parallel for schedule(static) if (worth_parallel(8 * n * f))
  for (i64 i = 0; i < n; ++i) {
    const T* g = gu + i * 2 * f;
    const T* u = g + f;
    T* o = out + i * f;
#pragma omp simd
    for (i64 j = 0; j < f; ++j) o[j] = g[j] / (T(1) + exp_t(-g[j])) * u[j];
  }
}

template <class T>
void swiglu_backward(T* dgu, const T* dout, const T* gu, i64 n, i64 f) {
  // silu(g) = g s(g), silu'(g) = s(g) (1 + g (1 - s(g))).
#pragma omp parallel for schedule(static) if (worth_parallel(12 * n * f))
  for (i64 i = 0; i < n; ++i) {
    const T* g = gu + i * 2 * f;
    const T* u = g + f;
    const T* go = dout + i * f;
    T* dg = dgu + i * 2 * f;
    T* du = dg + f;
#pragma omp simd
    for (i64 j = 0; j < f; ++j) {
      const T s = T(1) / (T(1) + exp_t(-g[j]));
      dg[j] += go[j] * u[j] * s * (T(1) + g[j] * (T(1) - s));
      du[j] += go[j] * g[j] * s;
    }
  }
}

// ---- dropout -----------------------------------------------------------------------------------

void make_dropout_mask(std::uint8_t* keep, i64 n, double p, Rng& rng) {
  for (i64 i = 0; i < n; ++i) keep[i] = rng.uniform() >= p ? 1 : 0;
}

template <class T>
void dropout_forward(T* out, const T* in, const std::uint8_t* keep, i64 n, double p) {
  const T scale = static_cast<T>(1.0 / (1.0 - p));
#pragma omp parallel for schedule(static) if (worth_parallel(n))
  for (i64 i = 0; i < n; ++i) out[i] = keep[i] ? in[i] * scale : T(0);
}

template <class T>
void dropout_backward(T* din, const T* dout, const std::uint8_t* keep, i64 n, double p) {
  const T scale = static_cast<T>(1.0 / (1.0 - p));
#pragma omp parallel for schedule(static) if (worth_parallel(n))
  for (i64 i = 0; i < n; ++i) din[i] += keep[i] ? dout[i] * scale : T(0);
}

// ---- cross-entropy -----------------------------------------------------------------------------

namespace {
void check_targets(const std::int32_t* targets, i64 n, i64 v) {
  for (i64 i = 0; i < n; ++i) {
    check(targets[i] < v, "cross_entropy: target " + std::to_string(targets[i]) + " at row " +
                              std::to_string(i) + " is >= vocab_size " + std::to_string(v));
  }
}
i64 count_targets(const std::int32_t* targets, i64 n) {
  i64 count = 0;
  for (i64 i = 0; i < n; ++i) count += targets[i] >= 0 ? 1 : 0;
  return count;
}
}  // namespace

template <class T>
double cross_entropy_forward(T* lse, const T* logits, const std::int32_t* targets, i64 n, i64 v,
                             i64* count) {
  check_targets(targets, n, v);
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (worth_parallel(4 * n * v))
  for (i64 i = 0; i < n; ++i) {
    const T* row = logits + i * v;
    T mx = row[0];
    for (i64 j = 1; j < v; ++j) mx = std::max(mx, row[j]);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (i64 j = 0; j < v; ++j) sum += exp_t(row[j] - mx);
    lse[i] = mx + std::log(sum);
    if (targets[i] >= 0) total += static_cast<double>(lse[i] - row[targets[i]]);
  }
  const i64 counted = count_targets(targets, n);
  if (count != nullptr) *count = counted;
  return counted > 0 ? total / static_cast<double>(counted) : 0.0;
}

template <class T>
void cross_entropy_backward(T* dlogits, const T* logits, const T* lse, const std::int32_t* targets,
                            i64 n, i64 v, double dloss) {
  const i64 counted = count_targets(targets, n);
  if (counted == 0) return;
  const T g = static_cast<T>(dloss / static_cast<double>(counted));
#pragma omp parallel for schedule(static) if (worth_parallel(4 * n * v))
  for (i64 i = 0; i < n; ++i) {
    if (targets[i] < 0) continue;
    const T* row = logits + i * v;
    T* drow = dlogits + i * v;
    for (i64 j = 0; j < v; ++j) drow[j] += g * exp_t(row[j] - lse[i]);
    drow[targets[i]] -= g;
  }
}

template <class T>
double weighted_cross_entropy(const T* logits, const T* lse, const std::int32_t* targets,
                              const double* weights, i64 n, i64 v) {
  double total = 0.0;
  for (i64 i = 0; i < n; ++i)
    if (targets[i] >= 0)
      total += weights[i] * static_cast<double>(lse[i] - logits[i * v + targets[i]]);
  return total;
}

template <class T>
void weighted_cross_entropy_backward(T* dlogits, const T* logits, const T* lse,
                                     const std::int32_t* targets, const double* weights, i64 n,
                                     i64 v, double dloss) {
#pragma omp parallel for schedule(static) if (worth_parallel(4 * n * v))
  for (i64 i = 0; i < n; ++i) {
    if (targets[i] < 0 || weights[i] == 0.0) continue;
    const T g = static_cast<T>(dloss * weights[i]);
    const T* row = logits + i * v;
    T* drow = dlogits + i * v;
    for (i64 j = 0; j < v; ++j) drow[j] += g * exp_t(row[j] - lse[i]);
    drow[targets[i]] -= g;
  }
}

// ---- explicit instantiations -------------------------------------------------------------------

#define PION_LAYERS_INSTANTIATE(T)                                                               \
  template void embedding_forward<T>(T*, const std::int32_t*, const T*, i64, i64);               \
  template void embedding_backward<T>(T*, const T*, const std::int32_t*, i64, i64);              \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, i64, i64, double);                \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, i64, i64);   \
  template void linear_forward<T>(T*, const T*, const T*, i64, i64, i64);                        \
  template void linear_backward<T>(T*, T*, const T*, const T*, const T*, i64, i64, i64);         \
  template RopeTable<T> make_rope_table<T>(i64, i64, double);                                    \
  template void rope_forward<T>(T*, const RopeTable<T>&, i64, i64, i64, i64, i64);               \
  template void rope_backward<T>(T*, const RopeTable<T>&, i64, i64, i64, i64, i64);              \
  template void attention_forward<T>(T*, T*, const T*, i64, i64, i64, i64, i64);                 \
  template void attention_backward<T>(T*, T*, const T*, const T*, const T*, i64, i64, i64, i64,  \
                                      i64);                                                      \
  template void swiglu_forward<T>(T*, const T*, i64, i64);                                       \
  template void swiglu_backward<T>(T*, const T*, const T*, i64, i64);                            \
  template void dropout_forward<T>(T*, const T*, const std::uint8_t*, i64, double);              \
  template void dropout_backward<T>(T*, const T*, const std::uint8_t*, i64, double);             \
  template double cross_entropy_forward<T>(T*, const T*, const std::int32_t*, i64, i64, i64*);   \
  template void cross_entropy_backward<T>(T*, const T*, const T*, const std::int32_t*, i64, i64, \
                                          double);                                               \
  template double weighted_cross_entropy<T>(const T*, const T*, const std::int32_t*,             \
                                            const double*, i64, i64);                            \
  template void weighted_cross_entropy_backward<T>(T*, const T*, const T*, const std::int32_t*,  \
                                                   const double*, i64, i64, double);

PION_LAYERS_INSTANTIATE(float)
PION_LAYERS_INSTANTIATE(double)
#undef PION_LAYERS_INSTANTIATE

}  // namespace pion::layers
