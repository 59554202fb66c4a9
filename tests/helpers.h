#pragma once
// Helpers shared by the tests: random tensors and token ids, the tiny model and `pion train`
// run several test files use, temp dirs, running the pion binary and Python.
#include <cstdint>
#include <string>
#include <vector>

#include "pion/core/tensor.h"
#include "pion/model/config.h"

namespace pion::test {

Tensor random_tensor(const Shape& shape, std::uint64_t seed, double std = 1.0, DType dtype = DType::F32);
// n token ids drawn uniformly from [0, vocab): the inputs and targets of the model, layer and
// GRPO tests, which all draw them the same way.
std::vector<std::int32_t> random_ids(std::size_t n, int vocab, std::uint64_t seed);
// The small decoder (vocab 13, 2 layers, 2 heads, d_model 16, seq_len 7, init_std 0.2) that the
// model and GRPO tests check against their PyTorch references and finite differences.
ModelConfig tiny_model_config();
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
// The flags of the small `pion train` run (2 layers of d_model 32, 12 steps, dropout on) that
// the end-to-end train tests stop, resume and compare bit for bit.
std::string tiny_train_flags(const std::string& data, const std::string& out,
                             const std::string& optimizer);
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
