#pragma once
// Which back ends this build has. CUDA code lives in cuda/ and is compiled only when CMake
// found nvcc (PION_CUDA=AUTO|ON); CPU code never depends on it. Defined in
// src/device/device.cpp, the library pion_device (not pion_core: it calls into pion_cuda),
// which programs link beside pion_core.
#include <string>

namespace pion {

bool cuda_compiled();
// Number of CUDA devices visible at run time (0 when not compiled or no GPU; throws
// pion::Error when CUDA fails otherwise, see pion::cuda::device_count).
int cuda_device_count();
// A one-line description for logs and `pion --version`.
std::string backend_summary();

}  // namespace pion
