// `pion optim-trace` and the optimizer factory: parity of the fp32 optimizers with the fp64
// references through tests/reference/trace_check.py, and every bad-input path of the command
// (exit code 2, one "pion: error:" line, no output file).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <string>

#include "helpers.h"
#include "pion/core/error.h"
#include "pion/core/safetensors.h"
#include "pion/optim/factory.h"
#include "pion/optim/pion.h"

namespace pion {
namespace {

namespace fs = std::filesystem;
using test::CommandResult;

// ---- parity with the fp64 references -------------------------------------------------

// Runs trace_check.py for one optimizer, prints its report, and checks every "METRIC" line:
// within the script's threshold, and above 0 (exactly 0 would mean fp32 was compared with
// itself, a vacuous pass).
void check_parity(const std::string& optimizer, const std::string& modules, int expected_metrics,
                  const std::string& extra_args = "") {
  if (!test::python_has(modules)) {
    GTEST_SKIP() << test::python() << " lacks one of: " << modules << "; install them to run the "
                 << optimizer << " parity check";
  }
  const std::string script = test::source_dir() + "/tests/reference/trace_check.py";
  const CommandResult r = test::run_command(test::python() + " " + script + " --optimizer " +
                                            optimizer + " --pion " + PION_BINARY + " " +
                                            extra_args);
  std::cout << r.output;
  ASSERT_EQ(r.exit_code, 0) << "trace_check.py failed (exit " << r.exit_code << "):\n" << r.output;
  const std::regex metric_line(R"(METRIC (\S+) (\S+) (\S+) (PASS|FAIL))");
  int found = 0;
  for (std::sregex_iterator it(r.output.begin(), r.output.end(), metric_line), end; it != end;
       ++it) {
    const double metric = std::stod((*it)[2]);
    const double threshold = std::stod((*it)[3]);
    EXPECT_TRUE(std::isfinite(metric) && metric > 0.0) << (*it)[0];
    EXPECT_LE(metric, threshold) << (*it)[0];
    EXPECT_EQ((*it)[4], "PASS") << (*it)[0];
    ++found;
  }
  EXPECT_EQ(found, expected_metrics) << r.output;
}

TEST(OptimTraceParity, AdamWMatchesTorchFp64) {
  check_parity("adamw", "numpy torch", 1);
}
TEST(OptimTraceParity, MuonMatchesFp64Reference) {
  check_parity("muon", "numpy", 1);
}
// taylor2, cayley and exp, each against the fp64 reference.
TEST(OptimTraceParity, PionMatchesFp64ReferenceForEveryRetraction) {
  check_parity("pion", "numpy", 3);
}
// Every Pion variant (issue 11): momentum lie / ambient / transported x update_side both /
// left / right / alternate with the adam normalizer (12), and msign with each side (4), each
// with taylor2, cayley and exp: 48 configurations on 64x48, 48x96 and 33x33, 20 steps, against
// the fp64 reference written from the definitions (tests/reference/pion_ref.py). Thresholds:
// 1e-5 (adam), 1e-4 (msign).
TEST(OptimTraceParity, PionVariantsMatchFp64Reference) {
  check_parity("pion", "numpy", 48, "--variants");
}

// ---- the command on good and bad input ------------------------------------------------

class OptimTraceCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::temp_dir("optim_trace");
    out_ = dir_ + "/out.safetensors";
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A valid trace: matrices of the given shapes, `steps` random gradients each.
  TensorFile make_trace(std::int64_t steps = 4) const {
    TensorFile f;
    const std::vector<Shape> shapes = {{6, 4}, {3, 5}};
    std::uint64_t seed = 17;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      f.tensors["W." + std::to_string(i)] = test::random_tensor(shapes[i], seed++, 0.5);
      for (std::int64_t t = 0; t < steps; ++t) {
        f.tensors["g." + std::to_string(i) + "." + std::to_string(t)] =
            test::random_tensor(shapes[i], seed++);
      }
    }
    return f;
  }
  std::string write(const TensorFile& f, const std::string& name = "in.safetensors") const {
    const std::string path = dir_ + "/" + name;
    save_safetensors(path, f);
    return path;
  }
  std::string write_bytes(const std::string& bytes, const std::string& name) const {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
  static std::string read_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  CommandResult trace(const std::string& optimizer, const std::string& config,
                      const std::string& input) const {
    return test::run_pion("optim-trace --optimizer " + optimizer + " --config '" + config +
                          "' --input '" + input + "' --output '" + out_ + "'");
  }
  // The contract for bad input: exit code 2, exactly one line "pion: error: ..." mentioning
  // `needle`, and no output file (nor a leftover temporary).
  void expect_rejected(const CommandResult& r, const std::string& needle) const {
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_TRUE(r.output.starts_with("pion: error: ")) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    EXPECT_TRUE(r.output.ends_with("\n")) << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos)
        << "expected '" << needle << "' in " << r.output;
    EXPECT_FALSE(fs::exists(out_)) << "output written despite the error";
    EXPECT_FALSE(fs::exists(out_ + ".tmp")) << "temporary left behind";
  }

  std::string dir_;
  std::string out_;
};

TEST_F(OptimTraceCli, WritesFinalWeightsAndASummaryForEveryOptimizer) {
  const TensorFile in = make_trace(4);
  const std::string path = write(in);
  for (const std::string kind : {"adamw", "muon", "pion"}) {
    fs::remove(out_);
    const CommandResult r = trace(kind, R"({"lr": 0.01})", path);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("applied 4 steps to 2 matrices (0 skipped"), std::string::npos)
        << r.output;
    const TensorFile out = load_safetensors(out_);
    ASSERT_EQ(out.tensors.size(), 2u);
    for (const std::string name : {"W.0", "W.1"}) {
      const Tensor& w = out.tensors.at(name);
      const Tensor& w0 = in.tensors.at(name);
      ASSERT_EQ(w.shape(), w0.shape());
      double moved = 0;
      for (std::int64_t k = 0; k < w.numel(); ++k) {
        ASSERT_TRUE(std::isfinite(w.data<float>()[k]));
        moved += std::abs(w.data<float>()[k] - w0.data<float>()[k]);
      }
      EXPECT_GT(moved, 0.0) << kind << " left " << name << " unchanged";
    }
    EXPECT_EQ(out.metadata.at("optimizer"), kind);
    EXPECT_EQ(out.metadata.at("steps"), "4");
  }
}

TEST_F(OptimTraceCli, ConfigFromAFileEqualsInlineConfig) {
  const std::string path = write(make_trace(3));
  const std::string config = R"({"lr": 0.02, "c": 0.3, "retraction": "cayley"})";
  ASSERT_EQ(trace("pion", config, path).exit_code, 0);
  const std::string inline_result = read_bytes(out_);
  const std::string config_path = write_bytes(config, "config.json");
  fs::remove(out_);
  const CommandResult r = trace("pion", config_path, path);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_bytes(out_), inline_result);
  // And the config matters: another lr gives other weights.
  fs::remove(out_);
  ASSERT_EQ(trace("pion", R"({"lr": 0.03, "c": 0.3, "retraction": "cayley"})", path).exit_code, 0);
  EXPECT_NE(read_bytes(out_), inline_result);
}

TEST_F(OptimTraceCli, NonFiniteGradientsSkipStepsAndAreCounted) {
  TensorFile in = make_trace(3);
  in.tensors.at("g.1.1").data<float>()[2] = std::nanf("");
  const CommandResult r = trace("adamw", "{}", write(in));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("(1 skipped"), std::string::npos) << r.output;
  EXPECT_EQ(load_safetensors(out_).metadata.at("skipped_steps"), "1");
}

TEST_F(OptimTraceCli, RejectsRandomBytes) {
  std::mt19937_64 rng(std::random_device{}());
  std::string bytes(4096, '\0');
  for (char& c : bytes) c = static_cast<char>(rng());
  expect_rejected(trace("pion", "{}", write_bytes(bytes, "random.safetensors")), "random");
}

TEST_F(OptimTraceCli, RejectsTruncatedFiles) {
  const std::string whole = read_bytes(write(make_trace(2)));
  ASSERT_GT(whole.size(), 200u);
  // Inside the length prefix, inside the JSON header, and inside the data section.
  for (std::size_t keep : {std::size_t{5}, std::size_t{40}, whole.size() - 7}) {
    expect_rejected(trace("adamw", "{}", write_bytes(whole.substr(0, keep), "cut.safetensors")),
                    "cut.safetensors");
  }
}

TEST_F(OptimTraceCli, RejectsAMissingInputFile) {
  expect_rejected(trace("pion", "{}", dir_ + "/absent.safetensors"), "absent.safetensors");
}

TEST_F(OptimTraceCli, RejectsUnknownConfigKeysForEveryOptimizer) {
  const std::string path = write(make_trace(2));
  for (const std::string kind : {"adamw", "muon", "pion"}) {
    const CommandResult r = trace(kind, R"({"lr": 0.01, "betaa1": 0.9})", path);
    expect_rejected(r, "betaa1");
    EXPECT_NE(r.output.find("valid keys for " + kind + ": lr, "), std::string::npos) << r.output;
  }
}

TEST_F(OptimTraceCli, RejectsWrongTypesAndInvalidValues) {
  const std::string path = write(make_trace(2));
  expect_rejected(trace("pion", R"({"c": "big"})", path), "'c'");
  expect_rejected(trace("pion", R"({"c": -1})", path), "'c'");
  expect_rejected(trace("pion", R"({"retraction": "qr"})", path), "'retraction'");
  expect_rejected(trace("pion", R"({"reanchor_every": 2.5})", path), "'reanchor_every'");
  expect_rejected(trace("pion", R"({"momentum": "euclid"})", path), "'momentum'");
  expect_rejected(trace("pion", R"({"update_side": "top"})", path), "'update_side'");
  expect_rejected(trace("pion", R"({"normalizer": "rms"})", path), "'normalizer'");
  expect_rejected(trace("pion", R"({"ns_steps": 0})", path), "'ns_steps'");
  // A combination that is not defined: msign orthogonalises the Lie-algebra buffers only.
  expect_rejected(trace("pion", R"({"normalizer": "msign", "momentum": "ambient"})", path),
                  "normalizer \"msign\" needs momentum \"lie\"");
  expect_rejected(trace("adamw", R"({"beta2": 1.0})", path), "'beta2'");
  expect_rejected(trace("muon", R"({"nesterov": "yes"})", path), "'nesterov'");
  expect_rejected(trace("muon", R"({"ns_steps": 0})", path), "'ns_steps'");
  expect_rejected(trace("muon", R"({"lr": true})", path), "'lr'");
  expect_rejected(trace("adamw", R"([1, 2])", path), "JSON object");
  expect_rejected(trace("adamw", R"({"lr": )", path), "not valid JSON");
  expect_rejected(trace("adamw", dir_ + "/no_such_config.json", path), "no_such_config.json");
}

TEST_F(OptimTraceCli, RejectsAnUnknownOptimizer) {
  expect_rejected(trace("sgd", "{}", write(make_trace(2))), "adamw|muon|pion");
}

TEST_F(OptimTraceCli, RejectsAMissingGradient) {
  TensorFile in = make_trace(5);
  in.tensors.erase("g.1.3");  // g.0.3 is still there
  expect_rejected(trace("pion", "{}", write(in)), "g.1.3");
}

TEST_F(OptimTraceCli, RejectsAGradientWhoseShapeDiffersFromItsMatrix) {
  TensorFile in = make_trace(3);
  in.tensors["g.0.2"] = test::random_tensor({4, 6}, 99);  // W.0 is 6 x 4
  expect_rejected(trace("muon", "{}", write(in)), "g.0.2");
}

TEST_F(OptimTraceCli, RejectsMalformedTraces) {
  {
    TensorFile in = make_trace(2);
    in.tensors["W.0"] = test::random_tensor({6, 4, 1}, 5);
    expect_rejected(trace("pion", "{}", write(in)), "2-D");
  }
  {
    TensorFile in = make_trace(2);
    in.tensors["W.1"] = test::random_tensor({3, 5}, 5, 1.0, DType::F64);
    expect_rejected(trace("pion", "{}", write(in)), "F64");
  }
  {
    TensorFile in = make_trace(2);
    in.tensors.erase("W.0");
    in.tensors.erase("W.1");
    expect_rejected(trace("pion", "{}", write(in)), "W.0");
  }
  {
    TensorFile in = make_trace(2);
    in.tensors.erase("W.0");  // W.1 without W.0
    expect_rejected(trace("adamw", "{}", write(in)), "W.0");
  }
  {
    TensorFile in = make_trace(2);
    in.tensors["bias"] = test::random_tensor({3}, 5);
    expect_rejected(trace("adamw", "{}", write(in)), "bias");
  }
  {
    TensorFile in = make_trace(2);
    in.tensors["g.7.0"] = test::random_tensor({3, 5}, 5);
    expect_rejected(trace("adamw", "{}", write(in)), "W.7");
  }
  {
    TensorFile in = make_trace(0);
    expect_rejected(trace("adamw", "{}", write(in)), "no gradients");
  }
}

TEST_F(OptimTraceCli, CommandLineMistakesAreOneLineErrors) {
  const std::string path = write(make_trace(2));
  expect_rejected(test::run_pion("optim-trace --optimizer pion --output '" + out_ + "'"),
                  "--input");
  expect_rejected(test::run_pion("optim-trace --optimizer pion --input '" + path + "' --output '" +
                                 out_ + "' --bogus"),
                  "--bogus");
}

// ---- the factory itself --------------------------------------------------------------------

std::vector<Param> one_matrix() {
  return {Param{"w", test::random_tensor({5, 3}, 1), test::random_tensor({5, 3}, 2)}};
}

TEST(OptimizerFactory, MissingKeysTakeTheOptimizersDefaults) {
  for (const std::string& kind : optimizer_kinds()) {
    auto opt = make_optimizer(kind, nlohmann::json::object(), one_matrix());
    EXPECT_EQ(opt->kind(), kind);
    ASSERT_EQ(opt->groups().size(), 1u);
    EXPECT_EQ(opt->groups()[0].lr, default_lr(kind));
  }
  auto pion = make_optimizer("pion", nlohmann::json::object(), one_matrix());
  const Pion::Options defaults;
  EXPECT_EQ(pion->group_options(0).at("c").get<double>(), defaults.c);
  EXPECT_EQ(pion->group_options(0).at("eps").get<double>(), defaults.eps);
}

TEST(OptimizerFactory, AppliesEveryKey) {
  const nlohmann::json config = {{"lr", 0.123},        {"c", 0.7},    {"beta1", 0.5},
                                 {"beta2", 0.75},      {"eps", 1e-6}, {"retraction", "exp"},
                                 {"reanchor_every", 9}, {"momentum", "transported"},
                                 {"update_side", "alternate"}, {"ns_steps", 7}};
  auto opt = make_optimizer("pion", config, one_matrix());
  EXPECT_EQ(opt->groups()[0].lr, 0.123);
  const auto& pion = dynamic_cast<const Pion&>(*opt);
  EXPECT_EQ(pion.options(0).c, 0.7);
  EXPECT_EQ(pion.options(0).beta1, 0.5);
  EXPECT_EQ(pion.options(0).beta2, 0.75);
  EXPECT_EQ(pion.options(0).eps, 1e-6);
  EXPECT_EQ(pion.options(0).retraction, PionRetraction::Exp);
  EXPECT_EQ(pion.options(0).reanchor_every, 9);
  EXPECT_EQ(pion.options(0).momentum, PionMomentum::Transported);
  EXPECT_EQ(pion.options(0).update_side, PionUpdateSide::Alternate);
  EXPECT_EQ(pion.options(0).normalizer, PionNormalizer::Adam);
  EXPECT_EQ(pion.options(0).ns_steps, 7);
  const auto msign = make_optimizer("pion", {{"normalizer", "msign"}, {"update_side", "right"}},
                                    one_matrix());
  EXPECT_EQ(dynamic_cast<const Pion&>(*msign).options(0).normalizer, PionNormalizer::Msign);
  EXPECT_EQ(dynamic_cast<const Pion&>(*msign).options(0).update_side, PionUpdateSide::Right);

  auto muon = make_optimizer(
      "muon", {{"momentum", 0.8}, {"nesterov", false}, {"ns_steps", 3}, {"weight_decay", 0.2}},
      one_matrix());
  EXPECT_EQ(muon->group_options(0).at("momentum").get<double>(), 0.8);
  EXPECT_EQ(muon->group_options(0).at("nesterov").get<bool>(), false);
  EXPECT_EQ(muon->group_options(0).at("ns_steps").get<int>(), 3);

  auto adamw = make_optimizer("adamw", {{"weight_decay", 0.3}, {"beta1", 0.8}}, one_matrix());
  EXPECT_EQ(adamw->group_options(0).at("weight_decay").get<double>(), 0.3);
  EXPECT_EQ(adamw->group_options(0).at("beta1").get<double>(), 0.8);
}

TEST(OptimizerFactory, ErrorsNameTheKeyAndListTheValidOnes) {
  try {
    make_optimizer("muon", {{"momentun", 0.9}}, one_matrix());
    FAIL() << "no error for an unknown key";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("momentun"), std::string::npos) << what;
    EXPECT_NE(what.find("lr, momentum, nesterov, ns_steps, weight_decay"), std::string::npos)
        << what;
  }
  EXPECT_THROW(make_optimizer("adam", nlohmann::json::object(), one_matrix()), Error);
  // A value the optimizer itself rejects (here: a 1-D parameter for Pion) is a pion::Error too.
  std::vector<Param> vec = {Param{"b", test::random_tensor({4}, 1), test::random_tensor({4}, 2)}};
  EXPECT_THROW(make_optimizer("pion", nlohmann::json::object(), vec), Error);
}

}  // namespace
}  // namespace pion
