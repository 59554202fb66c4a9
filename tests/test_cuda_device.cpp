// pion::cuda::device_count's rule (include/pion/cuda/runtime.h): only "no GPU" reads as 0;
// every other CUDA error throws with CUDA's own name and message, so a broken GPU set-up (a
// driver too old for the CUDA 13 runtime, a GPU node without a usable libcuda) fails the GPU
// tests instead of skipping them. The rule is tested here with made-up runtime answers
// (classify_device_count), on any machine; tools/cuda-emu/run.sh also runs a whole test
// program under a faked cudaGetDeviceCount error (EMU_FAKE_DEVICE_ERROR).
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "pion/core/error.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/runtime.h"
#endif

#ifndef PION_HAVE_CUDA

TEST(CudaDevice, NeedsCudaBuild) {
  GTEST_SKIP() << "CUDA back end not compiled (PION_CUDA=OFF or no nvcc)";
}

#else

namespace {

using pion::cuda::classify_device_count;
using pion::cuda::DeviceQuery;

constexpr int kCudaErrorUnknown = 999;  // cudaErrorUnknown

DeviceQuery failed(int error, const char* name, const char* message) {
  DeviceQuery q;
  q.error = error;
  q.error_name = name;
  q.error_string = message;
  q.runtime_version = 13000;
  return q;
}

DeviceQuery insufficient_driver(int driver_version, bool node) {
  DeviceQuery q = failed(pion::cuda::kCudaErrorInsufficientDriver, "cudaErrorInsufficientDriver",
                         "CUDA driver version is insufficient for CUDA runtime version");
  q.driver_version = driver_version;
  q.device_node = node;
  return q;
}

// The error classify_device_count throws for q (fails the test when it returns).
std::string error_of(const DeviceQuery& q) {
  try {
    const int n = classify_device_count(q);
    ADD_FAILURE() << "expected pion::Error, got a count of " << n;
  } catch (const pion::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

TEST(CudaDevice, SuccessGivesTheCount) {
  DeviceQuery q;
  q.count = 2;
  EXPECT_EQ(classify_device_count(q), 2);
}

TEST(CudaDevice, NoDeviceIsNoGpu) {
  DeviceQuery q =
      failed(pion::cuda::kCudaErrorNoDevice, "cudaErrorNoDevice", "no CUDA-capable device");
  q.driver_version = 13000;
  EXPECT_EQ(classify_device_count(q), 0);
  q.device_node = true;  // e.g. CUDA_VISIBLE_DEVICES="" hides the machine's GPUs
  EXPECT_EQ(classify_device_count(q), 0);
}

// What a machine with the toolkit and no NVIDIA driver at all (CI) answers: no GPU.
TEST(CudaDevice, NoDriverInstalledAndNoGpuNodeIsNoGpu) {
  EXPECT_EQ(classify_device_count(insufficient_driver(0, false)), 0);
}

TEST(CudaDevice, DriverTooOldIsAnErrorWithCudasMessage) {
  const std::string what = error_of(insufficient_driver(12040, true));
  EXPECT_TRUE(contains(what, "cudaErrorInsufficientDriver")) << what;
  EXPECT_TRUE(contains(what, "CUDA driver version is insufficient")) << what;
  EXPECT_TRUE(contains(what, "supports CUDA up to 12.4")) << what;
  EXPECT_TRUE(contains(what, "CUDA 13.0 runtime")) << what;
  EXPECT_TRUE(contains(what, "install a newer NVIDIA driver")) << what;
  // Without a device node too: an installed driver says a GPU set-up is meant to be there.
  EXPECT_TRUE(contains(error_of(insufficient_driver(12040, false)), "supports CUDA up to 12.4"));
}

TEST(CudaDevice, GpuNodeWithoutDriverLibraryIsAnError) {
  const std::string what = error_of(insufficient_driver(0, true));
  EXPECT_TRUE(contains(what, "cudaErrorInsufficientDriver")) << what;
  EXPECT_TRUE(contains(what, "/dev/nvidiaN")) << what;
  EXPECT_TRUE(contains(what, "libcuda.so.1")) << what;
}

TEST(CudaDevice, AnyOtherErrorIsAnErrorNotNoGpu) {
  for (bool node : {false, true}) {
    DeviceQuery q = failed(kCudaErrorUnknown, "cudaErrorUnknown", "unknown error");
    q.device_node = node;
    const std::string what = error_of(q);
    EXPECT_EQ(what.rfind("cuda: cudaGetDeviceCount failed: cudaErrorUnknown (unknown error)", 0),
              0u)
        << what;
    EXPECT_TRUE(contains(what, "nvidia-smi")) << what;
  }
  const std::string init = error_of(failed(3, "cudaErrorInitializationError", "initialization error"));
  EXPECT_TRUE(contains(init, "cudaErrorInitializationError (initialization error)")) << init;
}

// On this machine: device_count() either counts devices, or says "no GPU", or throws with
// CUDA's message; it never throws anything but pion::Error.
TEST(CudaDevice, DeviceCountOnThisMachine) {
  try {
    const int n = pion::cuda::device_count();
    EXPECT_GE(n, 0);
    std::printf("device_count() = %d\n", n);
  } catch (const pion::Error& e) {
    ADD_FAILURE() << "this machine's CUDA set-up is broken: " << e.what();
  }
}

}  // namespace

#endif
