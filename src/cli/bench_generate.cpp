// `pion bench generate` (src/cli/bench_generate.h). Two prompt sets: one-token prompts, where
// prompt + new tokens fit the model's seq_len (the cache's regime), and prompts of 1..16
// tokens, where the longer ones slide past seq_len for their last tokens and are re-prefilled
// each step (generate.h). Each set runs three ways: the uncached reference, cached one
// sequence at a time (max_batch 1: what the cache alone buys) and cached batched; with
// --device cuda the GPU's cached paths, one at a time and batched, follow the CPU's batched one
// (the model's weights uploaded once, before timing; logits come back to the host, where the
// tokens are sampled, as in `pion sample --device cuda`).
#include "cli/bench_generate.h"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli/run_on_device.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/model/generate.h"
#include "pion/train/checkpoint.h"

namespace pion::cli {

namespace {

struct Row {
  std::string prompts, path;
  double seconds = 0;
  bool same_tokens = true;
};

std::string today() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

template <class F>
double fastest_seconds(int repeats, F&& run) {
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

void run_bench_generate(const BenchGenerateArgs& a) {
  require_device(a.device);
  ModelConfig c;
  c.vocab_size = a.vocab;
  c.n_layer = a.n_layer;
  c.n_head = a.n_head;
  c.d_model = a.d_model;
  c.seq_len = a.seq_len;
  // Spread-out logits (init_std 0.02 gives near-ties that the two paths' float rounding could
  // break differently, which would make the token check below meaningless).
  c.init_std = 0.3;
  c.validate();
  Llama<float> model(c);
  Rng init(1);
  model.init_weights(init);

  GenerateOptions opts;
  opts.max_new_tokens = a.tokens;
  opts.sampling.temperature = 0.0;
  Rng prompt_rng(2), unused(0);
  auto draw = [&](int len) {
    std::vector<std::int32_t> p(static_cast<std::size_t>(len));
    for (auto& t : p) t = static_cast<std::int32_t>(prompt_rng.below(static_cast<std::uint64_t>(a.vocab)));
    return p;
  };
  std::vector<std::pair<std::string, std::vector<std::vector<std::int32_t>>>> sets(2);
  sets[0].first = "1 token";
  sets[1].first = "1.." + std::to_string(a.max_prompt) + " tokens";
  for (int i = 0; i < a.sequences; ++i) {
    sets[0].second.push_back(draw(1));
    sets[1].second.push_back(
        draw(1 + static_cast<int>(prompt_rng.below(static_cast<std::uint64_t>(a.max_prompt)))));
  }

  const bool cuda = a.device == "cuda";
  // The GPU copy of the model (uploaded here, outside the timed runs).
  const TokenGenerator gpu =
      cuda ? generator_on_device("cuda", a.matmul_precision, model) : TokenGenerator();
  struct Path {
    std::string name;
    int batch;  // GenerateOptions::max_batch
    bool on_gpu;
  };
  std::vector<Path> paths;
  if (!cuda) paths.push_back({"cached, one at a time", 1, false});
  paths.push_back({"cached, batched", 0, false});
  if (cuda) {
    paths.push_back({"cuda cached, one at a time", 1, true});
    paths.push_back({"cuda cached, batched", 0, true});
  }
  std::vector<Row> rows;
  for (const auto& [name, prompts] : sets) {
    std::vector<Generation> ref, got;
    rows.push_back({name, "uncached, one at a time", fastest_seconds(a.repeats, [&] {
                      ref = generate_tokens_uncached(model, prompts, opts, std::span(&unused, 1));
                    })});
    for (const Path& p : paths) {
      GenerateOptions o = opts;
      o.max_batch = p.batch;
      Row r{name, p.name, fastest_seconds(a.repeats, [&] {
              got = p.on_gpu ? gpu(prompts, o, std::span(&unused, 1))
                             : generate_tokens(model, prompts, o, std::span(&unused, 1));
            })};
      for (std::size_t i = 0; i < ref.size(); ++i) r.same_tokens &= got[i].tokens == ref[i].tokens;
      rows.push_back(r);
    }
  }

  const double new_tokens = static_cast<double>(a.sequences) * a.tokens;
  std::ostringstream t;
  t << "\npion bench generate | " << a.sequences << " sequences x " << a.tokens
    << " new tokens, greedy | device " << a.device
    << (cuda ? " (" + a.matmul_precision + " GEMMs)" : std::string()) << " | model n_layer "
    << a.n_layer << ", n_head " << a.n_head << ", d_model " << a.d_model << ", seq_len "
    << a.seq_len << ", vocab " << a.vocab << " | " << today() << "\n\n"
    << "| prompts | path | seconds | tokens/s | vs uncached | same tokens |\n"
    << "|---|---|---:|---:|---:|---|\n";
  nlohmann::json j = {{"sequences", a.sequences}, {"tokens", a.tokens},
                      {"n_layer", a.n_layer},     {"n_head", a.n_head},
                      {"d_model", a.d_model},     {"seq_len", a.seq_len},
                      {"vocab", a.vocab},         {"date", today()},
                      {"device", a.device},       {"results", nlohmann::json::array()}};
  if (cuda) j["matmul_precision"] = a.matmul_precision;
  double base = 0;
  for (const Row& r : rows) {
    if (r.path.rfind("uncached", 0) == 0) base = r.seconds;
    const double speedup = base / r.seconds;
    t << "| " << r.prompts << " | " << r.path << " | " << std::fixed << std::setprecision(3)
      << r.seconds << " | " << std::setprecision(0) << new_tokens / r.seconds << " | "
      << std::setprecision(1) << speedup << "x | " << (r.same_tokens ? "yes" : "NO") << " |\n";
    j["results"].push_back({{"prompts", r.prompts},
                            {"path", r.path},
                            {"seconds", r.seconds},
                            {"tokens_per_sec", new_tokens / r.seconds},
                            {"speedup_vs_uncached", speedup},
                            {"same_tokens", r.same_tokens}});
  }
  std::cout << t.str();
  if (!a.json.empty()) write_json_file(a.json, j);
}

void add_bench_generate_command(CLI::App& bench) {
  auto args = std::make_shared<BenchGenerateArgs>();
  auto* cmd = bench.add_subcommand(
      "generate",
      "generation speed: KV-cached and batched vs uncached on the CPU, same run (--device cuda: "
      "and the GPU's cached paths)");
  cmd->add_option("--sequences", args->sequences, "prompts decoded")
      ->check(FiniteRange(1, 4096))
      ->capture_default_str();
  cmd->add_option("--tokens", args->tokens, "new tokens per sequence")
      ->check(FiniteRange(1, 100000))
      ->capture_default_str();
  cmd->add_option("--n_layer", args->n_layer, "model layers")->check(FiniteRange(1, 1024))->capture_default_str();
  cmd->add_option("--n_head", args->n_head, "attention heads")->check(FiniteRange(1, 1024))->capture_default_str();
  cmd->add_option("--d_model", args->d_model, "model width")->check(FiniteRange(2, 65536))->capture_default_str();
  cmd->add_option("--seq_len", args->seq_len, "context length")->check(FiniteRange(1, 1 << 20))->capture_default_str();
  cmd->add_option("--vocab", args->vocab, "vocabulary size")->check(FiniteRange(2, 65536))->capture_default_str();
  cmd->add_option("--max_prompt", args->max_prompt, "longest prompt of the mixed-length set")
      ->check(FiniteRange(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--repeats", args->repeats, "runs of each path; the fastest counts")
      ->check(FiniteRange(1, 100))
      ->capture_default_str();
  cmd->add_option("--device", args->device, "cpu | cuda (cuda: also time the GPU's cached paths)")
      ->capture_default_str();
  cmd->add_option("--matmul_precision", args->matmul_precision,
                  "cuda: the model's GEMMs, bf16 | tf32 | fp32")
      ->check(CLI::IsMember({"bf16", "tf32", "fp32"}))
      ->capture_default_str();
  cmd->add_option("--json", args->json, "also write the results to this JSON file");
  cmd->callback([args] { run_bench_generate(*args); });
}

}  // namespace pion::cli
