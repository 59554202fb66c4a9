// `pion optim-trace --device cuda` against the independent fp64 references
// (tests/reference/trace_check.py, the same check test_optim_trace.cpp runs for the CPU):
// the GPU optimizers on random traces, fp32 to the CPU's thresholds, Pion mixed (TF32 GEMMs)
// and Muon bf16 to looser ones. Everywhere: `--device cuda` gives a clear one-line error when
// this build has no CUDA back end or the machine has no GPU. On a GPU machine whose numpy
// lives in another Python than Debian's, point $PION_PYTHON at it (scripts/gpu-check.sh does).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <regex>

#include "helpers.h"
#include "pion/core/safetensors.h"

using namespace pion;

namespace {

bool has_gpu() { return test::cuda_device_present(); }

// Runs trace_check.py with `extra` arguments and checks its METRIC lines (within threshold,
// above 0: exactly 0 would mean fp32 was compared with itself).
void check_gpu_parity(const std::string& optimizer, const std::string& extra) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device (or no CUDA back end): run scripts/gpu-check.sh";
  if (!test::python_has("numpy"))
    GTEST_SKIP() << test::python() << " lacks numpy; set PION_PYTHON to a Python with numpy";
  const std::string script = test::source_dir() + "/tests/reference/trace_check.py";
  const auto r = test::run_command(test::python() + " " + script + " --optimizer " + optimizer +
                                   " --pion " + PION_BINARY + " " + extra);
  std::cout << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::regex metric(R"(METRIC (\S+) (\S+) (\S+) (PASS|FAIL))");
  int found = 0;
  for (std::sregex_iterator it(r.output.begin(), r.output.end(), metric), end; it != end; ++it) {
    const double m = std::stod((*it)[2]);
    EXPECT_TRUE(std::isfinite(m) && m > 0.0) << (*it)[0];
    EXPECT_EQ((*it)[4], "PASS") << (*it)[0];
    ++found;
  }
  EXPECT_GE(found, 1) << r.output;
}

}  // namespace

TEST(CudaOptimTrace, ClearErrorWithoutGpu) {
  if (has_gpu()) GTEST_SKIP() << "this machine has a GPU: the error path is not reachable";
  const std::string dir = test::temp_dir("cuda-trace");
  TensorFile trace;
  trace.tensors["W.0"] = test::random_tensor({6, 4}, 1);
  trace.tensors["g.0.0"] = test::random_tensor({6, 4}, 2);
  save_safetensors(dir + "/trace.safetensors", trace);
  const auto r = test::run_pion("optim-trace --optimizer pion --device cuda --input " + dir +
                                "/trace.safetensors --output " + dir + "/out.safetensors");
  EXPECT_EQ(r.exit_code, 2) << r.output;
#ifdef PION_HAVE_CUDA
  EXPECT_NE(r.output.find("no CUDA device is visible"), std::string::npos) << r.output;
#else
  EXPECT_NE(r.output.find("built without the CUDA back end"), std::string::npos) << r.output;
#endif
  EXPECT_FALSE(std::filesystem::exists(dir + "/out.safetensors"));
  const auto bad = test::run_pion("optim-trace --optimizer pion --device tpu --input x --output y");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.output.find("--device must be cpu or cuda"), std::string::npos) << bad.output;
}

TEST(CudaOptimTrace, AdamWMatchesFp64Reference) {
  check_gpu_parity("adamw", "--pion-args '--device cuda'");
}
TEST(CudaOptimTrace, MuonFp32MatchesFp64Reference) {
  check_gpu_parity("muon", "--pion-args '--device cuda --precision fp32'");
}
TEST(CudaOptimTrace, MuonBf16StaysClose) {
  check_gpu_parity("muon", "--threshold 3e-2 --pion-args '--device cuda --precision bf16'");
}
TEST(CudaOptimTrace, PionFp32MatchesFp64Reference) {
  check_gpu_parity("pion", "--retraction taylor2 --pion-args '--device cuda --precision fp32'");
}
// Every Pion variant (issue 11: momentum x update_side with adam, lie x update_side with
// msign) on the GPU, fp32, against the fp64 reference at the CPU's thresholds.
TEST(CudaOptimTrace, PionVariantsFp32MatchFp64Reference) {
  check_gpu_parity("pion",
                   "--retraction taylor2 --variants --pion-args '--device cuda --precision fp32'");
}
TEST(CudaOptimTrace, PionMixedStaysClose) {
  check_gpu_parity("pion",
                   "--retraction taylor2 --threshold 5e-3 "
                   "--pion-args '--device cuda --precision mixed'");
}
