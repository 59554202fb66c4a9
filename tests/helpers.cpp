#include "helpers.h"

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sys/wait.h>
#include <unistd.h>

#include "pion/core/random.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/runtime.h"
#endif

namespace pion::test {

Tensor random_tensor(const Shape& shape, std::uint64_t seed, double std, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype);
  Rng rng(seed);
  fill_normal(t, rng, 0.0, std);
  return t;
}

std::string temp_dir(const std::string& tag) {
  static std::atomic<int> counter{0};
  auto dir = std::filesystem::temp_directory_path() /
             ("pion_test_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

CommandResult run_command(const std::string& command) {
  CommandResult r;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf{};
  std::size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

CommandResult run_pion(const std::string& args) { return run_command(std::string(PION_BINARY) + " " + args); }

bool python_has(const std::string& modules) {
  std::string imports;
  std::string m;
  for (char c : modules + " ") {
    if (c == ' ') {
      if (!m.empty()) imports += "import " + m + ";";
      m.clear();
    } else {
      m += c;
    }
  }
  return run_command(python() + " -c '" + imports + "'").exit_code == 0;
}

bool cuda_device_present() {
#ifdef PION_HAVE_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

std::string source_dir() { return PION_SOURCE_DIR; }
// $PION_PYTHON overrides the build's choice (e.g. a GPU machine whose numpy and torch live in
// another Python than Debian's).
std::string python() {
  const char* env = std::getenv("PION_PYTHON");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(PION_PYTHON);
}

}  // namespace pion::test
