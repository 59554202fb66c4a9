#pragma once
// The one description of each optimizer's hyperparameters: every Options struct declares its
// fields once, in `fields(visitor)`, with its name (the JSON key of the checkpoint's group
// options and of `pion optim-trace --config`), its member and its valid values. Everything
// else is derived from that list: validation (validate_options below), the group JSON a
// checkpoint stores and the optim-trace config reader (pion/optim/options_json.h), and the
// CUDA optimizers' options (pion/cuda/optim.h extends these structs). Adding a
// hyperparameter is one line here plus its use in the maths.
//
// Plain C++17 without JSON: the CUDA sources (compiled by nvcc as C++17) include it.
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "pion/core/error.h"

namespace pion {

// A finite real number in [lo, hi] (lo_open / hi_open make an end open; hi = infinity with
// hi_open means "no upper bound").
struct RealRange {
  double lo;
  double hi;
  bool lo_open;
  bool hi_open;
  bool contains(double x) const {
    return std::isfinite(x) && (lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi);
  }
};
// An integer in [lo, hi].
struct IntRange {
  std::int64_t lo;
  std::int64_t hi;
};
// true or false.
struct AnyBool {};
// An enum whose values are 0 .. count-1, named `names[value]` (in JSON and messages).
struct Choices {
  const char* const* names;
  int count;
};

inline constexpr double kUnbounded = std::numeric_limits<double>::infinity();
inline constexpr RealRange kUnitInterval{0.0, 1.0, false, true};         // [0, 1)
inline constexpr RealRange kPositive{0.0, kUnbounded, true, true};       // (0, inf)
inline constexpr RealRange kNonNegative{0.0, kUnbounded, false, true};   // [0, inf)

enum class PionRetraction {
  Taylor2,  // E2(sA) = I + sA + (sA)^2/2, the paper's choice: the spectrum drifts upwards
            // by O((s||A||)^4) per step (E2^T E2 = I + (sA)^4/4) plus fp32 rounding
  Cayley,   // (I - sA/2)^-1 (I + sA/2): exactly orthogonal for skew A
  Exp,      // exp(sA) by scaling and squaring: exactly orthogonal for skew A
};
inline constexpr const char* kPionRetractionNames[] = {"taylor2", "cayley", "exp"};
inline constexpr Choices kPionRetractions{kPionRetractionNames, 3};
inline const char* retraction_name(PionRetraction r) {
  const int i = static_cast<int>(r);
  return i >= 0 && i < kPionRetractions.count ? kPionRetractions.names[i] : "?";
}

// Pion's variants (docs/PION.md, "The family the paper studies"; the exact definitions are
// our reading of the paper, fixed by issue 11 and restated in pion.h).
enum class PionMomentum {
  Lie,          // Adam moments of the skew generators G_in, G_out (the rule above; default)
  Ambient,      // Adam moments m, v of the d_out x d_in gradient; the direction is projected
  Transported,  // as ambient, and m is carried along by each step's rotations: m <- L m R
};
inline constexpr const char* kPionMomentumNames[] = {"lie", "ambient", "transported"};
inline constexpr Choices kPionMomenta{kPionMomentumNames, 3};

enum class PionUpdateSide {
  Both,       // W <- L W R every step (default)
  Left,       // output side only: W <- L W (A_in = 0)
  Right,      // input side only: W <- W R (A_out = 0)
  Alternate,  // left on a matrix's 1st, 3rd, ... applied step, right on the 2nd, 4th, ...
};
inline constexpr const char* kPionUpdateSideNames[] = {"both", "left", "right", "alternate"};
inline constexpr Choices kPionUpdateSides{kPionUpdateSideNames, 4};

enum class PionNormalizer {
  Adam,   // A = -m / (sqrt(v) + eps) (default)
  Msign,  // A = -NS(buf), Muon's quintic Newton-Schulz on a first-moment buffer (lie only)
};
inline constexpr const char* kPionNormalizerNames[] = {"adam", "msign"};
inline constexpr Choices kPionNormalizers{kPionNormalizerNames, 2};

// AdamW (torch.optim.AdamW semantics, see adamw.h).
struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  // > 0 (torch allows 0): with eps 0 a zero second moment divides zero by zero.
  double eps = 1e-8;
  double weight_decay = 0.01;

  template <class Visitor>
  static void fields(Visitor&& f) {
    f("beta1", &AdamWOptions::beta1, kUnitInterval);
    f("beta2", &AdamWOptions::beta2, kUnitInterval);
    f("eps", &AdamWOptions::eps, kPositive);
    f("weight_decay", &AdamWOptions::weight_decay, kNonNegative);
  }
};

// Muon (see muon.h).
struct MuonOptions {
  double momentum = 0.95;
  bool nesterov = true;
  int ns_steps = 5;
  double weight_decay = 0.0;
  double eps = 1e-7;  // added to ||U||_F before the Newton-Schulz iteration

  template <class Visitor>
  static void fields(Visitor&& f) {
    f("momentum", &MuonOptions::momentum, kUnitInterval);
    f("nesterov", &MuonOptions::nesterov, AnyBool{});
    f("ns_steps", &MuonOptions::ns_steps, IntRange{1, 100});  // 5 is usual
    f("weight_decay", &MuonOptions::weight_decay, kNonNegative);
    f("eps", &MuonOptions::eps, kPositive);  // keeps a zero update finite
  }
};

// Pion (see pion.h).
struct PionOptions {
  double c = 0.2;  // target RMS of the first-order update per unit lr
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;  // > 0: guards 0/0 in A and alpha when a gradient is zero
  PionRetraction retraction = PionRetraction::Taylor2;
  // After every N-th optimizer step (steps() % N == 0; 0 = never) project W back onto its
  // initial spectrum with an fp32 SVD, W <- U diag(sigma0) V^T, removing whatever drift
  // the retraction and rounding left (about 1e-6 relative remains).
  std::int64_t reanchor_every = 0;
  PionMomentum momentum = PionMomentum::Lie;
  PionUpdateSide update_side = PionUpdateSide::Both;
  PionNormalizer normalizer = PionNormalizer::Adam;
  int ns_steps = 5;  // Newton-Schulz iterations of the msign normalizer

  template <class Visitor>
  static void fields(Visitor&& f) {
    f("c", &PionOptions::c, kPositive);
    f("beta1", &PionOptions::beta1, kUnitInterval);
    f("beta2", &PionOptions::beta2, kUnitInterval);
    f("eps", &PionOptions::eps, kPositive);
    f("retraction", &PionOptions::retraction, kPionRetractions);
    f("reanchor_every", &PionOptions::reanchor_every, IntRange{0, std::int64_t{1} << 40});
    f("momentum", &PionOptions::momentum, kPionMomenta);
    f("update_side", &PionOptions::update_side, kPionUpdateSides);
    f("normalizer", &PionOptions::normalizer, kPionNormalizers);
    f("ns_steps", &PionOptions::ns_steps, IntRange{1, 100});  // 5 is Muon's
  }

  // Combinations the fields' own ranges cannot rule out (called by validate_options).
  static void check_combination(const PionOptions& o, const std::string& who) {
    if (o.normalizer == PionNormalizer::Msign && o.momentum != PionMomentum::Lie)
      throw Error(who + ": normalizer \"msign\" needs momentum \"lie\" (it orthogonalises the "
                  "generators' momentum buffers), got momentum \"" +
                  kPionMomenta.names[static_cast<int>(o.momentum)] + "\"");
  }
};

namespace options_detail {

inline std::string number_text(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace options_detail

// "a finite number in [0, 1)", "an integer in [1, 100]", ...: what a field accepts.
inline std::string allowed_text(const RealRange& r) {
  return std::string("a finite number in ") + (r.lo_open ? "(" : "[") +
         options_detail::number_text(r.lo) + ", " + options_detail::number_text(r.hi) +
         (r.hi_open ? ")" : "]");
}
inline std::string allowed_text(const IntRange& r) {
  return "an integer in [" + std::to_string(r.lo) + ", " + std::to_string(r.hi) + "]";
}
inline std::string allowed_text(const AnyBool&) { return "true or false"; }
inline std::string allowed_text(const Choices& c) {
  std::string out = "one of ";
  for (int i = 0; i < c.count; ++i) out += std::string(i > 0 ? ", " : "") + "\"" + c.names[i] + "\"";
  return out;
}

namespace options_detail {

// Whether Options declares `static void check_combination(const Options&, const std::string&)`
// (cross-field rules; inherited by the CUDA options that extend it).
template <class O, class = void>
struct has_combination_check : std::false_type {};
template <class O>
struct has_combination_check<O, std::void_t<decltype(O::check_combination(
                                    std::declval<const O&>(), std::declval<const std::string&>()))>>
    : std::true_type {};

}  // namespace options_detail

// Throws pion::Error "<who>: <key> must be <allowed>, got <value>" for the first field of `o`
// outside its range (`who` names the optimizer: "pion", "muon (cuda)", ...), then applies the
// struct's check_combination, if it has one.
template <class Options>
void validate_options(const Options& o, const std::string& who) {
  Options::fields([&](const char* key, auto member, const auto& spec) {
    using Spec = std::decay_t<decltype(spec)>;
    const auto& value = o.*member;
    bool ok = true;
    std::string got;
    if constexpr (std::is_same_v<Spec, RealRange>) {
      ok = spec.contains(static_cast<double>(value));
      got = options_detail::number_text(static_cast<double>(value));
    } else if constexpr (std::is_same_v<Spec, IntRange>) {
      const auto v = static_cast<std::int64_t>(value);
      ok = v >= spec.lo && v <= spec.hi;
      got = std::to_string(v);
    } else if constexpr (std::is_same_v<Spec, Choices>) {
      const int v = static_cast<int>(value);
      ok = v >= 0 && v < spec.count;
      got = std::to_string(v);
    } else {
      static_assert(std::is_same_v<Spec, AnyBool>, "unknown field kind");
      (void)value;  // any bool is valid
    }
    if (!ok) throw Error(who + ": " + key + " must be " + allowed_text(spec) + ", got " + got);
  });
  if constexpr (options_detail::has_combination_check<Options>::value)
    Options::check_combination(o, who);
}

}  // namespace pion
