#include "pion/core/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "pion/core/error.h"

namespace pion {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::I32: return 4;
    case DType::U16: return 2;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::I32: return "I32";
    case DType::U16: return "U16";
  }
  return "?";
}

std::int64_t shape_numel(const Shape& shape) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::string shape_string(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace {

std::shared_ptr<std::byte> allocate_storage(std::size_t bytes) {
  // aligned_alloc needs a size that is a multiple of the alignment; 64 bytes suits AVX-512.
  std::size_t rounded = ((std::max<std::size_t>(bytes, 1) + 63) / 64) * 64;
  auto* data = static_cast<std::byte*>(std::aligned_alloc(64, rounded));
  if (!data) throw std::bad_alloc();
  return std::shared_ptr<std::byte>(data, [](std::byte* p) { std::free(p); });
}

}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype) {
  for (auto d : shape) check(d >= 0, "Tensor: negative dimension in shape " + shape_string(shape));
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.storage_ = allocate_storage(t.nbytes());
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  std::memset(t.raw(), 0, t.nbytes());
  return t;
}

void Tensor::check_dtype(DType expected) const {
  check(storage_ != nullptr, "Tensor: access to an undefined tensor");
  check(dtype_ == expected, std::string("Tensor: dtype is ") + dtype_name(dtype_) + ", accessed as " +
                                dtype_name(expected));
}

std::byte* Tensor::raw() {
  check(storage_ != nullptr, "Tensor: access to an undefined tensor");
  return storage_.get() + offset_ * static_cast<std::int64_t>(dtype_size(dtype_));
}
const std::byte* Tensor::raw() const {
  check(storage_ != nullptr, "Tensor: access to an undefined tensor");
  return storage_.get() + offset_ * static_cast<std::int64_t>(dtype_size(dtype_));
}

Tensor Tensor::view(std::int64_t offset, const Shape& shape) const {
  check(defined(), "Tensor::view of an undefined tensor");
  std::int64_t n = shape_numel(shape);
  check(offset >= 0 && offset + n <= numel(),
        "Tensor::view: " + shape_string(shape) + " at offset " + std::to_string(offset) +
            " does not fit in " + shape_string(shape_));
  Tensor t = *this;
  t.offset_ = offset_ + offset;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::reshape(const Shape& shape) const {
  check(shape_numel(shape) == numel(),
        "Tensor::reshape: " + shape_string(shape_) + " to " + shape_string(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::clone() const { return to(dtype_); }

Tensor Tensor::to(DType dtype) const {
  Tensor t = empty(shape_, dtype);
  if (dtype == dtype_) {
    std::memcpy(t.raw(), raw(), nbytes());
  } else if (dtype_ == DType::F32 && dtype == DType::F64) {
    std::copy_n(data<float>(), numel(), t.data<double>());
  } else if (dtype_ == DType::F64 && dtype == DType::F32) {
    const double* src = data<double>();
    float* dst = t.data<float>();
    for (std::int64_t i = 0; i < numel(); ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    throw Error(std::string("Tensor::to: no conversion from ") + dtype_name(dtype_) + " to " +
                dtype_name(dtype));
  }
  return t;
}

void Tensor::copy_from(const Tensor& other) {
  check(other.numel() == numel() && other.dtype() == dtype_,
        "Tensor::copy_from: " + shape_string(other.shape()) + " " + dtype_name(other.dtype()) +
            " into " + shape_string(shape_) + " " + dtype_name(dtype_));
  std::memmove(raw(), other.raw(), nbytes());
}

void Tensor::fill(double value) {
  switch (dtype_) {
    case DType::F32: std::fill_n(data<float>(), numel(), static_cast<float>(value)); break;
    case DType::F64: std::fill_n(data<double>(), numel(), value); break;
    case DType::I32: std::fill_n(data<std::int32_t>(), numel(), static_cast<std::int32_t>(value)); break;
    case DType::U16: std::fill_n(data<std::uint16_t>(), numel(), static_cast<std::uint16_t>(value)); break;
  }
}

}  // namespace pion
