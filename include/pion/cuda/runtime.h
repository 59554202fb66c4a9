#pragma once
// The host-side face of the CUDA back end: device memory, a stream with its cuBLAS handle,
// copies. Plain C++17 with no CUDA types, so CPU code (and CPU-only builds that never link
// pion_cuda, as long as they do not call these) can include it; the definitions live in
// cuda/runtime.cu. Every CUDA or cuBLAS failure throws pion::Error naming the call and the
// CUDA error string.
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace pion::cuda {

// Number of visible CUDA devices. 0 only when there is no GPU: cudaGetDeviceCount says
// cudaErrorNoDevice, or no NVIDIA driver is installed at all (cudaErrorInsufficientDriver with
// cudaDriverGetVersion 0, the toolkit-without-driver CI machine) and no /dev/nvidiaN node
// exists. Every other CUDA error (a driver too old for this runtime, a GPU node without a
// usable driver, cudaErrorUnknown, ...) throws pion::Error with CUDA's error name and message
// and what to check: a broken GPU set-up must never read as "no GPU" (tests would skip).
int device_count();

// What device_count() asks the CUDA runtime, kept as plain data so that the rule above can be
// tested with made-up errors (classify_device_count) on machines with and without a GPU.
inline constexpr int kCudaSuccess = 0;
inline constexpr int kCudaErrorInsufficientDriver = 35;  // checked against CUDA's enum in device.cu
inline constexpr int kCudaErrorNoDevice = 100;
struct DeviceQuery {
  int error = kCudaSuccess;  // cudaGetDeviceCount's cudaError_t
  int count = 0;             // the count it reported
  std::string error_name;    // cudaGetErrorName / cudaGetErrorString of error
  std::string error_string;
  int driver_version = 0;    // cudaDriverGetVersion (1000 * major + 10 * minor; 0: no driver)
  int runtime_version = 0;   // cudaRuntimeGetVersion
  bool device_node = false;  // a /dev/nvidiaN node exists (the kernel driver sees a GPU)
};
// The device count for q, or throws pion::Error (the rule of device_count()).
int classify_device_count(const DeviceQuery& q);
// "NVIDIA H100 80GB HBM3, sm_90, 79 GiB" for device 0 (throws pion::Error when there is none).
std::string device_description();
// Total memory of device 0 in bytes (throws pion::Error when there is none).
std::size_t device_memory_bytes();

// cudaProfilerStart / cudaProfilerStop: the range that `nsys --capture-range=cudaProfilerApi`
// and `ncu --profile-from-start off` capture, and the window the CUDA emulator's EMU_COUNT
// counts (tools/cuda-emu/README.md). `pion bench train --profile_step` brackets one step.
void profiler_start();
void profiler_stop();

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

class Context;

// A captured and instantiated CUDA graph: the work one function queued on a Context's stream,
// replayed by launch() with one call instead of one launch per kernel. Movable, not copyable;
// a default-constructed Graph is empty.
class Graph {
 public:
  Graph();
  ~Graph();
  Graph(Graph&& other) noexcept;
  Graph& operator=(Graph&& other) noexcept;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // Records what `queue` puts on ctx's stream and instantiates it; nothing runs yet. `queue`
  // must not synchronise, allocate or copy synchronously (CUDA refuses those during a
  // capture), and every kernel it launches must have run once before (CUDA loads modules
  // lazily, which a capture must not do). If `queue` or the capture throws, what was recorded
  // is discarded, the stream can be used eagerly again, and the error propagates.
  static Graph capture(Context& ctx, const std::function<void()>& queue);
  // Queues one replay on ctx's stream (throws pion::Error when empty).
  void launch(Context& ctx) const;
  bool empty() const;

  struct Impl;

 private:
  friend class Context;  // its own begin_capture / end_capture keep one Graph
  std::unique_ptr<Impl> impl_;
};

// Work that is queued the same way again and again, replayed from CUDA graphs, one per key
// (e.g. a loss scale). Per key the first run is eager (CUDA loads kernels lazily, which a
// capture must not do), the second is captured and replayed, and later runs replay. If a
// capture fails, a note naming `what` is printed once and every later run is eager. Shared by
// the model's forward/backward pass and the optimizer step.
class GraphReplayer {
 public:
  GraphReplayer(std::string what, bool enabled);
  // Queues `queue`'s work on ctx's stream: eagerly, or as one graph launch.
  void run(Context& ctx, double key, const std::function<void()>& queue);
  // Drops every graph and the record of eager runs (the buffers the graphs point into moved).
  void clear();
  // Runs that replayed a graph (a capture's run included), and graphs captured.
  struct Counts {
    std::int64_t replays = 0, captures = 0;
  };
  Counts counts() const { return counts_; }

 private:
  struct Captured {
    double key = 0.0;
    Graph graph;
  };
  std::string what_;
  bool enabled_;
  bool failed_ = false;  // a capture threw: eager from then on
  std::vector<double> eager_keys_;
  std::vector<Captured> graphs_;
  Counts counts_;
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

// How many cuBLAS GEMM calls of each kind this process has queued (relaxed atomic counters,
// host side: a captured graph's replays add nothing): tests check which path a batched GEMM
// took (cuda/gemm.cuh).
struct GemmCallCounts {
  long long single = 0, strided = 0, pointer_array = 0;
};
GemmCallCounts gemm_call_counts();

}  // namespace pion::cuda
