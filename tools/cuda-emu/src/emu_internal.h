#pragma once
// Shared between the emulator's runtime.cpp and cublas.cpp (not seen by the CUDA sources).
#include <functional>
#include <string>

#include "emu/cuda_emu.h"

namespace emu {
struct Config {
  int order = 0;        // EMU_ORDER: forward (0), reverse (1) or random (2) thread and block order
  unsigned seed = 1;    // EMU_SEED for random
  bool poison = true;   // EMU_POISON: NaN bytes in fresh cudaMalloc memory, dynamic shared memory
  bool strict = false;  // EMU_STRICT: abort at the first warning
  bool trace = false;   // EMU_TRACE: print every kernel launch
};
Config& config();
cudaError_t enqueue(cudaStream_t stream, std::function<void()> op, bool is_kernel);
bool device_range(const void* p, std::size_t bytes);
bool device_pointer(const void* p);
void set_sticky(cudaError_t e);
[[noreturn]] void fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
long warning_count();

// EMU_COUNT (count.cpp; see ../README.md, "Counting").
bool count_mode();  // EMU_COUNT is set: device allocations are whole mmap'd pages, counted
void* count_alloc(std::size_t bytes);  // a device allocation in count mode (nullptr: no memory)
void count_free(void* p);
// cudaProfilerStart (true) / cudaProfilerStop (false): from the first start on, only the
// work between a start and a stop counts; a stop also writes the JSON.
void count_window(bool start);
// Around one grid: begin protects every device allocation (false when not counting now);
// end records the launch under `name` and its touched bytes, and restores the protections.
bool count_kernel_begin();
void count_kernel_end(const char* name);
// One GEMM call as it runs: 2 m n k batch flops; A and B read, C read when beta != 0, C
// written, with the types' element sizes; extra_read: other device bytes read (pointer arrays).
void count_gemm(const char* entry, bool tf32, cudaDataType at, cudaDataType bt, cudaDataType ct,
                int m, int n, int k, int batch, bool reads_c, std::size_t extra_read);
// A copy or memset as it runs, e.g. "cudaMemcpyAsync DtoH".
void count_copy(const std::string& what, std::size_t bytes);
// One stream operation the host submitted itself (a kernel launch, a cuBLAS call, an async
// copy or memset; not one a graph replays), or one cudaGraphLaunch: what the host pays per
// launch on a GPU, which a graph replaces by one call.
void count_submit(bool graph_launch);
}  // namespace emu
