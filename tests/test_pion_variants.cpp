// Pion's variants (issue 11: momentum lie | ambient | transported, update_side both | left |
// right | alternate, normalizer adam | msign): every one keeps the spectrum with an exact
// retraction, keeps only the state it needs, rotates the side it should on each step (also
// across a save and load), and refuses the combination that is not defined. Their arithmetic
// is checked against the fp64 reference in tests/test_optim_trace.cpp
// (OptimTraceParity.PionVariantsMatchFp64Reference).
#include <cblas.h>
#include <gtest/gtest.h>

#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "compare.h"
#include "helpers.h"
#include "optim_fixtures.h"
#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/random.h"
#include "pion/core/safetensors.h"
#include "pion/optim/adamw.h"
#include "pion/optim/options_json.h"
#include "pion/optim/pion.h"

using namespace pion;
using namespace pion::test;  // compare.h, optim_fixtures.h

namespace {

struct Variant {
  PionMomentum momentum;
  PionUpdateSide side;
  PionNormalizer normalizer;
};

// The 16 defined variants: 3 momenta x 4 sides with adam, and msign (lie only) x 4 sides.
std::vector<Variant> all_variants() {
  std::vector<Variant> out;
  for (int m = 0; m < kPionMomenta.count; ++m)
    for (int s = 0; s < kPionUpdateSides.count; ++s)
      out.push_back({static_cast<PionMomentum>(m), static_cast<PionUpdateSide>(s),
                     PionNormalizer::Adam});
  for (int s = 0; s < kPionUpdateSides.count; ++s)
    out.push_back({PionMomentum::Lie, static_cast<PionUpdateSide>(s), PionNormalizer::Msign});
  return out;
}

std::string name_of(const Variant& v) {
  return std::string(kPionMomenta.names[static_cast<int>(v.momentum)]) + "/" +
         kPionUpdateSides.names[static_cast<int>(v.side)] + "/" +
         kPionNormalizers.names[static_cast<int>(v.normalizer)];
}

Pion::Options options_for(const Variant& v, PionRetraction r = PionRetraction::Cayley) {
  Pion::Options o;
  o.momentum = v.momentum;
  o.update_side = v.side;
  o.normalizer = v.normalizer;
  o.retraction = r;
  return o;
}

// W^T W (left side turned: unchanged by W <- L W for orthogonal L) or W W^T (right side).
Tensor gram(const Tensor& w, bool columns) {
  const Tensor x = w.to(DType::F64);
  const std::int64_t m = x.rows(), n = x.cols(), d = columns ? n : m;
  Tensor out = Tensor::empty({d, d}, DType::F64);
  if (columns) {
    gemm<double>(Trans::T, Trans::N, n, n, m, 1.0, x.data<double>(), n, x.data<double>(), n, 0.0,
                 out.data<double>(), n);
  } else {
    gemm<double>(Trans::N, Trans::T, m, m, n, 1.0, x.data<double>(), n, x.data<double>(), n, 0.0,
                 out.data<double>(), m);
  }
  return out;
}

// One OpenBLAS thread while alive: on matrices this small, waking BLAS threads costs about
// ten times the arithmetic (32000 steps took 200 s with two threads, 25 s with one).
class SingleBlasThread {
 public:
  SingleBlasThread() : saved_(openblas_get_num_threads()) { openblas_set_num_threads(1); }
  ~SingleBlasThread() { openblas_set_num_threads(saved_); }
  SingleBlasThread(const SingleBlasThread&) = delete;
  SingleBlasThread& operator=(const SingleBlasThread&) = delete;

 private:
  int saved_;
};

std::set<std::string> keys_of(const StateMap& s) {
  std::set<std::string> out;
  for (const auto& [key, t] : s) out.insert(key);
  return out;
}

}  // namespace

TEST(PionVariants, EveryVariantKeepsTheSpectrumWithCayleyOver1000Steps) {
  const SingleBlasThread single_thread;
  for (const Variant& v : all_variants()) {
    for (auto [m, n] : {std::pair<std::int64_t, std::int64_t>{24, 16}, {16, 24}}) {
      const auto [drift, moved] = spectrum_run(options_for(v), m, n, 41);
      EXPECT_LT(drift, 1e-5) << name_of(v) << " " << m << "x" << n;
      // Not vacuous: the singular vectors turned far.
      EXPECT_GT(moved, 0.5) << name_of(v) << " " << m << "x" << n;
      std::cout << "[pion] cayley " << name_of(v) << " " << m << "x" << n
                << " drift after 1000 steps: " << drift << "\n";
    }
  }
}

TEST(PionVariants, StateHoldsOnlyWhatTheVariantUses) {
  const std::int64_t m = 12, n = 8;
  struct Case {
    Variant v;
    std::set<std::string> keys;
  };
  const Case cases[] = {
      {{PionMomentum::Lie, PionUpdateSide::Both, PionNormalizer::Adam},
       {"m_in", "v_in", "m_out", "v_out", "sigma0"}},
      {{PionMomentum::Lie, PionUpdateSide::Left, PionNormalizer::Adam},
       {"m_out", "v_out", "sigma0"}},
      {{PionMomentum::Lie, PionUpdateSide::Right, PionNormalizer::Adam},
       {"m_in", "v_in", "sigma0"}},
      // Alternate rotates each side in turn: both sides' state, from the first step on (so a
      // checkpoint after one step is complete).
      {{PionMomentum::Lie, PionUpdateSide::Alternate, PionNormalizer::Adam},
       {"m_in", "v_in", "m_out", "v_out", "sigma0"}},
      {{PionMomentum::Lie, PionUpdateSide::Both, PionNormalizer::Msign},
       {"m_in", "m_out", "sigma0"}},
      {{PionMomentum::Lie, PionUpdateSide::Left, PionNormalizer::Msign}, {"m_out", "sigma0"}},
      {{PionMomentum::Ambient, PionUpdateSide::Both, PionNormalizer::Adam}, {"m", "v", "sigma0"}},
      {{PionMomentum::Transported, PionUpdateSide::Right, PionNormalizer::Adam},
       {"m", "v", "sigma0"}},
  };
  for (const Case& c : cases) {
    Matrix x = random_matrix(m, n, 51);
    Pion opt;
    opt.add_param_group({x.param("w")}, 0.05, options_for(c.v, PionRetraction::Taylor2));
    Rng rng(52);
    random_steps(opt, 1, rng);
    EXPECT_EQ(keys_of(*opt.state("w")), c.keys) << name_of(c.v);
    // state_slots_for states the same set, with the shapes the tensors have.
    std::set<std::string> slot_keys;
    for (const StateSlot& s : Pion::state_slots_for({m, n}, options_for(c.v))) {
      slot_keys.insert(s.key);
      EXPECT_EQ(opt.state("w")->at(s.key).shape(), s.shape) << name_of(c.v) << " " << s.key;
    }
    EXPECT_EQ(slot_keys, c.keys) << name_of(c.v);
  }
}

TEST(PionVariants, AmbientMomentsTakeAdamWsBytes) {
  // Ambient and transported keep m and v of the matrix's shape, as AdamW does; every Pion
  // variant also keeps sigma0 (min(d_out, d_in) floats: the spectrum drift is reported and
  // re-anchored against it), which is the whole difference.
  for (auto [m, n] : {std::pair<std::int64_t, std::int64_t>{48, 32}, {32, 96}}) {
    for (PionMomentum momentum : {PionMomentum::Ambient, PionMomentum::Transported}) {
      Matrix x = random_matrix(m, n, 61), y = random_matrix(m, n, 61);
      Pion pion;
      pion.add_param_group({x.param("w")}, 0.05,
                           options_for({momentum, PionUpdateSide::Both, PionNormalizer::Adam}));
      AdamW adamw;
      adamw.add_param_group({y.param("w")}, 1e-3, {});
      Rng rng(62), rng2(62);
      random_steps(pion, 2, rng);
      random_steps(adamw, 2, rng2);
      const std::size_t sigma0_bytes = sizeof(float) * static_cast<std::size_t>(std::min(m, n));
      EXPECT_EQ(pion.state_bytes() - sigma0_bytes, adamw.state_bytes()) << m << "x" << n;
      EXPECT_EQ(adamw.state_bytes(), 2 * sizeof(float) * static_cast<std::size_t>(m * n));
      // The Lie-algebra state of the same matrix: 2 (d_in^2 + d_out^2) floats.
      Matrix z = random_matrix(m, n, 61);
      Pion lie;
      lie.add_param_group({z.param("w")}, 0.05, Pion::Options{});
      random_steps(lie, 1, rng);
      EXPECT_EQ(lie.state_bytes() - sigma0_bytes,
                2 * sizeof(float) * static_cast<std::size_t>(m * m + n * n));
    }
  }
}

TEST(PionVariants, AlternateTurnsLeftOnOddStepsAndRightOnEvenOnesAcrossAResume) {
  // A left step W <- L W keeps W^T W; a right step W <- W R keeps W W^T (L, R orthogonal:
  // Cayley). Each step must keep the one and change the other.
  const std::string dir = test::temp_dir("pion_alternate");
  for (PionMomentum momentum : {PionMomentum::Lie, PionMomentum::Transported}) {
    const Variant v{momentum, PionUpdateSide::Alternate, PionNormalizer::Adam};
    auto make = [&](Matrix& x, Pion& opt) {
      x = random_matrix(10, 7, 71);
      opt.add_param_group({x.param("w")}, 0.05, options_for(v));
    };
    auto step = [](Matrix& x, Pion& opt, int t) {
      Rng rng(700 + static_cast<std::uint64_t>(t));  // the gradient depends on t only
      fill_normal(x.g, rng);
      ASSERT_TRUE(opt.step());
    };
    auto check_side = [&](const Tensor& before, const Tensor& after, int t) {
      const bool left = t % 2 == 1;  // t is the 1-based applied step
      EXPECT_LT(rel_frobenius_diff(gram(after, left), gram(before, left)), 1e-5)
          << name_of(v) << " " << t;
      EXPECT_GT(rel_frobenius_diff(gram(after, !left), gram(before, !left)), 1e-3)
          << name_of(v) << " step " << t << " turned the wrong side";
    };
    Matrix straight;
    Pion opt_straight;
    make(straight, opt_straight);
    for (int t = 1; t <= 6; ++t) {
      const Tensor before = straight.w.clone();
      step(straight, opt_straight, t);
      check_side(before, straight.w, t);
    }
    // Three steps, a save, a load into a fresh optimizer, three more: the side keeps
    // following the applied-step count, and the run is bit-exact with the uninterrupted one.
    Matrix first;
    Pion opt_first;
    make(first, opt_first);
    for (int t = 1; t <= 3; ++t) step(first, opt_first, t);
    TensorFile file;
    opt_first.save_state(file);
    file.tensors["w"] = first.w;
    save_safetensors(dir + "/ckpt.safetensors", file);
    const TensorFile loaded = load_safetensors(dir + "/ckpt.safetensors");
    Matrix resumed;
    Pion opt_resumed;
    make(resumed, opt_resumed);
    resumed.w.copy_from(loaded.tensors.at("w"));
    opt_resumed.load_state(loaded);
    for (int t = 4; t <= 6; ++t) {
      const Tensor before = resumed.w.clone();
      step(resumed, opt_resumed, t);
      check_side(before, resumed.w, t);
    }
    EXPECT_TRUE(bitwise_equal(resumed.w, straight.w)) << name_of(v);
  }
}

TEST(PionVariants, LoadTakesTheSavedVariantAndItsState) {
  // A state dict of a left-only run loads into an optimizer built with the default options:
  // the saved options decide which tensors must be present, and then apply.
  Matrix x = random_matrix(9, 6, 81);
  Pion saved;
  saved.add_param_group({x.param("w")}, 0.05,
                        options_for({PionMomentum::Lie, PionUpdateSide::Left, PionNormalizer::Msign}));
  Rng rng(82);
  random_steps(saved, 2, rng);
  TensorFile file;
  saved.save_state(file);

  Matrix y = random_matrix(9, 6, 81);
  Pion loaded;
  loaded.add_param_group({y.param("w")}, 0.05, Pion::Options{});
  loaded.load_state(file);
  EXPECT_EQ(loaded.options(0).update_side, PionUpdateSide::Left);
  EXPECT_EQ(loaded.options(0).normalizer, PionNormalizer::Msign);
  EXPECT_EQ(keys_of(*loaded.state("w")), (std::set<std::string>{"m_out", "sigma0"}));

  // A file that lacks a tensor the saved variant needs is refused, and the optimizer keeps
  // its own options.
  TensorFile broken = file;
  broken.tensors.erase("optim.w.m_out");
  Matrix z = random_matrix(9, 6, 81);
  Pion fresh;
  fresh.add_param_group({z.param("w")}, 0.05, Pion::Options{});
  EXPECT_THROW(fresh.load_state(broken), Error);
  EXPECT_EQ(fresh.options(0).update_side, PionUpdateSide::Both);
  EXPECT_EQ(fresh.options(0).normalizer, PionNormalizer::Adam);
  // Group options written before the variants existed (no momentum, update_side, normalizer,
  // ns_steps) are the defaults; a saved combination that is not defined is refused.
  nlohmann::json old_keys = options_to_json(Pion::Options{});
  for (const char* key : {"momentum", "update_side", "normalizer", "ns_steps"}) old_keys.erase(key);
  old_keys["c"] = 0.3;
  fresh.set_group_options(0, old_keys);
  EXPECT_EQ(fresh.options(0).c, 0.3);
  EXPECT_EQ(fresh.options(0).momentum, PionMomentum::Lie);
  EXPECT_EQ(fresh.options(0).ns_steps, 5);
  nlohmann::json undefined = options_to_json(Pion::Options{});
  undefined["momentum"] = "ambient";
  undefined["normalizer"] = "msign";
  EXPECT_THROW(fresh.set_group_options(0, undefined), Error);
}

TEST(PionVariants, MsignWithAmbientMomentumIsAOneLineError) {
  for (PionMomentum momentum : {PionMomentum::Ambient, PionMomentum::Transported}) {
    Pion::Options o;
    o.momentum = momentum;
    o.normalizer = PionNormalizer::Msign;
    try {
      validate_options(o, "pion");
      ADD_FAILURE() << "msign with " << kPionMomenta.names[static_cast<int>(momentum)]
                    << " accepted";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("normalizer \"msign\" needs momentum \"lie\""), std::string::npos)
          << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
    // The group JSON of a checkpoint goes through the same check when an optimizer takes it.
    Matrix x = random_matrix(4, 3, 91);
    Pion opt;
    EXPECT_THROW(opt.add_param_group({x.param("w")}, 0.05, o), Error);
  }
  // Every field has its JSON key, and ns_steps its range.
  const nlohmann::json j = options_to_json(Pion::Options{});
  EXPECT_EQ(j.at("momentum"), "lie");
  EXPECT_EQ(j.at("update_side"), "both");
  EXPECT_EQ(j.at("normalizer"), "adam");
  EXPECT_EQ(j.at("ns_steps"), 5);
  Pion::Options bad;
  bad.ns_steps = 0;
  EXPECT_THROW(validate_options(bad, "pion"), Error);
}
