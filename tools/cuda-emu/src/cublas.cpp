// cuBLAS for the CUDA emulator: the GEMM entry points pion uses, on OpenBLAS's sgemm with
// cuBLAS's column-major semantics, argument checks and data types (fp32; bf16 inputs with
// fp32 or bf16 output; TF32 emulated by rounding the fp32 inputs to 10 mantissa bits).
#include <cblas.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "emu/cuda_emu.h"
#include "emu_internal.h"

namespace emu {
struct BlasHandle {
  cudaStream_t stream = nullptr;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};
}  // namespace emu

using namespace emu;

namespace {

float tf32_round(float x) {  // cvt.rna.tf32.f32: nearest, ties away from zero
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;  // Inf / NaN unchanged
  u = (u + 0x1000u) & ~0x1fffu;
  std::memcpy(&x, &u, 4);
  return x;
}

std::size_t esize(cudaDataType t) {
  return t == CUDA_R_32F ? 4 : t == CUDA_R_64F ? 8 : 2;
}

// Bytes spanned by a column-major rows x cols matrix with leading dimension ld.
std::size_t extent(int rows, int cols, int ld, cudaDataType t) {
  if (rows <= 0 || cols <= 0) return 0;
  return (static_cast<std::size_t>(cols - 1) * static_cast<std::size_t>(ld) +
          static_cast<std::size_t>(rows)) *
         esize(t);
}

struct Gemm {
  cublasOperation_t ta, tb;
  int m, n, k;
  float alpha, beta;
  cudaDataType at, bt, ct;
  int lda, ldb, ldc;
  bool tf32;
};

// A as fp32, column-major rows x cols with ld (a copy when it needs converting or rounding).
const float* as_float(const void* p, cudaDataType t, int rows, int cols, int ld, bool tf32,
                      std::vector<float>& buf) {
  if (t == CUDA_R_32F && !tf32) return static_cast<const float*>(p);
  buf.assign(static_cast<std::size_t>(ld) * static_cast<std::size_t>(cols), 0.0f);
  for (int c = 0; c < cols; ++c)
    for (int r = 0; r < rows; ++r) {
      const std::size_t i = static_cast<std::size_t>(c) * ld + r;
      float v;
      if (t == CUDA_R_32F)
        v = tf32_round(static_cast<const float*>(p)[i]);
      else
        v = __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
      buf[i] = v;
    }
  return buf.data();
}

void run_gemm(const Gemm& g, const void* A, const void* Bm, void* C) {
  if (g.m == 0 || g.n == 0) return;
  const int a_rows = g.ta == CUBLAS_OP_N ? g.m : g.k, a_cols = g.ta == CUBLAS_OP_N ? g.k : g.m;
  const int b_rows = g.tb == CUBLAS_OP_N ? g.k : g.n, b_cols = g.tb == CUBLAS_OP_N ? g.n : g.k;
  std::vector<float> abuf, bbuf, cbuf;
  const float* a = g.k > 0 ? as_float(A, g.at, a_rows, a_cols, g.lda, g.tf32, abuf) : nullptr;
  const float* b = g.k > 0 ? as_float(Bm, g.bt, b_rows, b_cols, g.ldb, g.tf32, bbuf) : nullptr;
  float* c;
  int ldc = g.ldc;
  if (g.ct == CUDA_R_32F) {
    c = static_cast<float*>(C);
    if (g.beta == 0.0f)  // cuBLAS does not read C when beta is 0 (NaN there stays out)
      for (int j = 0; j < g.n; ++j) std::memset(c + static_cast<std::size_t>(j) * ldc, 0, sizeof(float) * g.m);
  } else {
    cbuf.assign(static_cast<std::size_t>(g.m) * g.n, 0.0f);
    if (g.beta != 0.0f)
      for (int j = 0; j < g.n; ++j)
        for (int i = 0; i < g.m; ++i)
          cbuf[static_cast<std::size_t>(j) * g.m + i] = __bfloat162float(
              static_cast<const __nv_bfloat16*>(C)[static_cast<std::size_t>(j) * g.ldc + i]);
    c = cbuf.data();
    ldc = g.m;
  }
  if (g.k == 0) {
    for (int j = 0; j < g.n; ++j)
      for (int i = 0; i < g.m; ++i) c[static_cast<std::size_t>(j) * ldc + i] *= g.beta;
  } else {
    cblas_sgemm(CblasColMajor, g.ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                g.tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, g.m, g.n, g.k, g.alpha, a, g.lda,
                b, g.ldb, g.beta == 0.0f ? 0.0f : g.beta, c, ldc);
  }
  if (g.ct != CUDA_R_32F)
    for (int j = 0; j < g.n; ++j)
      for (int i = 0; i < g.m; ++i)
        static_cast<__nv_bfloat16*>(C)[static_cast<std::size_t>(j) * g.ldc + i] =
            __float2bfloat16_rn(cbuf[static_cast<std::size_t>(j) * g.m + i]);
}

cublasStatus_t prepare(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                       int k, const void* alpha, cudaDataType at, int lda, cudaDataType bt,
                       int ldb, const void* beta, cudaDataType ct, int ldc,
                       cublasComputeType_t compute, const char* who, Gemm& g) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (ta == CUBLAS_OP_C || tb == CUBLAS_OP_C) ta = ta == CUBLAS_OP_C ? CUBLAS_OP_T : ta;  // real: C == T
  if (tb == CUBLAS_OP_C) tb = CUBLAS_OP_T;
  if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T) || m < 0 ||
      n < 0 || k < 0) {
    warn("%s: invalid op or m=%d n=%d k=%d: CUBLAS_STATUS_INVALID_VALUE", who, m, n, k);
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const int a_rows = ta == CUBLAS_OP_N ? m : k, b_rows = tb == CUBLAS_OP_N ? k : n;
  if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1)) {
    warn("%s: leading dimension too small (m=%d n=%d k=%d lda=%d ldb=%d ldc=%d, ops %d %d): "
         "CUBLAS_STATUS_INVALID_VALUE",
         who, m, n, k, lda, ldb, ldc, ta, tb);
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  bool ok = false;
  bool tf32 = false;
  switch (compute) {
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
      ok = (at == CUDA_R_32F && bt == CUDA_R_32F && ct == CUDA_R_32F) ||
           (at == CUDA_R_16BF && bt == CUDA_R_16BF && (ct == CUDA_R_16BF || ct == CUDA_R_32F));
      tf32 = compute == CUBLAS_COMPUTE_32F && h->math == CUBLAS_TF32_TENSOR_OP_MATH && at == CUDA_R_32F;
      break;
    case CUBLAS_COMPUTE_32F_FAST_TF32:
      ok = at == CUDA_R_32F && bt == CUDA_R_32F && ct == CUDA_R_32F;
      tf32 = true;
      break;
    default:
      ok = false;
  }
  if (!ok) {
    warn("%s: unsupported types A %d B %d C %d with compute type %d: CUBLAS_STATUS_NOT_SUPPORTED",
         who, at, bt, ct, compute);
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  // Host pointer mode: the scalars are read now (a captured graph keeps these values).
  // Device pointer mode: same address space here.
  g = Gemm{ta, tb, m, n, k, *static_cast<const float*>(alpha), *static_cast<const float*>(beta),
           at, bt, ct, lda, ldb, ldc, tf32};
  return CUBLAS_STATUS_SUCCESS;
}

bool check_operands(const Gemm& g, const void* A, const void* Bm, const void* C, const char* who,
                    int index) {
  const int a_rows = g.ta == CUBLAS_OP_N ? g.m : g.k, a_cols = g.ta == CUBLAS_OP_N ? g.k : g.m;
  const int b_rows = g.tb == CUBLAS_OP_N ? g.k : g.n, b_cols = g.tb == CUBLAS_OP_N ? g.n : g.k;
  const std::size_t ea = g.m > 0 && g.n > 0 ? extent(a_rows, a_cols, g.lda, g.at) : 0;
  const std::size_t eb = g.m > 0 && g.n > 0 ? extent(b_rows, b_cols, g.ldb, g.bt) : 0;
  const std::size_t ec = extent(g.m, g.n, g.ldc, g.ct);
  const char* bad = nullptr;
  if (ea > 0 && !device_range(A, ea)) bad = "A";
  else if (eb > 0 && !device_range(Bm, eb)) bad = "B";
  else if (ec > 0 && !device_range(C, ec)) bad = "C";
  if (bad == nullptr) {
    auto overlaps = [](const void* p, std::size_t np, const void* q, std::size_t nq) {
      const auto a = reinterpret_cast<std::uintptr_t>(p), b = reinterpret_cast<std::uintptr_t>(q);
      return np > 0 && nq > 0 && a < b + nq && b < a + np;
    };
    if (overlaps(C, ec, A, ea) || overlaps(C, ec, Bm, eb))
      warn("%s: output C of matrix %d overlaps input %s (m=%d n=%d k=%d): undefined in cuBLAS",
           who, index, overlaps(C, ec, A, ea) ? "A" : "B", g.m, g.n, g.k);
    return true;
  }
  warn("%s: operand %s of matrix %d (m=%d n=%d k=%d lda=%d ldb=%d ldc=%d) reaches outside its "
       "device allocation: an illegal address on a GPU",
       who, bad, index, g.m, g.n, g.k, g.lda, g.ldb, g.ldc);
  return false;
}

// EMU_COUNT: the call as it runs (so a graph replay counts again), from its arguments: the
// work runs in OpenBLAS's threads, whose memory accesses the page protection cannot watch.
void count_call(const Gemm& g, const char* entry, int batch, std::size_t extra_read) {
  count_gemm(entry, g.tf32, g.at, g.bt, g.ct, g.m, g.n, g.k, batch, g.beta != 0.0f, extra_read);
}

cublasStatus_t submit(cublasHandle_t h, std::function<void()> op) {
  const cudaError_t e = enqueue(h->stream, std::move(op), false);
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // namespace

cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new BlasHandle;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetStream(cublasHandle_t h, cudaStream_t* s) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *s = h->stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void* workspace, std::size_t bytes) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes > 0 && !device_range(workspace, bytes)) {
    warn("cublasSetWorkspace: the workspace is not device memory of that size");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  h->workspace = workspace;
  h->workspace_bytes = bytes;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}
const char* cublasGetStatusString(cublasStatus_t s) {
  return cublasGetStatusName(s);
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const void* alpha, const void* A, cudaDataType at,
                            int lda, const void* B, cudaDataType bt, int ldb, const void* beta,
                            void* C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t) {
  Gemm g;
  const cublasStatus_t st =
      prepare(h, ta, tb, m, n, k, alpha, at, lda, bt, ldb, beta, ct, ldc, compute, "cublasGemmEx", g);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (!check_operands(g, A, B, C, "cublasGemmEx", 0)) {
    set_sticky(cudaErrorIllegalAddress);
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  return submit(h, [g, A, B, C] {
    count_call(g, "cublasGemmEx", 1, 0);
    run_gemm(g, A, B, C);
  });
}

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                           int n, int k, const float* alpha, const float* A, int lda,
                           const float* B, int ldb, const float* beta, float* C, int ldc) {
  return cublasGemmEx(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
                      CUDA_R_32F, ldc,
                      h != nullptr && h->math == CUBLAS_TF32_TENSOR_OP_MATH ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                            : CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta,
                                          cublasOperation_t tb, int m, int n, int k,
                                          const void* alpha, const void* A, cudaDataType at,
                                          int lda, long long sa, const void* B, cudaDataType bt,
                                          int ldb, long long sb, const void* beta, void* C,
                                          cudaDataType ct, int ldc, long long sc, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t) {
  Gemm g;
  const cublasStatus_t st = prepare(h, ta, tb, m, n, k, alpha, at, lda, bt, ldb, beta, ct, ldc,
                                    compute, "cublasGemmStridedBatchedEx", g);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  const auto* a8 = static_cast<const unsigned char*>(A);
  const auto* b8 = static_cast<const unsigned char*>(B);
  auto* c8 = static_cast<unsigned char*>(C);
  const std::size_t ea = esize(at), eb = esize(bt), ec = esize(ct);
  for (int i = 0; i < batch; ++i)
    if (!check_operands(g, a8 + i * sa * static_cast<long long>(ea), b8 + i * sb * static_cast<long long>(eb),
                        c8 + i * sc * static_cast<long long>(ec), "cublasGemmStridedBatchedEx", i)) {
      set_sticky(cudaErrorIllegalAddress);
      return CUBLAS_STATUS_EXECUTION_FAILED;
    }
  // Overlapping C slices: the batch's products race on a GPU.
  if (batch > 1 && g.m > 0 && g.n > 0) {
    const long long span = static_cast<long long>(extent(g.m, g.n, g.ldc, ct) / ec);
    const long long step = sc < 0 ? -sc : sc;
    if (step < span) {
      // Allowed only when the slices' elements interleave without touching (e.g. heads a
      // fixed column offset apart inside wider rows): check element by element.
      bool overlap = false;
      if (step == 0) overlap = true;
      else if (step < g.m) overlap = true;  // two slices share a column segment
      else {
        // column j of slice i covers [i*sc + j*ldc, +m); slices i and i' overlap when
        // (i' - i) * sc + (j' - j) * ldc lands inside (-m, m).
        for (int d = 1; d < batch && !overlap; ++d)
          for (int dj = -(g.n - 1); dj <= g.n - 1 && !overlap; ++dj) {
            const long long off = d * static_cast<long long>(sc) + static_cast<long long>(dj) * g.ldc;
            if (off > -g.m && off < g.m) overlap = true;
          }
      }
      if (overlap)
        warn("cublasGemmStridedBatchedEx: the %d output matrices overlap (m=%d n=%d ldc=%d "
             "strideC=%lld): a race on a GPU",
             batch, g.m, g.n, g.ldc, sc);
    }
  }
  return submit(h, [g, a8, b8, c8, sa, sb, sc, ea, eb, ec, batch] {
    count_call(g, "cublasGemmStridedBatchedEx", batch, 0);
    for (int i = 0; i < batch; ++i)
      run_gemm(g, a8 + i * sa * static_cast<long long>(ea), b8 + i * sb * static_cast<long long>(eb),
               c8 + i * sc * static_cast<long long>(ec));
  });
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta,
                                         cublasOperation_t tb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda,
                                         long long sa, const float* B, int ldb, long long sb,
                                         const float* beta, float* C, int ldc, long long sc,
                                         int batch) {
  return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, sa, B,
                                    CUDA_R_32F, ldb, sb, beta, C, CUDA_R_32F, ldc, sc, batch,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t cublasGemmBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                   int m, int n, int k, const void* alpha, const void* const A[],
                                   cudaDataType at, int lda, const void* const B[],
                                   cudaDataType bt, int ldb, const void* beta, void* const C[],
                                   cudaDataType ct, int ldc, int batch,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
  Gemm g;
  const cublasStatus_t st = prepare(h, ta, tb, m, n, k, alpha, at, lda, bt, ldb, beta, ct, ldc,
                                    compute, "cublasGemmBatchedEx", g);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (batch > 0 && (!device_range(A, sizeof(void*) * batch) || !device_range(B, sizeof(void*) * batch) ||
                    !device_range(C, sizeof(void*) * batch))) {
    warn("cublasGemmBatchedEx: a pointer array is not a device array of %d pointers", batch);
    set_sticky(cudaErrorIllegalAddress);
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  // The pointer arrays live in device memory and are read when the GEMM runs (a graph
  // replay reads the arrays' contents at replay time).
  return submit(h, [g, A, B, C, batch] {
    for (int i = 0; i < batch; ++i) {
      if (!check_operands(g, A[i], B[i], C[i], "cublasGemmBatchedEx", i)) {
        set_sticky(cudaErrorIllegalAddress);
        return;
      }
      for (int j = 0; j < i; ++j)
        if (C[j] == C[i] && g.m > 0 && g.n > 0)
          warn("cublasGemmBatchedEx: matrices %d and %d write the same C: a race on a GPU", j, i);
    }
    count_call(g, "cublasGemmBatchedEx", batch, 3 * sizeof(void*) * static_cast<std::size_t>(batch));
    for (int i = 0; i < batch; ++i) run_gemm(g, A[i], B[i], C[i]);
  });
}
