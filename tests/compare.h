#pragma once
// Comparisons of tensors and checkpoints that several test files make the same way: bit for
// bit, and the fp64 distances their tolerances are written against.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "pion/core/linalg.h"
#include "pion/core/safetensors.h"
#include "pion/core/tensor.h"

namespace pion::test {

// Same shape, dtype and bytes.
inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// ||a - b||_F in double, whatever the dtypes.
inline double diff_norm(const Tensor& a, const Tensor& b) {
  Tensor a64 = a.to(DType::F64), b64 = b.to(DType::F64);
  double s = 0;
  for (std::int64_t i = 0; i < a64.numel(); ++i) {
    const double d = a64.data<double>()[i] - b64.data<double>()[i];
    s += d * d;
  }
  return std::sqrt(s);
}

// ||a - b||_F / ||b||_F in fp64.
inline double rel_frobenius_diff(const Tensor& a, const Tensor& b) {
  return diff_norm(a, b) / frobenius_norm(b.to(DType::F64));
}

// Largest |a - b| over max |b|, for two same-sized tensors.
inline double rel_max_diff(const Tensor& a, const Tensor& b) {
  Tensor x = a.to(DType::F64), y = b.to(DType::F64);
  double err = 0, ref = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    err = std::max(err, std::abs(x.data<double>()[i] - y.data<double>()[i]));
    ref = std::max(ref, std::abs(y.data<double>()[i]));
  }
  return err / std::max(ref, 1e-300);
}

// Both checkpoints hold the same tensors, bit for bit (a resumed run against a straight one).
inline void expect_same_tensors(const TensorFile& a, const TensorFile& b) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, t] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(name)) << name;
    const Tensor& u = b.tensors.at(name);
    ASSERT_EQ(t.nbytes(), u.nbytes()) << name;
    EXPECT_EQ(0, std::memcmp(t.raw(), u.raw(), t.nbytes())) << name << " differs after resume";
  }
}
inline void expect_same_tensors(const std::string& path_a, const std::string& path_b) {
  expect_same_tensors(load_safetensors(path_a), load_safetensors(path_b));
}

}  // namespace pion::test
