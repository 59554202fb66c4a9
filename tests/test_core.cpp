#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "pion/core/error.h"
#include "pion/core/linalg.h"
#include "pion/core/safetensors.h"
#include "helpers.h"

using namespace pion;

TEST(Tensor, ViewsShareStorage) {
  Tensor buf = Tensor::zeros({10});
  Tensor v = buf.view(4, {2, 3});
  v.data<float>()[0] = 5.0f;
  EXPECT_EQ(buf.data<float>()[4], 5.0f);
  EXPECT_THROW(buf.view(6, {2, 3}), Error);
  EXPECT_THROW(buf.data<double>(), Error);
}

TEST(Linalg, GemmMatchesNaiveLoop) {
  Tensor a = test::random_tensor({5, 7}, 1, 1.0, DType::F64);
  Tensor b = test::random_tensor({6, 7}, 2, 1.0, DType::F64);
  Tensor c = matmul(a, b, Trans::N, Trans::T);
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 6; ++j) {
      double s = 0;
      for (int k = 0; k < 7; ++k) s += a.data<double>()[i * 7 + k] * b.data<double>()[j * 7 + k];
      EXPECT_NEAR(c.data<double>()[i * 6 + j], s, 1e-12);
    }
}

TEST(Linalg, SvdReconstructsAndSolveInverts) {
  Tensor a = test::random_tensor({6, 4}, 3, 1.0, DType::F64);
  Svd d = svd(a);
  Tensor us = d.u.clone();
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 4; ++j) us.data<double>()[i * 4 + j] *= d.s.data<double>()[j];
  EXPECT_LT(max_abs_diff(matmul(us, d.vt), a), 1e-12);
  Tensor sq = test::random_tensor({4, 4}, 4, 1.0, DType::F64);
  Tensor rhs = test::random_tensor({4, 2}, 5, 1.0, DType::F64);
  EXPECT_LT(max_abs_diff(matmul(sq, solve(sq, rhs)), rhs), 1e-10);
}

TEST(Safetensors, RoundTripAndAtomicWrite) {
  auto dir = test::temp_dir("st");
  TensorFile f;
  f.tensors["a"] = test::random_tensor({3, 4}, 7);
  f.tensors["b"] = test::random_tensor({5}, 8, 1.0, DType::F64);
  f.metadata["k"] = "v";
  save_safetensors(dir + "/x.safetensors", f);
  EXPECT_FALSE(std::filesystem::exists(dir + "/x.safetensors.tmp"));
  TensorFile g = load_safetensors(dir + "/x.safetensors");
  EXPECT_EQ(g.metadata.at("k"), "v");
  EXPECT_EQ(max_abs_diff(g.tensors.at("a"), f.tensors.at("a")), 0.0);
  EXPECT_EQ(max_abs_diff(g.tensors.at("b"), f.tensors.at("b")), 0.0);
}

TEST(Safetensors, CorruptFilesGiveErrorsNotCrashes) {
  auto dir = test::temp_dir("stc");
  TensorFile f;
  f.tensors["a"] = test::random_tensor({8, 8}, 9);
  save_safetensors(dir + "/ok.safetensors", f);
  std::ifstream in(dir + "/ok.safetensors", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  EXPECT_THROW(load_safetensors(dir + "/missing.safetensors"), Error);
  // Every truncation and every single-byte corruption of the header must be caught or parse
  // to a file whose tensors fit: never a crash (ASan runs this too).
  for (std::size_t n = 0; n < bytes.size(); n += 7)
    EXPECT_THROW(parse_safetensors(bytes.substr(0, n), "trunc"), Error) << n;
  for (std::size_t i = 0; i < 8 + 80 && i < bytes.size(); ++i) {
    std::string bad = bytes;
    bad[i] = static_cast<char>(bad[i] ^ 0x5a);
    try {
      TensorFile g = parse_safetensors(bad, "flip");
      for (auto& [k, t] : g.tensors) EXPECT_LE(t.nbytes(), bytes.size());
    } catch (const Error&) {
    }
  }
}
