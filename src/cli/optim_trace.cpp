// `pion optim-trace`: replays a recorded gradient trace through one optimizer, so its
// arithmetic can be compared step for step with an independent fp64 reference
// (tests/reference/trace_check.py) without a model in the loop.
//
// Input (safetensors, all F32): W.<i> the 2-D initial weights, i = 0..n-1, and g.<i>.<t> the
// gradient of matrix i at step t, t = 0..T-1 for every i. Output: the final W.<i> after T
// steps at the constant learning rate of the config, written atomically.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/core/safetensors.h"
#include "pion/optim/factory.h"
#include "pion/optim/pion.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/optim_like.h"
#endif

namespace pion::cli {

namespace {

struct TraceArgs {
  std::string optimizer;
  std::string config = "{}";
  std::string input;
  std::string output;
  std::string device = "cpu";      // cpu | cuda
  std::string precision = "fp32";  // cuda: Pion fp32 | mixed, Muon bf16 | fp32
};

// Inline JSON wins: an argument whose first non-blank character is '{' or '[' is parsed as JSON
// text (an array is then rejected by the factory as "not a JSON object"), anything else is read
// as the path of a JSON file; file names practically never start with those characters.
nlohmann::json parse_config_arg(const std::string& arg) {
  const auto first = arg.find_first_not_of(" \t\r\n");
  const bool inline_json = first != std::string::npos && (arg[first] == '{' || arg[first] == '[');
  if (inline_json) return input::parse_json(arg, "--config text");
  // A regular file of at most input::kMaxJsonBytes (a device or directory is refused by name),
  // parsed with the depth and duplicate-key limits.
  return input::read_json_file(arg, "--config file");
}

// A non-negative decimal index without sign or leading zeros ("0", "17"; not "01", "+1").
std::optional<std::int64_t> parse_index(std::string_view s) {
  if (s.empty() || s.size() > 9 || (s.size() > 1 && s[0] == '0')) return std::nullopt;
  std::int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < 0) return std::nullopt;
  return v;
}

std::string w_name(std::int64_t i) {
  return "W." + std::to_string(i);
}
std::string g_name(std::int64_t i, std::int64_t t) {
  return "g." + std::to_string(i) + "." + std::to_string(t);
}

struct Trace {
  std::vector<Tensor> weights;             // weights[i]
  std::vector<std::vector<Tensor>> grads;  // grads[i][t]
  std::int64_t steps = 0;
};

// Sorts the file's tensors into a Trace and checks everything the optimizer will rely on, so
// a malformed trace is a clear error before any step runs.
Trace parse_trace(const TensorFile& file, const std::string& source) {
  const std::string where = "input '" + source + "'";
  const std::string layout = " (expected W.<i> for i = 0..n-1 and g.<i>.<t> for t = 0..T-1)";
  std::map<std::int64_t, Tensor> weights;
  std::map<std::int64_t, std::map<std::int64_t, Tensor>> grads;
  for (const auto& [name, tensor] : file.tensors) {
    std::optional<std::int64_t> i, t;
    if (name.starts_with("W.")) {
      i = parse_index(std::string_view(name).substr(2));
    } else if (name.starts_with("g.")) {
      const std::string_view rest = std::string_view(name).substr(2);
      const auto dot = rest.find('.');
      if (dot != std::string_view::npos) {
        i = parse_index(rest.substr(0, dot));
        t = parse_index(rest.substr(dot + 1));
      }
      if (!t) i.reset();
    }
    // Quoted as JSON and cut short (input::describe), so a name with control characters or
    // thousands of bytes cannot break the one-line message.
    check(i.has_value(), where + " holds an unexpected tensor " + input::describe(name) + layout);
    check(tensor.dtype() == DType::F32, where + ": '" + name + "' has dtype " +
                                            dtype_name(tensor.dtype()) +
                                            "; optim-trace reads F32 tensors only");
    if (t) {
      grads[*i][*t] = tensor;
    } else {
      weights[*i] = tensor;
    }
  }
  check(!weights.empty(), where + " holds no weight matrix W.0" + layout);
  const auto n = static_cast<std::int64_t>(weights.size());
  for (std::int64_t i = 0; i < n; ++i) {
    check(weights.contains(i), where + " lacks " + w_name(i) + " but holds " +
                                   w_name(weights.rbegin()->first) +
                                   ": matrices must be numbered 0..n-1 without gaps");
  }
  for (const auto& [i, per_step] : grads) {
    check(i < n, where + ": gradient " + g_name(i, per_step.begin()->first) + " has no matrix " +
                     w_name(i) + " (matrices are W.0.." + w_name(n - 1) + ")");
  }
  // T is one past the largest step seen anywhere; every matrix needs every step below it.
  std::int64_t steps = 0;
  std::int64_t longest = 0;
  for (const auto& [i, per_step] : grads) {
    if (per_step.rbegin()->first + 1 > steps) {
      steps = per_step.rbegin()->first + 1;
      longest = i;
    }
  }
  check(steps > 0, where + " holds no gradients g.<i>.<t>" + layout);

  Trace trace;
  trace.steps = steps;
  for (std::int64_t i = 0; i < n; ++i) {
    const Tensor& w = weights.at(i);
    check(w.ndim() == 2 && w.numel() > 0, where + ": " + w_name(i) + " has shape " +
                                              shape_string(w.shape()) +
                                              "; weights must be non-empty 2-D matrices");
    for (float x : w.span<float>()) {
      check(std::isfinite(x), where + ": " + w_name(i) + " holds NaN or Inf");
    }
    std::vector<Tensor> per_step;
    for (std::int64_t t = 0; t < steps; ++t) {
      auto it = grads.find(i);
      const bool present = it != grads.end() && it->second.contains(t);
      check(present, where + " lacks gradient " + g_name(i, t) + " (" + g_name(longest, steps - 1) +
                         " exists, so every matrix needs g.<i>.0.." + g_name(i, steps - 1) + ")");
      const Tensor& g = it->second.at(t);
      check(g.shape() == w.shape(), where + ": gradient " + g_name(i, t) + " has shape " +
                                        shape_string(g.shape()) + " but " + w_name(i) +
                                        " has shape " + shape_string(w.shape()));
      per_step.push_back(g);
    }
    trace.weights.push_back(w);
    trace.grads.push_back(std::move(per_step));
  }
  return trace;
}

// The same replay through the CUDA optimizer configured like `cpu` (its one param group):
// weights uploaded once, each step's gradients uploaded, weights downloaded at the end.
// Returns the steps skipped for non-finite gradients (decided on the device).
std::int64_t replay_on_gpu(const Optimizer& cpu, const Trace& trace, std::vector<Param>& params,
                           const std::string& precision) {
#ifdef PION_HAVE_CUDA
  check(cuda::device_count() > 0,
        "optim-trace --device cuda: no CUDA device is visible (cudaGetDeviceCount reports "
        "none); run on a machine with an NVIDIA GPU, or use --device cpu");
  check(cpu.groups().size() == 1, "optim-trace --device cuda: expected one param group");
  check(precision == "fp32" || precision == "mixed" || precision == "bf16",
        "--precision must be fp32, mixed (pion) or bf16 (muon), got '" + precision + "'");
  cuda::CudaPrecisions prec;
  if (cpu.kind() == "pion") prec.pion = precision;
  if (cpu.kind() == "muon") prec.muon = precision == "fp32" ? "fp32" : "bf16";
  cuda::Context ctx;
  std::vector<cuda::DeviceBuffer> values, grads;
  std::vector<cuda::DeviceParam> device_params;
  for (const Param& p : params) {
    const auto n = static_cast<std::size_t>(p.value.numel());
    values.emplace_back(n);
    grads.emplace_back(n);
    values.back().upload(p.value.data<float>(), n);
    device_params.push_back(
        {p.name, values.back().data(), grads.back().data(), p.value.rows(), p.value.cols()});
  }
  auto gpu = cuda::make_cuda_optimizer_like(ctx, cpu, 0, device_params, prec);
  const double lr = cpu.groups().front().lr;
  for (std::int64_t t = 0; t < trace.steps; ++t) {
    for (std::size_t i = 0; i < params.size(); ++i) {
      const Tensor& g = trace.grads[i][static_cast<std::size_t>(t)];
      grads[i].upload(g.data<float>(), static_cast<std::size_t>(g.numel()));
    }
    gpu->step(lr);
  }
  ctx.synchronize();
  for (std::size_t i = 0; i < params.size(); ++i)
    values[i].download(params[i].value.data<float>(), values[i].size());
  return gpu->skipped_steps();
#else
  (void)cpu, (void)trace, (void)params, (void)precision;
  throw Error(
      "optim-trace --device cuda: this pion was built without the CUDA back end (PION_CUDA=OFF "
      "or no nvcc); rebuild with -DPION_CUDA=ON, or use --device cpu");
#endif
}

void run_optim_trace(const TraceArgs& args) {
  // Cheap checks first, so a typo in the command fails before a large file is read.
  const nlohmann::json config = parse_config_arg(args.config);
  optimizer_config_keys(args.optimizer);  // throws for an unknown optimizer
  check(args.device == "cpu" || args.device == "cuda",
        "--device must be cpu or cuda, got '" + args.device + "'");
  Trace trace = parse_trace(load_safetensors(args.input), args.input);

  std::vector<Param> params;
  for (std::size_t i = 0; i < trace.weights.size(); ++i) {
    const Tensor& w = trace.weights[i];
    params.push_back(Param{w_name(static_cast<std::int64_t>(i)), w, Tensor::empty(w.shape())});
  }
  std::unique_ptr<Optimizer> optimizer = make_optimizer(args.optimizer, config, params);

  std::int64_t skipped = 0;
  if (args.device == "cuda") {
    skipped = replay_on_gpu(*optimizer, trace, params, args.precision);
  } else {
    for (std::int64_t t = 0; t < trace.steps; ++t) {
      for (std::size_t i = 0; i < params.size(); ++i) {
        params[i].grad.copy_from(trace.grads[i][static_cast<std::size_t>(t)]);
      }
      optimizer->step();  // a non-finite gradient skips the step; counted below
    }
    skipped = optimizer->skipped_steps();
  }

  TensorFile out;
  for (const Param& p : params) out.tensors.emplace(p.name, p.value);
  out.metadata = {{"optimizer", args.optimizer},
                  {"config", config.dump()},
                  {"steps", std::to_string(trace.steps)},
                  {"device", args.device},
                  {"skipped_steps", std::to_string(skipped)}};
  save_safetensors(args.output, out);
  std::cout << "optim-trace: " << args.optimizer << " applied " << trace.steps << " steps to "
            << params.size() << " matrices (" << skipped
            << " skipped for non-finite gradients) on the " << args.device << "; wrote "
            << args.output << "\n";
}

}  // namespace

void add_optim_trace_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "optim-trace",
      "replay a gradient trace through one optimizer (cross-check against other implementations)");
  cmd->footer(
      "IN holds fp32 W.<i> (initial 2-D weights) and g.<i>.<t> (gradient of matrix i at step t, "
      "t = 0..T-1); T steps run at the config's constant learning rate and OUT gets the final "
      "W.<i>. Bad input: one-line error, exit code 2.");
  auto args = std::make_shared<TraceArgs>();
  cmd->add_option("--optimizer", args->optimizer, "adamw | muon | pion")->required();
  cmd->add_option("--config", args->config,
                  "hyperparameters as a JSON object, e.g. '{\"lr\": 0.01, \"c\": 0.2}'; a value "
                  "starting with '{' is inline JSON, anything else the path of a JSON file. "
                  "Missing keys take the optimizer's defaults")
      ->capture_default_str();
  cmd->add_option("--input", args->input, "safetensors trace to read")->required();
  cmd->add_option("--output", args->output, "safetensors file to write (atomically)")->required();
  cmd->add_option("--device", args->device, "cpu | cuda (the GPU optimizer, same options)")
      ->capture_default_str();
  cmd->add_option("--precision", args->precision,
                  "cuda: pion fp32 | mixed, muon bf16 | fp32 (adamw: fp32 always)")
      ->capture_default_str();
  cmd->callback([args] { run_optim_trace(*args); });
}

}  // namespace pion::cli
