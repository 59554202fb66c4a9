#pragma once
// cudaProfilerStart / cudaProfilerStop (src/runtime.cpp): the range EMU_COUNT counts.
#include "emu/cuda_emu.h"

cudaError_t cudaProfilerStart();
cudaError_t cudaProfilerStop();
