// pion/core/device.h. Compiled into pion_device, which links pion_cuda when the build has
// the CUDA back end (PION_HAVE_CUDA comes with it), so pion_core itself never does.
#include "pion/core/device.h"

#include <exception>

#ifdef PION_HAVE_CUDA
#include "pion/cuda/runtime.h"  // cuda::device_count, defined in cuda/device.cu
#endif

namespace pion {

bool cuda_compiled() {
#ifdef PION_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef PION_HAVE_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

std::string backend_summary() {
  std::string s = "cpu (OpenBLAS + OpenMP)";
  if (cuda_compiled()) {
    // A broken CUDA set-up is reported here, not hidden: the CPU back end still works, so
    // `pion --version` and CPU runs print CUDA's error instead of failing or saying "0".
    try {
      s += ", cuda compiled (" + std::to_string(cuda_device_count()) + " device(s) visible)";
    } catch (const std::exception& e) {
      s += std::string(", cuda compiled (CUDA error: ") + e.what() + ")";
    }
  }
  else
    s += ", cuda not compiled";
  return s;
}

}  // namespace pion
