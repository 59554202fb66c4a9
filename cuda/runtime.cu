// Device memory, the stream + cuBLAS context and graph capture (include/pion/cuda/runtime.h).
#include <cuda_profiler_api.h>

#include <algorithm>
#include <iostream>
#include <utility>

#include "context.cuh"

namespace pion::cuda {

namespace {
// 32 MiB: cuBLAS's recommendation for Hopper is at least 32 MiB for best kernel choice.
constexpr std::size_t kWorkspaceBytes = std::size_t{32} << 20;

void require_device() {
  if (device_count() == 0)
    throw Error(
        "cuda: no CUDA device is visible (cudaGetDeviceCount reports none); run on a "
        "machine with an NVIDIA GPU or use the CPU optimizers");
}
}  // namespace

std::string device_description() {
  require_device();
  cudaDeviceProp prop{};
  PION_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  return std::string(prop.name) + ", sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + ", " + std::to_string(prop.totalGlobalMem >> 30) + " GiB";
}

std::size_t device_memory_bytes() {
  require_device();
  cudaDeviceProp prop{};
  PION_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  return prop.totalGlobalMem;
}

void profiler_start() {
  PION_CUDA_CHECK(cudaProfilerStart());
}

void profiler_stop() {
  PION_CUDA_CHECK(cudaProfilerStop());
}

DeviceBuffer::DeviceBuffer(std::size_t count) : count_(count) {
  if (count == 0) return;
  void* p = nullptr;
  PION_CUDA_CHECK(cudaMalloc(&p, count * sizeof(float)));
  ptr_ = static_cast<float*>(p);
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) cudaFree(ptr_);  // no throw from a destructor
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), count_(std::exchange(other.count_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    count_ = std::exchange(other.count_, 0);
  }
  return *this;
}

void DeviceBuffer::upload(const float* host, std::size_t count) {
  check(count == count_, "cuda: upload of " + std::to_string(count) + " floats into a buffer of " +
                             std::to_string(count_));
  if (count == 0) return;
  // The optimizers' streams are non-blocking: a plain cudaMemcpy would not wait for a step
  // still reading or writing this buffer.
  PION_CUDA_CHECK(cudaDeviceSynchronize());
  PION_CUDA_CHECK(cudaMemcpy(ptr_, host, count * sizeof(float), cudaMemcpyHostToDevice));
}

void DeviceBuffer::download(float* host, std::size_t count) const {
  check(count == count_, "cuda: download of " + std::to_string(count) +
                             " floats from a buffer of " + std::to_string(count_));
  if (count == 0) return;
  PION_CUDA_CHECK(cudaDeviceSynchronize());  // see upload
  PION_CUDA_CHECK(cudaMemcpy(host, ptr_, count * sizeof(float), cudaMemcpyDeviceToHost));
}

void DeviceBuffer::zero() {
  if (count_ == 0) return;
  PION_CUDA_CHECK(cudaDeviceSynchronize());  // see upload
  PION_CUDA_CHECK(cudaMemset(ptr_, 0, count_ * sizeof(float)));
  PION_CUDA_CHECK(cudaDeviceSynchronize());  // cudaMemset may return before it is done
}

Context::Context() : impl_(std::make_unique<Impl>()) {
  require_device();
  Impl& c = *impl_;
  PION_CUDA_CHECK(cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking));
  PION_CUBLAS_CHECK(cublasCreate(&c.blas));
  PION_CUBLAS_CHECK(cublasSetStream(c.blas, c.stream));
  // fp32 GEMMs stay fp32: no TF32 tensor cores unless a call asks for them (its compute type).
  PION_CUBLAS_CHECK(cublasSetMathMode(c.blas, CUBLAS_DEFAULT_MATH));
  PION_CUBLAS_CHECK(cublasSetPointerMode(c.blas, CUBLAS_POINTER_MODE_HOST));
  PION_CUDA_CHECK(cudaMalloc(&c.workspace, kWorkspaceBytes));
  PION_CUBLAS_CHECK(cublasSetWorkspace(c.blas, c.workspace, kWorkspaceBytes));
}

Context::~Context() {
  Impl& c = *impl_;
  c.graph = Graph();
  if (c.stream != nullptr) cudaStreamSynchronize(c.stream);
  if (c.blas != nullptr) cublasDestroy(c.blas);
  if (c.workspace != nullptr) cudaFree(c.workspace);
  if (c.stream != nullptr) cudaStreamDestroy(c.stream);
}

void Context::synchronize() {
  PION_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

struct Graph::Impl {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~Impl() {  // no throw from a destructor
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
};

Graph::Graph() = default;
Graph::~Graph() = default;
Graph::Graph(Graph&& other) noexcept = default;
Graph& Graph::operator=(Graph&& other) noexcept = default;

bool Graph::empty() const {
  return impl_ == nullptr;
}

namespace {
// Ends the capture under way on `stream` and instantiates what it recorded.
Graph::Impl* end_and_instantiate(cudaStream_t stream) {
  auto impl = std::make_unique<Graph::Impl>();
  PION_CUDA_CHECK(cudaStreamEndCapture(stream, &impl->graph));
  PION_CUDA_CHECK(cudaGraphInstantiate(&impl->exec, impl->graph, 0));
  return impl.release();
}
}  // namespace

Graph Graph::capture(Context& ctx, const std::function<void()>& queue) {
  ctx.begin_capture();
  Graph g;
  try {
    queue();
    g.impl_.reset(end_and_instantiate(ctx.impl().stream));
  } catch (...) {
    ctx.abort_capture();
    throw;
  }
  return g;
}

void Graph::launch(Context& ctx) const {
  check(impl_ != nullptr, "cuda: launch of an empty graph (capture one first)");
  PION_CUDA_CHECK(cudaGraphLaunch(impl_->exec, ctx.impl().stream));
}

GraphReplayer::GraphReplayer(std::string what, bool enabled)
    : what_(std::move(what)), enabled_(enabled) {}

void GraphReplayer::run(Context& ctx, double key, const std::function<void()>& queue) {
  if (!enabled_ || failed_) return queue();
  for (const auto& g : graphs_) {
    if (g.key != key) continue;
    g.graph.launch(ctx);
    ++counts_.replays;
    return;
  }
  if (std::find(eager_keys_.begin(), eager_keys_.end(), key) == eager_keys_.end()) {
    eager_keys_.push_back(key);
    return queue();
  }
  Graph graph;
  try {
    graph = Graph::capture(ctx, queue);
  } catch (const std::exception& e) {
    failed_ = true;
    std::cout << "note: " << what_ << " could not be captured into a CUDA graph (" << e.what()
              << "); running it eagerly\n";
    return queue();
  }
  graph.launch(ctx);
  ++counts_.captures;
  ++counts_.replays;
  graphs_.push_back({key, std::move(graph)});
}

void GraphReplayer::clear() {
  graphs_.clear();
  eager_keys_.clear();
}

void Context::begin_capture() {
  PION_CUDA_CHECK(cudaStreamBeginCapture(impl_->stream, cudaStreamCaptureModeThreadLocal));
}

void Context::end_capture() {
  Graph g;
  g.impl_.reset(end_and_instantiate(impl_->stream));
  impl_->graph = std::move(g);
}

void Context::abort_capture() noexcept {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(impl_->stream, &status) == cudaSuccess &&
      status != cudaStreamCaptureStatusNone) {
    cudaGraph_t graph = nullptr;
    if (cudaStreamEndCapture(impl_->stream, &graph) == cudaSuccess && graph != nullptr)
      cudaGraphDestroy(graph);
  }
  cudaGetLastError();  // clear the (non-sticky) error the failed call left behind
}

void Context::launch_graph() {
  check(!impl_->graph.empty(),
        "cuda: launch_graph before a capture (call begin_capture, "
        "queue the work, end_capture)");
  impl_->graph.launch(*this);
}

}  // namespace pion::cuda
