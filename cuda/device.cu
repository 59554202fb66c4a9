// CUDA runtime queries. The CUDA back end (optimizers and model kernels) grows beside this
// file; the CPU build never includes it.
#include <cuda_runtime.h>

namespace pion::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return n;
}

}  // namespace pion::cuda
