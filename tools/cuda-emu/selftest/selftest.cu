// Self-test of the CUDA emulator: written as CUDA (launch syntax and all), preprocessed by
// preprocess.py like cuda/, so it checks the emulator itself: shuffles, barriers, shared
// memory, race and divergence detection, launch errors, capture + replay, cuBLAS semantics,
// bf16 rounding, EMU_COUNT. Prints one line per check; exit status 0 when all pass.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "emu_internal.h"

namespace {

int g_failures = 0;
void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "[ ok ]" : "[FAIL]", what);
  if (!ok) ++g_failures;
}

// wmma: c [16 x 16] = a [16 x 32] b [32 x 16] + 1, b read column-major (as b^T row-major);
// then each lane writes one row of a shared tile, __syncwarp, and the tile is loaded back as an
// accumulator, doubled and stored to c2.
__global__ void wmma_product(const __nv_bfloat16* a, const __nv_bfloat16* bt, float* c, float* c2) {
  using namespace nvcuda;
  __shared__ __align__(32) float tile[16 * 16];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  for (int k = 0; k < 32; k += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, a + k, 32);
    wmma::load_matrix_sync(fb, bt + k, 32);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
  const int lane = threadIdx.x;
  if (lane < 16)
    for (int j = 0; j < 16; ++j) tile[lane * 16 + j] = static_cast<float>(lane * 16 + j);
  __syncwarp();
  wmma::load_matrix_sync(acc, tile, 16, wmma::mem_col_major);
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 2.0f;
  wmma::store_matrix_sync(c2, acc, 16, wmma::mem_row_major);
}

__global__ void shuffles(int* out) {
  const int lane = threadIdx.x & 31;
  int v = lane;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int d = lane;
  for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, o);
  const int b = __shfl_sync(0xffffffffu, lane * 10, 7);
  const double x = __shfl_xor_sync(0xffffffffu, static_cast<double>(lane) + 0.5, 1);
  out[threadIdx.x * 4 + 0] = v;
  out[threadIdx.x * 4 + 1] = d;
  out[threadIdx.x * 4 + 2] = b;
  out[threadIdx.x * 4 + 3] = static_cast<int>(x * 2);
}

__device__ float block_sum(float v) {
  __shared__ float partial[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? partial[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

__global__ void sums(float* out) {
  const float s = block_sum(static_cast<float>(threadIdx.x));
  const float t = block_sum(1.0f);
  const int any = __syncthreads_or(threadIdx.x == 77);
  const int count = __syncthreads_count(threadIdx.x % 3 == 0);
  if (threadIdx.x == 0) {
    out[blockIdx.x * 4 + 0] = s;
    out[blockIdx.x * 4 + 1] = t;
    out[blockIdx.x * 4 + 2] = static_cast<float>(any);
    out[blockIdx.x * 4 + 3] = static_cast<float>(count);
  }
}

// A missing barrier: thread t reads its neighbour's slot, maybe before the neighbour wrote it.
__global__ void racy(int* out) {
  __shared__ int s[256];
  s[threadIdx.x] = static_cast<int>(threadIdx.x) + 1000 * static_cast<int>(blockIdx.x);
  // __syncthreads() missing here
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void divergent(int* out) {
  if (threadIdx.x < 32)
    __syncthreads();
  else
    __syncthreads();
  out[threadIdx.x] = 1;
}

// Warp 1's low lanes wait at a warp barrier for its high lanes, which wait at the block barrier.
__global__ void deadlocking(int* out) {
  if (threadIdx.x >= 32 && threadIdx.x < 48)
    __syncwarp();
  else
    __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void increment(int* x) {
  *x += 1;
}

__global__ void write_ptr(float* p) {
  p[threadIdx.x] = 1.0f;
}

// EMU_COUNT: reads x[0, n), writes y[0, m) (m >= n).
__global__ void read_n_write_m(const float* x, float* y, int n, int m) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < m) y[i] = i < n ? 2.0f * x[i] : 0.0f;
}

__global__ void add_into(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

__global__ void read_first(const float* x, float* out) {
  *out = x[0];
}

// Run with EMU_COUNT set (main starts it so): the counts of kernels, GEMMs and copies in the
// JSON cudaProfilerStop writes, and that only the profiler range counts.
int count_checks(const char* path) {
  const int n = 3000, m = 5000, big = 1 << 18;  // 12000 bytes read, 20000 written; 1 MiB
  float *x, *y, *z, *one;
  cudaMalloc(&x, n * sizeof(float));
  cudaMalloc(&y, m * sizeof(float));
  cudaMalloc(&z, big * sizeof(float));
  cudaMalloc(&one, sizeof(float));
  cudaMemset(x, 0, n * sizeof(float));
  read_n_write_m<<<(m + 255) / 256, 256>>>(x, y, n, m);  // before the range: not counted
  cudaProfilerStart();
  read_n_write_m<<<(m + 255) / 256, 256>>>(x, y, n, m);
  add_into<<<(n + 255) / 256, 256>>>(x, y, n);
  read_first<<<1, 1>>>(z, one);
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  read_first<<<1, 1, 0, s>>>(z, one);
  cudaGraph_t g = nullptr;
  cudaStreamEndCapture(s, &g);
  cudaGraphExec_t ge = nullptr;
  cudaGraphInstantiate(&ge, g, 0);
  cudaGraphLaunch(ge, s);  // a replayed launch counts as it runs
  cudaGraphLaunch(ge, s);
  cublasHandle_t h;
  cublasCreate(&h);
  cublasSetStream(h, s);
  const int gm = 24, gn = 16, gk = 40;
  __nv_bfloat16 *a, *b;
  float* c;
  cudaMalloc(&a, 3 * gm * gk * 2);
  cudaMalloc(&b, 3 * gk * gn * 2);
  cudaMalloc(&c, 3 * gm * gn * 4);
  cudaMemsetAsync(a, 0, 3 * gm * gk * 2, s);
  cudaMemsetAsync(b, 0, 3 * gk * gn * 2, s);
  cudaMemsetAsync(c, 0, 3 * gm * gn * 4, s);
  const float alpha = 1.0f, zero = 0.0f, half = 0.5f;
  cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, gm, gn, gk, &alpha, a, CUDA_R_16BF, gm, b, CUDA_R_16BF,
               gk, &zero, c, CUDA_R_32F, gm, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, gm, gn, gk, &alpha, a, CUDA_R_16BF, gm,
                             gm * gk, b, CUDA_R_16BF, gk, gk * gn, &half, c, CUDA_R_32F, gm,
                             gm * gn, 3, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  float host[4];
  cudaMemcpy(host, y, sizeof host, cudaMemcpyDeviceToHost);
  cudaStreamSynchronize(s);
  cudaProfilerStop();
  read_n_write_m<<<(m + 255) / 256, 256>>>(x, y, n, m);  // after the range: not counted

  nlohmann::json j;
  try {
    std::ifstream in(path);
    j = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    std::printf("[FAIL] EMU_COUNT: %s did not parse: %s\n", path, e.what());
    return 1;
  }
  const auto& k = j["kernels"];
  const std::string rw = "read_n_write_m", add = "add_into", first = "read_first";
  expect(k.contains(rw) && k[rw]["launches"] == 1 && k[rw]["bytes_read"] == n * 4 &&
             k[rw]["bytes_written"] == m * 4,
         "EMU_COUNT: a kernel reading 3000 floats and writing 5000: 12000 bytes read, 20000 "
         "written, 1 launch (only the one inside cudaProfilerStart/Stop)");
  // y is 5000 floats: its first 3000 lie in 3 whole pages (12288 bytes), counted whole
  expect(k.contains(add) && k[add]["bytes_read"] == n * 4 + 3 * 4096 &&
             k[add]["bytes_written"] == 3 * 4096,
         "EMU_COUNT: y[0, 3000) += x[0, 3000): x read, y's 3 pages touched read and written");
  expect(k.contains(first) && k[first]["launches"] == 3 && k[first]["bytes_read"] == 3 * 4096 &&
             k[first]["bytes_written"] == 3 * 4,
         "EMU_COUNT: one float of a 1 MiB buffer reads its 4 KiB page; graph replays count");
  const auto& gs = j["gemms"];
  double flops = 0, gread = 0, gwritten = 0;
  int calls = 0;
  for (const auto& [key, v] : gs.items()) {
    flops += v["flops"].get<double>();
    gread += v["bytes_read"].get<double>();
    gwritten += v["bytes_written"].get<double>();
    calls += v["calls"].get<int>();
  }
  const double mnk = 2.0 * gm * gn * gk;
  const double read_want = (gm * gk * 2 + gk * gn * 2) + 3.0 * (gm * gk * 2 + gk * gn * 2 + gm * gn * 4);
  expect(calls == 2 && flops == mnk * 4 && gread == read_want && gwritten == 4.0 * gm * gn * 4,
         "EMU_COUNT: bf16 GEMM + strided batch of 3: flops 2mnk x 4, A B (C when beta != 0) "
         "read, C written");
  const auto& cp = j["copies"];
  expect(cp.contains("cudaMemsetAsync") && cp["cudaMemsetAsync"]["calls"] == 3 &&
             cp.contains("cudaMemcpy DtoH") && cp["cudaMemcpy DtoH"]["bytes"] == 16 &&
             !cp.contains("cudaMemset"),
         "EMU_COUNT: memsets and copies by API and direction (the one before the range not)");
  expect(j["window"] == "cudaProfilerStart/Stop ranges" && j["ranges"] == 1 &&
             j["totals"]["kernel_launches"] == 5,
         "EMU_COUNT: totals over the one range");
  // Queued by the host: 3 kernels, 3 memsets, 2 cuBLAS calls (the synchronous cudaMemcpy is
  // not queued; the captured kernel runs only in the 2 graph launches, not counted again).
  expect(j["totals"]["host_submissions"] == 8 && j["totals"]["graph_launches"] == 2,
         "EMU_COUNT: host submissions and graph launches apart (a replay's operations not "
         "submitted by the host)");

  // A fault outside every device allocation still ends the process (the handler passes it on).
  std::fflush(stdout);
  void* guard = mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  const pid_t pid = fork();
  if (pid == 0) {
    freopen("/dev/null", "w", stderr);
    cudaProfilerStart();
    read_first<<<1, 1>>>(static_cast<const float*>(guard), one);
    std::_Exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  expect(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV,
         "EMU_COUNT: a kernel's access to unmapped host memory still ends it with SIGSEGV");
  cublasDestroy(h);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--count") return count_checks(argv[2]);

  int* d_i = nullptr;
  float* d_f = nullptr;
  cudaMalloc(&d_i, 4096 * sizeof(int));
  cudaMalloc(&d_f, 4096 * sizeof(float));
  std::vector<int> hi(4096);
  std::vector<float> hf(4096);

  // 1. shuffles
  shuffles<<<1, 64>>>(d_i);
  cudaMemcpy(hi.data(), d_i, 64 * 4 * sizeof(int), cudaMemcpyDeviceToHost);
  bool ok = true;
  for (int t = 0; t < 64; ++t) {
    const int lane = t & 31;
    int down = 0;  // shfl_down tree: lane 0 gets the sum; lane l gets a partial sum
    {
      int vals[32];
      for (int l = 0; l < 32; ++l) vals[l] = l;
      for (int o = 16; o > 0; o >>= 1) {
        int nv[32];
        for (int l = 0; l < 32; ++l) nv[l] = vals[l] + (l + o < 32 ? vals[l + o] : vals[l]);
        for (int l = 0; l < 32; ++l) vals[l] = nv[l];
      }
      down = vals[lane];
    }
    ok = ok && hi[t * 4] == 496 && hi[t * 4 + 1] == down && hi[t * 4 + 2] == 70 &&
         hi[t * 4 + 3] == 2 * (lane ^ 1) + 1;
  }
  expect(ok, "warp shuffles: xor butterfly, down, broadcast, double");

  // 2. block reductions over 1024 threads, 3 blocks
  sums<<<3, 1024>>>(d_f);
  cudaMemcpy(hf.data(), d_f, 12 * sizeof(float), cudaMemcpyDeviceToHost);
  ok = true;
  for (int b = 0; b < 3; ++b)
    ok = ok && hf[b * 4] == 523776.0f && hf[b * 4 + 1] == 1024.0f && hf[b * 4 + 2] == 1.0f &&
         hf[b * 4 + 3] == 342.0f;
  expect(ok, "1024-thread blocks: shared-memory block sums, __syncthreads_or / _count");

  // 3. a missing barrier shows as different results under forward and reverse order
  emu::config().order = 0;
  racy<<<2, 256>>>(d_i);
  std::vector<int> fwd(512), rev(512);
  cudaMemcpy(fwd.data(), d_i, 512 * sizeof(int), cudaMemcpyDeviceToHost);
  emu::config().order = 1;
  racy<<<2, 256>>>(d_i);
  cudaMemcpy(rev.data(), d_i, 512 * sizeof(int), cudaMemcpyDeviceToHost);
  emu::config().order = 0;
  expect(fwd != rev, "missing __syncthreads: forward and reverse thread order disagree");

  // 4. barrier divergence is reported
  long w0 = emu::warning_count();
  divergent<<<1, 64>>>(d_i);
  expect(emu::warning_count() > w0, "divergent __syncthreads sites: warned");

  // 5. deadlock is reported (in a child process: it aborts)
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    freopen("/dev/null", "w", stderr);
    deadlocking<<<1, 64>>>(d_i);
    std::_Exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  expect(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "deadlock: detected, aborts");

  // 6. bad launch configuration
  cudaGetLastError();
  increment<<<1, 2048>>>(d_i);
  expect(cudaGetLastError() == cudaErrorInvalidConfiguration && cudaGetLastError() == cudaSuccess,
         "2048 threads per block: cudaErrorInvalidConfiguration, then cleared");
  increment<<<dim3(1, 70000), 1>>>(d_i);
  expect(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid.y 70000: invalid");

  // 7. host pointer given to a kernel
  w0 = emu::warning_count();
  write_ptr<<<1, 4>>>(hf.data());
  expect(emu::warning_count() > w0, "host pointer as a kernel argument: warned");

  // 8. capture and replay; a synchronous copy inside a capture invalidates it
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaMemset(d_i, 0, sizeof(int));
  cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  increment<<<1, 1, 0, s>>>(d_i);
  increment<<<1, 1, 0, s>>>(d_i);
  cudaGraph_t g = nullptr;
  cudaStreamEndCapture(s, &g);
  int x = -1;
  cudaMemcpy(&x, d_i, sizeof(int), cudaMemcpyDeviceToHost);
  expect(x == 0, "capture records, does not run");
  cudaGraphExec_t ge = nullptr;
  cudaGraphInstantiate(&ge, g, 0);
  for (int i = 0; i < 3; ++i) cudaGraphLaunch(ge, s);
  cudaStreamSynchronize(s);
  cudaMemcpy(&x, d_i, sizeof(int), cudaMemcpyDeviceToHost);
  expect(x == 6, "graph replay x3 of 2 kernels");
  cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  const cudaError_t e1 = cudaMemcpy(&x, d_i, sizeof(int), cudaMemcpyDeviceToHost);
  cudaGraph_t g2 = nullptr;
  const cudaError_t e2 = cudaStreamEndCapture(s, &g2);
  expect(e1 == cudaErrorStreamCaptureUnsupported && e2 == cudaErrorStreamCaptureInvalidated &&
             g2 == nullptr,
         "cudaMemcpy inside a capture: refused, capture invalidated");
  cudaGetLastError();

  // 9. cuBLAS column-major GEMM with transposes, ld, alpha/beta, strided batch, bf16 out
  cublasHandle_t h;
  cublasCreate(&h);
  cublasSetStream(h, s);
  const int m = 5, n = 4, k = 3, lda = 7, ldb = 6, ldc = 8;
  std::vector<float> A(lda * m), Bm(ldb * n), C(ldc * n);  // A^T stored (k x m), B^T (n x k)
  for (std::size_t i = 0; i < A.size(); ++i) A[i] = 0.25f * static_cast<float>(i % 11) - 1.0f;
  for (std::size_t i = 0; i < Bm.size(); ++i) Bm[i] = 0.5f * static_cast<float>(i % 7) - 1.5f;
  for (std::size_t i = 0; i < C.size(); ++i) C[i] = static_cast<float>(i % 5);
  float *dA, *dB, *dC;
  cudaMalloc(&dA, A.size() * 4);
  cudaMalloc(&dB, Bm.size() * 4);
  cudaMalloc(&dC, C.size() * 4);
  cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, Bm.data(), Bm.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dC, C.data(), C.size() * 4, cudaMemcpyHostToDevice);
  const float alpha = 1.5f, beta = -0.5f;
  // op(A) = A^T: A stored k x m (lda >= k); op(B) = B^T: B stored n x k (ldb >= n)
  const cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_T, m, n, k, &alpha, dA, CUDA_R_32F,
                                         lda, dB, CUDA_R_32F, ldb, &beta, dC, CUDA_R_32F, ldc,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  std::vector<float> got(C.size());
  cudaMemcpy(got.data(), dC, C.size() * 4, cudaMemcpyDeviceToHost);
  double worst = 0;
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double ref = 0;
      for (int p = 0; p < k; ++p) ref += double(A[i * lda + p]) * double(Bm[p * ldb + j]);
      ref = alpha * ref + beta * C[j * ldc + i];
      worst = std::max(worst, std::abs(ref - got[j * ldc + i]));
    }
  bool untouched = true;  // rows m..ldc-1 of each column stay
  for (int j = 0; j < n; ++j)
    for (int i = m; i < ldc; ++i) untouched = untouched && got[j * ldc + i] == C[j * ldc + i];
  expect(st == CUBLAS_STATUS_SUCCESS && worst < 1e-5 && untouched, "cublasGemmEx T,T with ld > rows");
  const cublasStatus_t bad = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA,
                                          CUDA_R_32F, 2, dB, CUDA_R_32F, ldb, &beta, dC,
                                          CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  expect(bad == CUBLAS_STATUS_INVALID_VALUE, "lda < m: CUBLAS_STATUS_INVALID_VALUE");
  // beta = 0 ignores NaN in C
  std::vector<float> nanC(C.size(), NAN);
  cudaMemcpy(dC, nanC.data(), C.size() * 4, cudaMemcpyHostToDevice);
  const float zero = 0.0f;
  cublasGemmStridedBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_T, m, n, k, &alpha, dA, CUDA_R_32F, lda, 0,
                             dB, CUDA_R_32F, ldb, 0, &zero, dC, CUDA_R_32F, ldc, 0, 1,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  cudaMemcpy(got.data(), dC, C.size() * 4, cudaMemcpyDeviceToHost);
  bool finite = true;
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) finite = finite && std::isfinite(got[j * ldc + i]);
  expect(finite, "beta = 0 does not read C");

  // 10. bf16 rounding to nearest even
  const float ties[] = {1.00390625f, 1.01171875f, -1.00390625f, 1.00390636f};
  const float want[] = {1.0f, 1.015625f, -1.0f, 1.0078125f};
  ok = true;
  for (int i = 0; i < 4; ++i) ok = ok && __bfloat162float(__float2bfloat16(ties[i])) == want[i];
  ok = ok && std::isnan(__bfloat162float(__float2bfloat16(NAN)));
  expect(ok, "bf16: round to nearest even, NaN stays NaN");

  // 10b. wmma (mma.h): a bf16 product with a column-major operand, an accumulator round trip
  {
    std::vector<__nv_bfloat16> ha(16 * 32), hbt(16 * 32);
    for (int i = 0; i < 16 * 32; ++i) {
      ha[i] = __float2bfloat16(static_cast<float>((i * 7) % 11 - 5) * 0.25f);
      hbt[i] = __float2bfloat16(static_cast<float>((i * 5) % 13 - 6) * 0.5f);
    }
    __nv_bfloat16 *da = nullptr, *dbt = nullptr;
    float *dc = nullptr, *dc2 = nullptr;
    cudaMalloc(&da, ha.size() * 2);
    cudaMalloc(&dbt, hbt.size() * 2);
    cudaMalloc(&dc, 256 * sizeof(float));
    cudaMalloc(&dc2, 256 * sizeof(float));
    cudaMemcpy(da, ha.data(), ha.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dbt, hbt.data(), hbt.size() * 2, cudaMemcpyHostToDevice);
    const long before = emu::warning_count();
    wmma_product<<<1, 32>>>(da, dbt, dc, dc2);
    std::vector<float> hc(256), hc2(256);
    cudaMemcpy(hc.data(), dc, 256 * sizeof(float), cudaMemcpyDeviceToHost);
    cudaMemcpy(hc2.data(), dc2, 256 * sizeof(float), cudaMemcpyDeviceToHost);
    ok = emu::warning_count() == before;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float want = 1.0f;  // small multiples of 1/8: every sum is exact
        for (int k = 0; k < 32; ++k)
          want += __bfloat162float(ha[i * 32 + k]) * __bfloat162float(hbt[j * 32 + k]);
        ok = ok && hc[i * 16 + j] == want && hc2[i * 16 + j] == 2.0f * (j * 16 + i);
      }
    expect(ok,
           "wmma: bf16 16x16x16 products (row- and column-major operands), accumulator "
           "load (column-major) and store");
    // A misaligned operand is warned about (a GPU faults or misreads).
    wmma_product<<<1, 32>>>(da + 1, dbt, dc, dc2);
    expect(emu::warning_count() > before, "wmma: a pointer that is not 32-byte aligned: warned");
    cudaFree(da);
    cudaFree(dbt);
    cudaFree(dc);
    cudaFree(dc2);
  }

  cublasDestroy(h);
  cudaStreamDestroy(s);

  // 11. EMU_COUNT, in a child process started with it set (this one runs without)
  std::fflush(stdout);
  const char* tmp = std::getenv("TMPDIR");
  const std::string count_json = std::string(tmp != nullptr && *tmp != 0 ? tmp : "/tmp") +
                                 "/emu_selftest_count." + std::to_string(getpid()) + ".json";
  const pid_t counter = fork();
  if (counter == 0) {
    setenv("EMU_COUNT", count_json.c_str(), 1);
    execl("/proc/self/exe", argv[0], "--count", count_json.c_str(), static_cast<char*>(nullptr));
    std::_Exit(127);
  }
  waitpid(counter, &status, 0);
  std::remove(count_json.c_str());
  expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "EMU_COUNT checks (child process)");

  std::printf(g_failures == 0 ? "selftest: all passed\n" : "selftest: %d FAILED\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
