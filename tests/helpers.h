#pragma once
// Helpers shared by the tests: random tensors, temp dirs, running the pion binary and Python.
#include <cstdint>
#include <string>

#include "pion/core/tensor.h"

namespace pion::test {

Tensor random_tensor(const Shape& shape, std::uint64_t seed, double std = 1.0, DType dtype = DType::F32);
// A fresh empty directory under the system temp dir, unique per call.
std::string temp_dir(const std::string& tag);
struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};
// Runs a shell command and captures its output and exit code.
CommandResult run_command(const std::string& command);
// True when `output` ends with exactly one "pion: error: ..." line, the CLI's one-line error
// (progress lines may precede it).
bool single_error_line(const std::string& output);
// Runs the built `pion` binary with the given argument string.
CommandResult run_pion(const std::string& args);
// True when /usr/bin/python3 can import every module in the space-separated list.
bool python_has(const std::string& modules);
std::string source_dir();
// <checkout>/../shared/data/<name>: where tests look for data that is not in the repository
// (the only place; a test that needs it skips when it is missing).
std::string shared_data_path(const std::string& name);
// Training text for the end-to-end tests when ../shared is missing: English prose that uses
// every printable ASCII character, then arithmetic lines ("123+45=168"), about `bytes` long.
std::string fallback_corpus(std::size_t bytes);
// True when this build has the CUDA back end and the machine a CUDA device.
bool cuda_device_present();
std::string python();

}  // namespace pion::test
