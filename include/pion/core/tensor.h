#pragma once
// A small dense tensor in host memory: shared storage + element offset + shape + dtype.
// Row-major and always contiguous. Views share storage and never own it alone, so a
// parameter can be a view into one big parameter buffer (llm.c style) while optimizer
// state tensors own their memory. No autograd: layers write their backward by hand.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace pion {

enum class DType { F32, F64, I32, U16 };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // safetensors spelling: "F32", "F64", "I32", "U16"

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::F32; }
template <>
constexpr DType dtype_of<double>() { return DType::F64; }
template <>
constexpr DType dtype_of<std::int32_t>() { return DType::I32; }
template <>
constexpr DType dtype_of<std::uint16_t>() { return DType::U16; }

using Shape = std::vector<std::int64_t>;
std::int64_t shape_numel(const Shape& shape);
std::string shape_string(const Shape& shape);  // "[64, 48]"

class Tensor {
 public:
  Tensor() = default;
  // Uninitialised / zero-filled tensors that own new storage.
  static Tensor empty(const Shape& shape, DType dtype = DType::F32);
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32);
  template <class T>
  static Tensor from_vector(const Shape& shape, const std::vector<T>& values);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  std::int64_t dim(int i) const { return shape_.at(static_cast<std::size_t>(i < 0 ? ndim() + i : i)); }
  std::int64_t numel() const { return shape_numel(shape_); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  // Rows and columns of a 2-D tensor (the only rank optimizers' matrix math uses).
  std::int64_t rows() const { return dim(0); }
  std::int64_t cols() const { return dim(1); }

  template <class T>
  T* data();
  template <class T>
  const T* data() const;
  template <class T>
  std::span<T> span() { return {data<T>(), static_cast<std::size_t>(numel())}; }
  template <class T>
  std::span<const T> span() const { return {data<T>(), static_cast<std::size_t>(numel())}; }
  std::byte* raw();
  const std::byte* raw() const;

  // A view of `shape` starting `offset` elements into this tensor's data (shares storage).
  Tensor view(std::int64_t offset, const Shape& shape) const;
  // Same data, new shape with the same number of elements (shares storage).
  Tensor reshape(const Shape& shape) const;
  // Deep copy into fresh storage, optionally converting dtype (F32 <-> F64).
  Tensor clone() const;
  Tensor to(DType dtype) const;
  // Copies `other`'s values (same numel and dtype) into this tensor's memory.
  void copy_from(const Tensor& other);
  void fill(double value);
  bool same_storage(const Tensor& other) const { return storage_ == other.storage_; }

 private:
  void check_dtype(DType expected) const;
  // 64-byte aligned host bytes, freed with the last tensor that views them (device memory
  // is the CUDA back end's own: pion/cuda/runtime.h).
  std::shared_ptr<std::byte> storage_;
  std::int64_t offset_ = 0;  // in elements
  Shape shape_;
  DType dtype_ = DType::F32;
};

template <class T>
T* Tensor::data() {
  check_dtype(dtype_of<T>());
  return reinterpret_cast<T*>(raw());
}
template <class T>
const T* Tensor::data() const {
  check_dtype(dtype_of<T>());
  return reinterpret_cast<const T*>(raw());
}
template <class T>
Tensor Tensor::from_vector(const Shape& shape, const std::vector<T>& values) {
  Tensor t = empty(shape, dtype_of<T>());
  if (static_cast<std::int64_t>(values.size()) != t.numel()) {
    throw std::invalid_argument("Tensor::from_vector: " + std::to_string(values.size()) +
                                " values for shape " + shape_string(shape));
  }
  std::copy(values.begin(), values.end(), t.data<T>());
  return t;
}

}  // namespace pion
