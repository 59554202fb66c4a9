// KV-cached generation on the GPU (include/pion/cuda/generate.h) against the CPU path
// (pion/model/decode.h, generate.h) on random models of several shapes (multi-head, grouped-
// query with one and two K/V heads, tied embeddings, no norms, odd widths):
// - CudaDecoder's logits = the CPU Decoder's over a sequence of mixed calls (prefills with all
//   positions, decode steps, several slots at different lengths, a cleared and reused slot),
//   fp32 GEMMs; bf16 and tf32 to looser bounds;
// - greedy cuda::generate_tokens = CPU generate_tokens token for token, with prompts of
//   different lengths, more prompts than slots (refill), stop tokens, and contexts past
//   seq_len (the sliding window);
// - sampling (temperature, top-k, top-p) with one Rng per prompt = the CPU's tokens, and the
//   same in any batch;
// - the decoder reads the model's device weights at every call (a changed weight is seen);
// - bad input (token out of range, chunk over capacity, bad or repeated slot, empty chunk,
//   zero slots) is a pion::Error that leaves the slots as they were.
// Skips with a clear message without the CUDA back end or without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "pion/core/error.h"
#include "pion/core/random.h"
#include "pion/model/decode_engine.h"
#include "pion/model/generate.h"
#include "pion/model/llama.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/generate.h"
#include "pion/cuda/llama.h"
#include "pion/cuda/runtime.h"
#endif

#ifndef PION_HAVE_CUDA

TEST(CudaGenerate, NeedsCudaBuild) {
  GTEST_SKIP() << "CUDA back end not compiled (PION_CUDA=OFF or no nvcc); configure with "
                  "-DPION_CUDA=ON and run scripts/gpu-check.sh on a GPU machine";
}

#else

namespace {

using pion::DecodeChunk;
using pion::Error;
using pion::GenerateOptions;
using pion::Generation;
using pion::Llama;
using pion::ModelConfig;
using pion::Rng;
namespace cu = pion::cuda;

#define PION_REQUIRE_CUDA_DEVICE()                                                            \
  if (cu::device_count() == 0)                                                                \
  GTEST_SKIP() << "no CUDA device: cudaGetDeviceCount reports none (this build has the CUDA " \
                  "back end; run scripts/gpu-check.sh on a machine with an NVIDIA GPU)"

struct Shape {
  int n_layer, n_head, d_model, seq_len, vocab;
  int n_kv_head = 0;  // grouped-query attention when below n_head
  bool tied = false;
  bool norm_free = false;
  int ffn_hidden = 0;
};
// Odd sizes on purpose: vocab 37 and 29, head_dim 8 and 12 (d_model 24 / 2, 36 / 3), an FFN
// width that is no multiple of anything, seq_len 13 (tiles of 32 keys cut short).
const Shape kShapes[] = {{2, 2, 32, 16, 37},
                         {2, 4, 32, 16, 29, 2, true},
                         {3, 4, 32, 13, 37, 1, false, false, 50},
                         {2, 3, 36, 12, 29, 0, true, true},
                         {1, 4, 32, 16, 37, 2, false, true, 44},
                         {2, 2, 24, 40, 31}};

std::string describe(const Shape& s) {
  return "n_layer " + std::to_string(s.n_layer) + " n_head " + std::to_string(s.n_head) +
         " n_kv_head " + std::to_string(s.n_kv_head) + " d_model " + std::to_string(s.d_model) +
         " seq_len " + std::to_string(s.seq_len) + " vocab " + std::to_string(s.vocab) +
         (s.tied ? " tied" : "") + (s.norm_free ? " norm none" : "");
}

ModelConfig config_of(const Shape& s) {
  ModelConfig c;
  c.vocab_size = s.vocab;
  c.n_layer = s.n_layer;
  c.n_head = s.n_head;
  c.d_model = s.d_model;
  c.seq_len = s.seq_len;
  c.n_kv_head = s.n_kv_head;
  c.tie_embeddings = s.tied;
  c.ffn_hidden = s.ffn_hidden;
  if (s.norm_free) c.norm = "none";
  // Spread-out logits, as tests/test_generate.cpp: init_std 0.02 gives near-ties that the two
  // devices' rounding could break differently, which would make token equality meaningless.
  c.init_std = 0.3;
  return c;
}

Llama<float> cpu_model(const Shape& s, std::uint64_t seed) {
  Llama<float> model(config_of(s));
  Rng rng(seed);
  model.init_weights(rng);
  model.set_training(false);
  return model;
}

std::span<const float> host_params(Llama<float>& m) {
  return {m.params().data<float>(), static_cast<std::size_t>(m.params().numel())};
}

// The GPU model with the CPU model's weights.
struct Gpu {
  cu::Context ctx;
  cu::CudaLlama model;
  Gpu(Llama<float>& cpu, cu::MatmulPrecision precision = cu::MatmulPrecision::Fp32)
      : model(ctx, cpu.config(), {precision, cu::CudaAttention::Materialized}) {
    model.upload_params(host_params(cpu));
  }
};

std::vector<std::int32_t> random_tokens(int n, int vocab, Rng& rng) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
  return t;
}

float max_abs(std::span<const float> a) {
  float m = 0;
  for (float x : a) m = std::max(m, std::fabs(x));
  return m;
}

// max |a - b| / max |b|.
double rel_diff(std::span<const float> a, std::span<const float> b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
  return worst / std::max(1e-30, static_cast<double>(max_abs(b)));
}

// The same calls on two engines, returning the worst relative logit difference over them:
//   1. prefill slot 0 (5 tokens, all positions) and slot 2 (3 tokens);
//   2. slot 0 + 1 token, prefill slot 1 (7 tokens), slot 2 + 1 token;
//   3. single tokens for every slot until slot 1 is full (slot 0 and 2 stop short of it);
//   4. slot 1 cleared and re-prefilled with a whole window (all positions), slot 0 + 1.
// Lengths are compared after every call.
double run_mixed_calls(pion::DecodeEngine& a, pion::DecodeEngine& b, int vocab, int seq_len,
                       std::uint64_t seed) {
  Rng rng(seed);
  std::vector<std::vector<std::int32_t> > keep;  // chunk storage alive for the call
  double worst = 0;
  auto call = [&](const std::vector<std::pair<int, int> >& slot_len, bool all_positions) {
    keep.clear();
    std::vector<DecodeChunk> chunks;
    for (auto [slot, len] : slot_len) keep.push_back(random_tokens(len, vocab, rng));
    for (std::size_t i = 0; i < slot_len.size(); ++i)
      chunks.push_back({slot_len[i].first, keep[i]});
    const auto la = a.extend(chunks, all_positions);
    const std::vector<float> got(la.begin(), la.end());
    const auto lb = b.extend(chunks, all_positions);
    EXPECT_GT(max_abs(lb), 1.0f);  // spread-out logits: a relative bound is a real check
    worst = std::max(worst, rel_diff(got, lb));
    for (int s = 0; s < a.slots(); ++s) EXPECT_EQ(a.length(s), b.length(s)) << "slot " << s;
  };
  call({{0, 5}, {2, 3}}, true);
  call({{0, 1}, {1, 7}, {2, 1}}, false);
  while (b.length(1) < seq_len) {
    std::vector<std::pair<int, int> > step{{1, 1}};
    if (b.length(0) < seq_len - 1) step.push_back({0, 1});
    if (b.length(2) < seq_len - 2) step.push_back({2, 1});
    call(step, false);
  }
  a.clear(1);
  b.clear(1);
  call({{1, seq_len}, {0, 1}}, true);
  return worst;
}

}  // namespace

// fp32 GEMMs: the GPU decoder computes what the CPU Decoder computes, in another order
// (cuBLAS vs OpenBLAS sums, an online softmax in tiles of 32 keys vs two passes, expf vs the
// CPU's fast_exp, FMA contraction). Each is an fp32 rounding (~6e-8 relative) of sums over at
// most max(d_model, ffn) = 96 terms through at most 3 layers; 2e-5 of the largest logit leaves
// a wide margin for that, as the CPU's own cached-vs-full-forward check does (1e-5).
TEST(CudaGenerate, DecoderLogitsMatchCpuDecoderFp32) {
  PION_REQUIRE_CUDA_DEVICE();
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(describe(s));
    Llama<float> cpu = cpu_model(s, 7);
    Gpu gpu(cpu);
    cu::CudaDecoder dec(gpu.model, 3);
    pion::CpuDecodeEngine ref(cpu, 3);
    EXPECT_EQ(dec.slots(), 3);
    EXPECT_EQ(dec.capacity(), s.seq_len);
    const double worst = run_mixed_calls(dec, ref, s.vocab, s.seq_len, 21);
    std::printf("[cuda decode fp32] %s: worst |gpu - cpu| / max |logit| = %.2e\n",
                describe(s).c_str(), worst);
    EXPECT_LT(worst, 2e-5);
  }
}

// bf16 / tf32 GEMMs: inputs rounded to 8 / 11 significant bits (relative 4e-3 / 5e-4 per
// operand) through every GEMM of every layer; on the emulator the worst logit differences are
// 4e-2 (bf16) and 2.5e-3 (tf32) of the largest logit, and the bounds leave 2-4x for a GPU's
// other summation orders. A wrong index or operand would be off by O(1).
TEST(CudaGenerate, DecoderLogitsCloseToCpuBf16Tf32) {
  PION_REQUIRE_CUDA_DEVICE();
  for (auto [precision, name, tol] : {std::tuple{cu::MatmulPrecision::Bf16, "bf16", 1e-1},
                                      std::tuple{cu::MatmulPrecision::Tf32, "tf32", 1e-2}}) {
    for (const Shape& s : {kShapes[1], kShapes[3]}) {
      SCOPED_TRACE(std::string(name) + " " + describe(s));
      Llama<float> cpu = cpu_model(s, 8);
      Gpu gpu(cpu, precision);
      cu::CudaDecoder dec(gpu.model, 3);
      pion::CpuDecodeEngine ref(cpu, 3);
      const double worst = run_mixed_calls(dec, ref, s.vocab, s.seq_len, 22);
      std::printf("[cuda decode %s] %s: worst |gpu - cpu| / max |logit| = %.2e\n", name,
                  describe(s).c_str(), worst);
      EXPECT_LT(worst, tol);
    }
  }
}

// Greedy decoding: 7 prompts of 1 .. seq_len + 4 tokens (the longest start past the window)
// through 3 slots (refills), up to seq_len + 6 new tokens (contexts slide past seq_len), a
// stop token that ends some sequences early. The same tokens as the CPU, and log-probs to
// fp32 rounding.
TEST(CudaGenerate, GreedyTokensEqualCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(describe(s));
    Llama<float> cpu = cpu_model(s, 9);
    Gpu gpu(cpu);
    Rng rng(5);
    std::vector<std::vector<std::int32_t> > prompts;
    for (int len : {1, 3, s.seq_len - 2, 2, s.seq_len + 4, 5, s.seq_len})
      prompts.push_back(random_tokens(len, s.vocab, rng));
    GenerateOptions opts;
    opts.sampling.temperature = 0.0;
    opts.max_new_tokens = s.seq_len + 6;
    opts.max_batch = 3;
    opts.stop_tokens = {3};
    Rng unused(0);
    const auto want = pion::generate_tokens(cpu, prompts, opts, std::span(&unused, 1));
    const auto got = cu::generate_tokens(gpu.model, prompts, opts, std::span(&unused, 1));
    ASSERT_EQ(got.size(), want.size());
    std::size_t tokens = 0, stopped = 0;
    double worst_lp = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(got[i].tokens, want[i].tokens) << "prompt " << i;
      EXPECT_EQ(got[i].stopped, want[i].stopped) << "prompt " << i;
      ASSERT_EQ(got[i].log_probs.size(), want[i].log_probs.size());
      for (std::size_t t = 0; t < want[i].log_probs.size(); ++t)
        worst_lp = std::max(
            worst_lp, std::fabs(static_cast<double>(got[i].log_probs[t]) - want[i].log_probs[t]));
      tokens += want[i].tokens.size();
      stopped += want[i].stopped ? 1 : 0;
    }
    std::printf(
        "[cuda greedy] %s: %zu tokens equal, %zu of 7 stopped early, worst log-prob "
        "difference %.2e\n",
        describe(s).c_str(), tokens, stopped, worst_lp);
    EXPECT_GT(tokens, 7u * 5);  // not all stopped at once: the window is reached
    EXPECT_LT(worst_lp, 1e-4);
  }
}

// Sampling draws one uniform per token from the prompt's own Rng; a token can differ between
// devices only when a draw falls within the logits' rounding difference (~1e-6) of a boundary
// of the cumulative distribution, which these few hundred draws do not meet. The GPU's
// tokens are also the same in any batch (per-prompt streams).
TEST(CudaGenerate, SamplingWithPerPromptRngsEqualsCpu) {
  PION_REQUIRE_CUDA_DEVICE();
  for (const Shape& s : {kShapes[1], kShapes[2], kShapes[3]}) {
    SCOPED_TRACE(describe(s));
    Llama<float> cpu = cpu_model(s, 10);
    Gpu gpu(cpu);
    Rng rng(6);
    std::vector<std::vector<std::int32_t> > prompts;
    for (int len : {2, 6, 1, s.seq_len + 1, 4}) prompts.push_back(random_tokens(len, s.vocab, rng));
    GenerateOptions opts;
    opts.sampling = {0.8, 6, 0.9};
    opts.max_new_tokens = s.seq_len + 3;
    opts.max_batch = 2;
    auto rngs = [&] {
      std::vector<Rng> r;
      for (std::size_t i = 0; i < prompts.size(); ++i) r.emplace_back(100 + i);
      return r;
    };
    auto r_cpu = rngs(), r_gpu = rngs(), r_alone = rngs();
    const auto want = pion::generate_tokens(cpu, prompts, opts, r_cpu);
    const auto got = cu::generate_tokens(gpu.model, prompts, opts, r_gpu);
    GenerateOptions one = opts;
    one.max_batch = 1;
    const auto alone = cu::generate_tokens(gpu.model, prompts, one, r_alone);
    for (std::size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(got[i].tokens, want[i].tokens) << "prompt " << i;
      EXPECT_EQ(alone[i].tokens, got[i].tokens) << "prompt " << i;
    }
  }
}

// The decoder keeps no copy of the weights: a weight changed on the device between calls (as
// a training step would) changes the next call's logits, which match the CPU model with the
// same change.
TEST(CudaGenerate, DecoderSeesWeightChangesBetweenCalls) {
  PION_REQUIRE_CUDA_DEVICE();
  const Shape& s = kShapes[1];
  Llama<float> cpu = cpu_model(s, 11);
  Gpu gpu(cpu);
  cu::CudaDecoder dec(gpu.model, 1);
  Rng rng(7);
  const auto tokens = random_tokens(6, s.vocab, rng);
  const DecodeChunk chunk{0, tokens};
  const auto before_span = dec.extend(std::span(&chunk, 1));
  const std::vector<float> before(before_span.begin(), before_span.end());
  float* w = cpu.params().data<float>();
  for (std::int64_t i = 0; i < cpu.params().numel(); i += 3) w[i] *= 0.5f;
  gpu.model.upload_params(host_params(cpu));
  dec.clear(0);
  const auto after_span = dec.extend(std::span(&chunk, 1));
  const std::vector<float> after(after_span.begin(), after_span.end());
  pion::CpuDecodeEngine ref(cpu, 1);
  const auto want = ref.extend(std::span(&chunk, 1));
  EXPECT_GT(rel_diff(before, want), 1e-2);  // the change matters
  EXPECT_LT(rel_diff(after, want), 2e-5);
}

TEST(CudaGenerate, BadInputIsAnError) {
  PION_REQUIRE_CUDA_DEVICE();
  const Shape& s = kShapes[0];
  Llama<float> cpu = cpu_model(s, 12);
  Gpu gpu(cpu);
  EXPECT_THROW(cu::CudaDecoder(gpu.model, 0), Error);
  cu::CudaDecoder dec(gpu.model, 2);
  const std::vector<std::int32_t> ok{1, 2, 3}, bad{1, s.vocab, 2}, negative{-1},
      too_long(static_cast<std::size_t>(s.seq_len + 1), 1), empty;
  const DecodeChunk first{1, ok};
  dec.extend(std::span(&first, 1));
  ASSERT_EQ(dec.length(1), 3);
  const std::vector<std::vector<DecodeChunk> > refused = {
      {{0, bad}},       // token == vocab
      {{0, negative}},  // token < 0
      {{0, too_long}},  // over the capacity of an empty slot
      {{1, std::span(too_long).first(static_cast<std::size_t>(s.seq_len - 2))}},  // 3 + 14 > 16
      {{2, ok}},  // slot out of range
      {{-1, ok}},
      {{0, ok}, {0, ok}},   // a slot twice
      {{0, empty}},         // an empty chunk
      {{0, ok}, {1, bad}},  // a good chunk with a bad one: nothing runs
      {}};                  // no chunks
  for (std::size_t i = 0; i < refused.size(); ++i) {
    EXPECT_THROW(dec.extend(refused[i]), Error) << "case " << i;
    EXPECT_EQ(dec.length(0), 0) << "case " << i;
    EXPECT_EQ(dec.length(1), 3) << "case " << i;
  }
  EXPECT_THROW(dec.length(2), Error);
  EXPECT_THROW(dec.clear(-1), Error);
  // generate_tokens' own checks hold on the GPU path too.
  GenerateOptions opts;
  opts.max_new_tokens = 2;
  Rng rng(1);
  const std::vector<std::vector<std::int32_t> > bad_prompt{{0, s.vocab}}, empty_prompt{{}};
  EXPECT_THROW(cu::generate_tokens(gpu.model, bad_prompt, opts, std::span(&rng, 1)), Error);
  EXPECT_THROW(cu::generate_tokens(gpu.model, empty_prompt, opts, std::span(&rng, 1)), Error);
  // Still usable after the errors: the next call is what the CPU computes.
  const DecodeChunk next{0, ok};
  const auto got = dec.extend(std::span(&next, 1));
  pion::CpuDecodeEngine ref(cpu, 1);
  const DecodeChunk next0{0, ok};
  EXPECT_LT(rel_diff({got.begin(), got.end()}, ref.extend(std::span(&next0, 1))), 2e-5);
}

#endif  // PION_HAVE_CUDA
