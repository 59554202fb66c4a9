#pragma once
// CPU emulation of the parts of CUDA (runtime API, device built-ins, cuBLAS) that pion's
// cuda/ sources use. Force-included (g++ -include) into every preprocessed .cu file; the
// kernel launch syntax is rewritten by tools/cuda-emu/preprocess.py into ::emu::Launch(...).
// Implementation: tools/cuda-emu/src/runtime.cpp (scheduler, runtime API) and cublas.cpp.
//
// Execution model: every stream operation runs synchronously on the calling host thread
// (under stream capture it is recorded into the graph instead and runs on cudaGraphLaunch).
// A kernel runs block after block; inside a block every CUDA thread is a coroutine with its
// own stack, switched only at __syncthreads / __syncwarp / warp shuffles, which are real
// barriers (over the block's live threads, or over the warp's 32 lanes).
#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))  // as CUDA defines it: allowed anywhere
#define __constant__ static
#define __managed__
// Static shared memory: one copy per variable (blocks run one at a time on one host thread),
// so a block sees what the previous block left there, as on a GPU it sees garbage. (A named
// section, to poison it before every block, is not possible: GCC refuses to mix the statics of
// inline functions, which are COMDAT, with other variables in one section.)
#define __shared__ static __attribute__((aligned(16)))
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#define CUDART_VERSION 13000

// ---- built-in vector types and indices -------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
struct int2 {
  int x, y;
};

// Set by the scheduler before it resumes a thread (a coroutine switch is an opaque call, so
// kernel code reloads them after every barrier).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {
// Barriers and warp exchange (runtime.cpp). site = file:line of the call.
void syncthreads(const char* file, int line);
int syncthreads_op(int pred, int op, const char* file, int line);  // op 0 or, 1 and, 2 count
void syncwarp(unsigned mask, const char* file, int line);
// Writes size bytes of v into this lane's slot, waits for the warp; returns the slot array
// (32 slots of 16 bytes) of this exchange and the mask of lanes that took part.
const unsigned char* warp_exchange(unsigned mask, const void* v, std::size_t size,
                                   unsigned* participants, const char* file, int line);
void warn(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
unsigned lane_id();
void* dynamic_shared_base();
template <class T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_base());
}

template <class T>
T shfl_from(unsigned mask, T v, int src_of_lane_kind, int arg, int width, const char* file,
            int line) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a large type");
  unsigned part = 0;
  const unsigned char* slots = warp_exchange(mask, &v, sizeof(T), &part, file, line);
  const unsigned lane = lane_id();
  const unsigned w = static_cast<unsigned>(width);
  const unsigned base = lane & ~(w - 1);
  unsigned src = lane;
  switch (src_of_lane_kind) {
    case 0:  // xor
      src = base + ((lane - base) ^ static_cast<unsigned>(arg)) % w;
      break;
    case 1:  // idx
      src = base + static_cast<unsigned>(arg) % w;
      break;
    case 2:  // down
      src = (lane - base) + static_cast<unsigned>(arg) < w ? lane + static_cast<unsigned>(arg) : lane;
      break;
    case 3:  // up
      src = lane - base >= static_cast<unsigned>(arg) ? lane - static_cast<unsigned>(arg) : lane;
      break;
  }
  if (src >= 32 || !(part & (1u << src))) {
    warn("%s:%d: warp shuffle on lane %u reads lane %u, which did not take part (exited or "
         "outside the mask): undefined value on a GPU",
         file, line, lane, src);
    return v;
  }
  T out;
  std::memcpy(&out, slots + 16 * src, sizeof(T));
  return out;
}
}  // namespace emu

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_or(p) ::emu::syncthreads_op((p) ? 1 : 0, 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::emu::syncthreads_op((p) ? 1 : 0, 1, __FILE__, __LINE__)
#define __syncthreads_count(p) ::emu::syncthreads_op((p) ? 1 : 0, 2, __FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(::emu::mask_or_full(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, o, ...) \
  ::emu::shfl_from(mask, v, 0, o, ::emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(mask, v, s, ...) \
  ::emu::shfl_from(mask, v, 1, s, ::emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::emu::shfl_from(mask, v, 2, d, ::emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::emu::shfl_from(mask, v, 3, d, ::emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)

namespace emu {
constexpr unsigned mask_or_full() { return 0xffffffffu; }
constexpr unsigned mask_or_full(unsigned m) { return m; }
constexpr int width_or_32() { return 32; }
constexpr int width_or_32(int w) { return w; }
}  // namespace emu

// ---- memory fences, loads, atomics (no two coroutines ever run at once) ---------------------
inline void __threadfence() {}
inline void __threadfence_block() {}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T atomicOr(T* p, T v) {
  T old = *p;
  *p = old | v;
  return old;
}
template <class T>
inline T atomicAnd(T* p, T v) {
  T old = *p;
  *p = old & v;
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
  T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
  T old = *p;
  if (old == cmp) *p = v;
  return old;
}

// ---- math intrinsics (the build uses -ffp-contract=off: a * b + c is never fused) -----------
using std::isfinite;
using std::isinf;
using std::isnan;
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline int __float2int_rn(float a) { return static_cast<int>(std::nearbyint(a)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
using std::max;
using std::min;

// ---- bfloat16 (cuda_bf16.h) ------------------------------------------------------------------
struct __nv_bfloat16 {
  unsigned short __x;
};
using nv_bfloat16 = __nv_bfloat16;
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
    r.__x = static_cast<unsigned short>((u >> 16) | 0x40u);
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  r.__x = static_cast<unsigned short>(u >> 16);
  return r;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- runtime API types -------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalState = 401,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorStreamCaptureUnmatched = 903,
  cudaErrorStreamCaptureImplicit = 906,
  cudaErrorStreamCaptureWrongThread = 908,
  cudaErrorUnknown = 999,
};
using cudaError = cudaError_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2,
};
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
constexpr unsigned cudaStreamDefault = 0;
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDefault = 0;
constexpr unsigned cudaEventDisableTiming = 2;

namespace emu {
struct Stream;
struct Event;
struct Graph;
struct GraphExec;
}  // namespace emu
using cudaStream_t = emu::Stream*;
using cudaEvent_t = emu::Event*;
using cudaGraph_t = emu::Graph*;
using cudaGraphExec_t = emu::GraphExec*;

struct cudaDeviceProp {
  char name[256];
  std::size_t totalGlobalMem;
  std::size_t sharedMemPerBlock;
  std::size_t sharedMemPerBlockOptin;
  int regsPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int major;
  int minor;
  int multiProcessorCount;
  int maxThreadsPerMultiProcessor;
  std::size_t sharedMemPerMultiprocessor;
  int clockRate;
  int memoryClockRate;
  int memoryBusWidth;
  std::size_t l2CacheSize;
};

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaMalloc(void** p, std::size_t bytes);
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocHost(void** p, std::size_t bytes);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* p, int value, std::size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamQuery(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph,
                                 unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t g);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t stop);
cudaError_t cudaFuncSetAttribute_impl(const void* func, cudaFuncAttribute attr, int value);
template <class F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute_impl(reinterpret_cast<const void*>(func), attr, value);
}

// ---- kernel launches ---------------------------------------------------------------------------
namespace emu {
using KernelBody = void (*)(void*);
// Runs (or, under capture, records) a grid. `make` copies the closure for recording.
struct LaunchSpec {
  const char* name;
  const char* file;
  int line;
  dim3 grid, block;
  std::size_t shmem;
  cudaStream_t stream;
  const void* func;
};
// Takes ownership of `closure` (deleted with `destroy`).
void launch(const LaunchSpec& spec, KernelBody body, void* closure, void (*destroy)(void*));
// Warns when a kernel's pointer argument is neither null nor inside a cudaMalloc allocation.
void check_kernel_pointer(const LaunchSpec& spec, int index, const void* p);

template <class... P>
class Launch {
 public:
  using Fn = void (*)(P...);
  Launch(Fn f, const char* name, const char* file, int line, dim3 grid, dim3 block,
         std::size_t shmem = 0, cudaStream_t stream = nullptr)
      : f_(f), spec_{name, file, line, grid, block, shmem, stream, reinterpret_cast<const void*>(f)} {}
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
    auto* c = new Closure{f_, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
    check_pointers(c->args, std::index_sequence_for<P...>{});
    launch(spec_, &Closure::run, c, &Closure::destroy);
  }

 private:
  struct Closure {
    Fn f;
    std::tuple<std::decay_t<P>...> args;
    static void run(void* p) {
      auto* c = static_cast<Closure*>(p);
      std::apply(c->f, c->args);  // parameters are by value: each thread gets its own copy
    }
    static void destroy(void* p) { delete static_cast<Closure*>(p); }
  };
  template <class Tuple, std::size_t... I>
  void check_pointers(const Tuple& t, std::index_sequence<I...>) const {
    (check_one(static_cast<int>(I), std::get<I>(t)), ...);
  }
  template <class T>
  void check_one(int i, const T& v) const {
    if constexpr (std::is_pointer_v<T>) check_kernel_pointer(spec_, i, static_cast<const void*>(v));
  }
  Fn f_;
  LaunchSpec spec_;
};
}  // namespace emu

// ---- cuBLAS (cublas.cpp) ---------------------------------------------------------------------
enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasMath_t {
  CUBLAS_DEFAULT_MATH = 0,
  CUBLAS_TENSOR_OP_MATH = 1,
  CUBLAS_PEDANTIC_MATH = 2,
  CUBLAS_TF32_TENSOR_OP_MATH = 3,
};
enum cublasPointerMode_t { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 };
enum cublasComputeType_t {
  CUBLAS_COMPUTE_16F = 64,
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_PEDANTIC = 69,
  CUBLAS_COMPUTE_32F_FAST_16F = 74,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
  CUBLAS_COMPUTE_64F = 70,
};
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
using cudaDataType = cudaDataType_t;
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 };
namespace emu {
struct BlasHandle;
}
using cublasHandle_t = emu::BlasHandle*;

cublasStatus_t cublasCreate(cublasHandle_t* h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t* s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode);
cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode);
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void* workspace, std::size_t bytes);
const char* cublasGetStatusName(cublasStatus_t s);
const char* cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float* alpha, const float* A, int lda,
                           const float* B, int ldb, const float* beta, float* C, int ldc);
cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta,
                                         cublasOperation_t tb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda,
                                         long long sa, const float* B, int ldb, long long sb,
                                         const float* beta, float* C, int ldc, long long sc,
                                         int batch);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void* alpha, const void* A, cudaDataType at,
                            int lda, const void* B, cudaDataType bt, int ldb, const void* beta,
                            void* C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta,
                                          cublasOperation_t tb, int m, int n, int k,
                                          const void* alpha, const void* A, cudaDataType at,
                                          int lda, long long sa, const void* B, cudaDataType bt,
                                          int ldb, long long sb, const void* beta, void* C,
                                          cudaDataType ct, int ldc, long long sc, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                   int m, int n, int k, const void* alpha, const void* const A[],
                                   cudaDataType at, int lda, const void* const B[],
                                   cudaDataType bt, int ldb, const void* beta, void* const C[],
                                   cudaDataType ct, int ldc, int batch,
                                   cublasComputeType_t compute, cublasGemmAlgo_t algo);
