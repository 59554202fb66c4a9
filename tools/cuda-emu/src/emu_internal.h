#pragma once
// Shared between the emulator's runtime.cpp and cublas.cpp (not seen by the CUDA sources).
#include <functional>

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
}  // namespace emu
