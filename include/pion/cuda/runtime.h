#pragma once
// The host-side face of the CUDA back end: device memory, a stream with its cuBLAS handle,
// copies. Plain C++17 with no CUDA types, so CPU code (and CPU-only builds that never link
// pion_cuda, as long as they do not call these) can include it; the definitions live in
// cuda/runtime.cu. Every CUDA or cuBLAS failure throws pion::Error naming the call and the
// CUDA error string.
#include <cstddef>
#include <memory>
#include <string>

namespace pion::cuda {

// Number of visible CUDA devices; 0 when the driver or a GPU is missing (never throws).
int device_count();
// "NVIDIA H100 80GB HBM3, sm_90, 79 GiB" for device 0 (throws pion::Error when there is none).
std::string device_description();
// Total memory of device 0 in bytes (throws pion::Error when there is none).
std::size_t device_memory_bytes();

// Owns n floats of device memory (cudaMalloc / cudaFree). Movable, not copyable.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t count);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  float* data() { return ptr_; }
  const float* data() const { return ptr_; }
  std::size_t size() const { return count_; }

  // Synchronous whole-buffer copies (count must equal size()); for set-up and checks, never
  // inside an optimizer step or a capture. They first wait for all work on the device
  // (cudaDeviceSynchronize), so they never race with a step queued on any stream.
  void upload(const float* host, std::size_t count);
  void download(float* host, std::size_t count) const;
  // Sets every byte to zero (synchronous, like the copies).
  void zero();

 private:
  float* ptr_ = nullptr;
  std::size_t count_ = 0;
};

// A CUDA stream with its own cuBLAS handle (plain fp32 math unless a GEMM asks for TF32 or
// bf16 tensor cores itself) and a fixed cuBLAS workspace, so work on it can be captured into
// a CUDA graph. Everything the optimizers launch goes onto this stream.
class Context {
 public:
  Context();
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // Waits for everything queued on the stream; throws on an asynchronous error.
  void synchronize();

  // Graph capture of the work queued between the two calls, then replay. end_capture
  // instantiates the graph; launch_graph queues one replay on the stream.
  void begin_capture();
  void end_capture();
  void launch_graph();
  // Ends a capture that failed part-way (a call inside it threw), discarding what was
  // recorded, so the stream can be used eagerly again. Never throws.
  void abort_capture() noexcept;

  struct Impl;  // CUDA types live in cuda/context.cuh
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace pion::cuda
