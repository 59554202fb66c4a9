// CUDA runtime queries. The CUDA back end (optimizers and model kernels) grows beside this
// file; the CPU build never includes it.
#include <cuda_runtime.h>

#include <filesystem>
#include <string>
#include <system_error>

#include "pion/core/error.h"
#include "pion/cuda/runtime.h"

namespace pion::cuda {

static_assert(kCudaSuccess == static_cast<int>(cudaSuccess));
static_assert(kCudaErrorNoDevice == static_cast<int>(cudaErrorNoDevice));
static_assert(kCudaErrorInsufficientDriver == static_cast<int>(cudaErrorInsufficientDriver));

namespace {

std::string cuda_version(int v) {  // 13000 -> "13.0"
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

// True when the kernel driver exposes a GPU device node (/dev/nvidia0, /dev/nvidia1, ...):
// a GPU is there even if the CUDA user-space driver (libcuda.so.1) cannot be loaded.
bool gpu_device_node_present() {
  std::error_code ec;
  for (std::filesystem::directory_iterator it("/dev", ec), end; !ec && it != end;
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() > 6 && name.compare(0, 6, "nvidia") == 0 &&
        name.find_first_not_of("0123456789", 6) == std::string::npos)
      return true;
  }
  return false;
}

}  // namespace

// The rule (see runtime.h). Observed on a machine with the CUDA 13 toolkit and no NVIDIA
// driver at all (the CI case): cudaGetDeviceCount returns cudaErrorInsufficientDriver ("CUDA
// driver version is insufficient for CUDA runtime version") and cudaDriverGetVersion returns
// cudaSuccess with version 0, CUDA's documented "no driver installed". So that combination,
// with no /dev/nvidiaN node, is the only error that reads as "no GPU" besides
// cudaErrorNoDevice.
int classify_device_count(const DeviceQuery& q) {
  if (q.error == kCudaSuccess) return q.count;
  const std::string cuda_says = q.error_name + " (" + q.error_string + ")";
  if (q.error == kCudaErrorNoDevice) return 0;  // also when CUDA_VISIBLE_DEVICES hides them
  if (q.error == kCudaErrorInsufficientDriver && q.driver_version == 0 && !q.device_node)
    return 0;  // no NVIDIA driver installed and no GPU device node: a machine without a GPU
  std::string what = "cuda: cudaGetDeviceCount failed: " + cuda_says + "; ";
  if (q.error == kCudaErrorInsufficientDriver && q.driver_version > 0) {
    what += "the installed NVIDIA driver supports CUDA up to " + cuda_version(q.driver_version) +
            " but this pion was built with the CUDA " + cuda_version(q.runtime_version) +
            " runtime; install a newer NVIDIA driver (CUDA 13 needs driver 580 or later) or "
            "build with an older CUDA toolkit";
  } else if (q.device_node) {
    what += "a GPU device node (/dev/nvidiaN) exists, so a GPU is present but CUDA cannot use "
            "it; check `nvidia-smi`, that the CUDA driver library libcuda.so.1 is installed "
            "and matches the kernel driver (in a container: run it with the NVIDIA container "
            "toolkit, e.g. --gpus all), and CUDA_VISIBLE_DEVICES";
  } else {
    what += "this is not \"no GPU\" (that is cudaErrorNoDevice); check `nvidia-smi`, the "
            "NVIDIA driver and CUDA_VISIBLE_DEVICES";
  }
  throw Error(what);
}

int device_count() {
  DeviceQuery q;
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  q.error = static_cast<int>(e);
  q.count = n;
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls start clean
    q.error_name = cudaGetErrorName(e);
    q.error_string = cudaGetErrorString(e);
    if (cudaDriverGetVersion(&q.driver_version) != cudaSuccess) q.driver_version = 0;
    if (cudaRuntimeGetVersion(&q.runtime_version) != cudaSuccess) q.runtime_version = 0;
    q.device_node = gpu_device_node_present();
  }
  return classify_device_count(q);
}

}  // namespace pion::cuda
