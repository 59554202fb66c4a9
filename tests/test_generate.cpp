// KV-cached, batched generation (pion/model/generate.h) against the uncached reference that
// re-runs Llama::forward over the whole context per token: the incremental forward's logits,
// greedy tokens token for token on several model shapes (prompts of different lengths in one
// batch, sequences stopping at different times, contexts past seq_len), and the sampler
// (top-k = 1 is greedy, top-p keeps only the nucleus, seeds reproduce, batch = alone).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "pion/core/error.h"
#include "pion/model/decode.h"
#include "pion/model/generate.h"
#include "pion/model/kv_cache.h"
#include "pion/model/llama.h"
#include "pion/model/sampling.h"

namespace pion {
namespace {

struct Shape {
  int n_layer, n_head, d_model, seq_len, vocab;
  bool norm_free = false;  // ModelConfig::norm "none"
  int n_kv_head = 0;       // grouped-query attention when below n_head
  bool tied = false;       // ModelConfig::tie_embeddings
};
const Shape kShapes[] = {{1, 1, 16, 12, 11},
                         {2, 2, 32, 16, 23},
                         {3, 4, 32, 20, 37},
                         {2, 2, 32, 16, 23, true},
                         {2, 4, 32, 16, 23, false, 2, true},
                         {3, 4, 32, 20, 37, false, 1, false},
                         {2, 4, 32, 16, 23, true, 1, true}};

std::string describe(const Shape& s) {
  return "n_layer " + std::to_string(s.n_layer) + " n_head " + std::to_string(s.n_head) +
         " n_kv_head " + std::to_string(s.n_kv_head) + " d_model " + std::to_string(s.d_model) +
         (s.norm_free ? " norm none" : "") + (s.tied ? " tied" : "");
}

// Weights large enough that logits are spread out (init_std 0.02 gives near-ties that float
// rounding of differently shaped GEMMs could flip; these are checked with margins to spare).
Llama<float> random_model(const Shape& s, std::uint64_t seed) {
  ModelConfig c;
  c.vocab_size = s.vocab;
  c.n_layer = s.n_layer;
  c.n_head = s.n_head;
  c.d_model = s.d_model;
  c.seq_len = s.seq_len;
  c.init_std = 0.3;
  if (s.norm_free) c.norm = "none";
  c.n_kv_head = s.n_kv_head;
  c.tie_embeddings = s.tied;
  Llama<float> model(c);
  Rng rng(seed);
  model.init_weights(rng);
  model.set_training(false);
  return model;
}

std::vector<std::int32_t> random_tokens(int n, int vocab, Rng& rng) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
  return t;
}

std::vector<std::vector<std::int32_t>> random_prompts(const std::vector<int>& lengths, int vocab,
                                                      std::uint64_t seed) {
  Rng rng(seed);
  std::vector<std::vector<std::int32_t>> p;
  for (int n : lengths) p.push_back(random_tokens(n, vocab, rng));
  return p;
}

// A prefill and a decode step in one Decoder::extend call, in different slots (checked for
// MHA and for GQA with a tied head): slot 2 is first prefilled with 8 of a's 9 tokens, then one
// call prefills slot 0 with all of b and gives slot 2 a's 9th token (a, b: 9 and 4 tokens from
// Rng(8)). `got` is that call's logits (b's row, then a's); `want` each sequence's own
// full-forward logits at its last position, in the same order.
struct MixedChunks {
  std::vector<float> got, want;
};
MixedChunks run_mixed_chunks(Llama<float>& model, KvCache& cache, int vocab) {
  Rng rng(8);
  const auto a = random_tokens(9, vocab, rng), b = random_tokens(4, vocab, rng);
  auto full_last = [&](const std::vector<std::int32_t>& t) {
    model.forward(t, {}, 1, static_cast<int>(t.size()));
    const float* l = model.logits() + (t.size() - 1) * static_cast<std::size_t>(vocab);
    return std::vector<float>(l, l + vocab);
  };
  Decoder dec(model);
  const DecodeChunk first{2, std::span(a).first(8)};
  dec.extend(cache, std::span(&first, 1));
  const DecodeChunk both[] = {{0, b}, {2, std::span(a).last(1)}};
  const auto out = dec.extend(cache, both);
  MixedChunks m{{out.begin(), out.end()}, {}};
  const auto want_b = full_last(b), want_a = full_last(a);
  m.want = want_b;
  m.want.insert(m.want.end(), want_a.begin(), want_a.end());
  return m;
}

float max_abs(std::span<const float> a) {
  float m = 0;
  for (float x : a) m = std::max(m, std::fabs(x));
  return m;
}

// Prefill of a prefix, then one token per call: every position's logits match the full forward.
TEST(Decoder, IncrementalLogitsEqualFullForwardAtEveryPosition) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(describe(s));
    Llama<float> model = random_model(s, 11);
    Rng rng(3);
    const int T = s.seq_len;
    const auto tokens = random_tokens(T, s.vocab, rng);
    model.forward(tokens, {}, 1, T);
    const std::vector<float> full(model.logits(), model.logits() + T * s.vocab);
    const float scale = max_abs(full);
    ASSERT_GT(scale, 1.0f);  // spread-out logits, so 1e-5 relative is a real check

    Decoder dec(model);
    KvCache cache(model.config(), 1);
    const int prefix = T / 3;
    std::vector<float> got;
    const DecodeChunk first{0, std::span(tokens).first(static_cast<std::size_t>(prefix))};
    const auto pre = dec.extend(cache, std::span(&first, 1), /*all_positions=*/true);
    got.assign(pre.begin(), pre.end());
    for (int t = prefix; t < T; ++t) {
      const DecodeChunk c{0, std::span(tokens).subspan(static_cast<std::size_t>(t), 1)};
      const auto row = dec.extend(cache, std::span(&c, 1));
      ASSERT_EQ(row.size(), static_cast<std::size_t>(s.vocab));
      got.insert(got.end(), row.begin(), row.end());
    }
    EXPECT_EQ(cache.length[0], T);
    ASSERT_EQ(got.size(), full.size());
    float worst = 0;
    for (std::size_t i = 0; i < full.size(); ++i) {
      ASSERT_NEAR(got[i], full[i], 1e-5 * scale) << "position " << i / s.vocab;
      worst = std::max(worst, std::fabs(got[i] - full[i]));
    }
    std::printf("[decode] %s: cached vs full-forward logits, worst %.2e relative to max |logit|\n",
                describe(s).c_str(), static_cast<double>(worst / scale));
  }
}

// Two sequences of different lengths in one call (a prefill beside a decode step), each in its
// own slot, give each sequence's own full-forward logits: nothing leaks between slots.
TEST(Decoder, MixedChunksInOneCallStayInTheirSlots) {
  const Shape s = kShapes[1];
  Llama<float> model = random_model(s, 5);
  KvCache cache(model.config(), 3);
  const MixedChunks m = run_mixed_chunks(model, cache, s.vocab);
  ASSERT_EQ(m.got.size(), 2u * s.vocab);
  for (std::size_t i = 0; i < m.want.size(); ++i) EXPECT_NEAR(m.got[i], m.want[i], 1e-4);
  EXPECT_EQ(cache.length[0], 4);
  EXPECT_EQ(cache.length[1], 0);
  EXPECT_EQ(cache.length[2], 9);
}

// GQA's point: the cache holds n_kv_head heads, n_head / n_kv_head times fewer floats than
// MHA's; a cache built for another head count is refused. Mixed chunks stay in their slots
// with GQA and a tied head too.
TEST(Decoder, GqaCacheHoldsOnlyTheKvHeads) {
  const Shape s = kShapes[5];  // n_head 4, n_kv_head 1
  Llama<float> model = random_model(s, 9);
  Shape mha_shape = s;
  mha_shape.n_kv_head = 0;
  Llama<float> mha = random_model(mha_shape, 9);
  KvCache cache(model.config(), 2), mha_cache(mha.config(), 2);
  EXPECT_EQ(cache.n_kv_head, 1);
  EXPECT_EQ(mha_cache.n_kv_head, 4);
  EXPECT_EQ(4 * cache.keys.size(), mha_cache.keys.size());
  EXPECT_EQ(4 * KvCache::bytes_for(model.config(), 2), KvCache::bytes_for(mha.config(), 2));
  EXPECT_EQ(KvCache::bytes_for(model.config(), 2),
            static_cast<std::int64_t>((cache.keys.size() + cache.values.size()) * sizeof(float)));
  Decoder dec(model);
  const std::vector<std::int32_t> one{1};
  const DecodeChunk c{0, one};
  EXPECT_THROW(dec.extend(mha_cache, std::span(&c, 1)), Error);

  const Shape t = kShapes[4];  // GQA groups of 2, tied
  Llama<float> tied = random_model(t, 10);
  KvCache tcache(tied.config(), 3);
  const MixedChunks m = run_mixed_chunks(tied, tcache, t.vocab);
  for (std::size_t i = 0; i < m.want.size(); ++i) EXPECT_NEAR(m.got[i], m.want[i], 1e-4);
}

TEST(Decoder, RefusesChunksThatDoNotFit) {
  const Shape s = kShapes[0];
  Llama<float> model = random_model(s, 1);
  Decoder dec(model);
  KvCache cache(model.config(), 2);
  const std::vector<std::int32_t> too_long(static_cast<std::size_t>(s.seq_len + 1), 1);
  const std::vector<std::int32_t> one{1}, bad{s.vocab};
  const DecodeChunk over{0, too_long}, wrong_slot{2, one}, bad_token{0, bad};
  EXPECT_THROW(dec.extend(cache, std::span(&over, 1)), Error);
  EXPECT_THROW(dec.extend(cache, std::span(&wrong_slot, 1)), Error);
  EXPECT_THROW(dec.extend(cache, std::span(&bad_token, 1)), Error);
  const DecodeChunk twice[] = {{1, one}, {1, one}};
  EXPECT_THROW(dec.extend(cache, twice), Error);
  EXPECT_EQ(cache.length[0], 0);
  EXPECT_EQ(cache.length[1], 0);
}

void expect_same(const std::vector<Generation>& got, const std::vector<Generation>& want,
                 double log_prob_tol) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE("sequence " + std::to_string(i));
    EXPECT_EQ(got[i].tokens, want[i].tokens);
    EXPECT_EQ(got[i].stopped, want[i].stopped);
    ASSERT_EQ(got[i].log_probs.size(), got[i].tokens.size());
    ASSERT_EQ(want[i].log_probs.size(), want[i].tokens.size());
    for (std::size_t j = 0; j < std::min(got[i].log_probs.size(), want[i].log_probs.size()); ++j)
      EXPECT_NEAR(got[i].log_probs[j], want[i].log_probs[j], log_prob_tol) << "token " << j;
  }
}

// The must-show: greedy cached batched generation = the uncached path, token for token, on
// several shapes; prompts of 1..seq_len+3 tokens in one batch (the longer ones start in the
// sliding-window regime, the shorter ones reach it), a stop token ending sequences at
// different steps, batch sizes 1, 3 and all, and fewer slots than prompts (slot refill).
TEST(Generate, GreedyCachedBatchedEqualsUncached) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(describe(s));
    Llama<float> model = random_model(s, 21 + s.n_layer);
    const auto prompts =
        random_prompts({1, 5, 2, s.seq_len - 3, s.seq_len + 3, 7, 3, s.seq_len / 2}, s.vocab, 9);
    GenerateOptions opts;
    opts.sampling.temperature = 0.0;
    opts.max_new_tokens = s.seq_len + 4;  // every sequence that does not stop slides past seq_len
    Rng rng(0);
    const auto want = generate_tokens_uncached(model, prompts, opts, std::span(&rng, 1));
    std::size_t total = 0;
    for (const auto& g : want) total += g.tokens.size();
    ASSERT_EQ(total, prompts.size() * static_cast<std::size_t>(opts.max_new_tokens));

    for (int batch : {0, 1, 3}) {
      SCOPED_TRACE("max_batch " + std::to_string(batch));
      opts.max_batch = batch;
      expect_same(generate_tokens(model, prompts, opts, std::span(&rng, 1)), want, 1e-4);
    }

    // A stop token: the most common token of the reference's outputs, so most sequences stop,
    // at different steps, and some never do.
    std::map<std::int32_t, int> count;
    for (const auto& g : want)
      for (auto t : g.tokens) ++count[t];
    const auto common = std::max_element(count.begin(), count.end(), [](auto& a, auto& b) {
                          return a.second < b.second;
                        })->first;
    opts.stop_tokens = {common};
    opts.max_batch = 0;
    const auto want_stop = generate_tokens_uncached(model, prompts, opts, std::span(&rng, 1));
    std::set<std::size_t> lengths;
    int stopped = 0;
    for (const auto& g : want_stop) {
      lengths.insert(g.tokens.size());
      stopped += g.stopped ? 1 : 0;
      if (g.stopped) {
        EXPECT_EQ(g.tokens.back(), common);
      }
    }
    EXPECT_GE(lengths.size(), 2u);  // sequences end at different steps
    EXPECT_GE(stopped, 1);
    expect_same(generate_tokens(model, prompts, opts, std::span(&rng, 1)), want_stop, 1e-4);
    opts.stop_tokens.clear();
  }
}

TEST(Generate, BatchEqualsOneAtATime) {
  const Shape s = kShapes[2];
  Llama<float> model = random_model(s, 4);
  const auto prompts = random_prompts({3, 1, 8, 5, 12}, s.vocab, 2);
  GenerateOptions opts;
  opts.max_new_tokens = 10;
  opts.sampling = {0.0, 0, 1.0};
  Rng rng(0);
  const auto batch = generate_tokens(model, prompts, opts, std::span(&rng, 1));
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    const auto alone = generate_tokens(model, std::span(prompts).subspan(i, 1), opts,
                                       std::span(&rng, 1));
    EXPECT_EQ(alone[0].tokens, batch[i].tokens) << "sequence " << i;
  }
}

// With one Rng per sequence, sampled tokens do not depend on the batch: cached batched,
// cached alone and uncached give the same samples; the same seeds give them again, other
// seeds other samples.
TEST(Generate, SamplingIsReproducibleAndIndependentOfTheBatch) {
  const Shape s = kShapes[1];
  Llama<float> model = random_model(s, 6);
  const auto prompts = random_prompts({2, 6, 1, 9}, s.vocab, 3);
  GenerateOptions opts;
  opts.max_new_tokens = 12;
  opts.sampling = {0.9, 8, 0.95};
  auto rngs_from = [&](std::uint64_t seed) {
    std::vector<Rng> r;
    for (std::size_t i = 0; i < prompts.size(); ++i) r.emplace_back(seed + i);
    return r;
  };
  auto r1 = rngs_from(100), r2 = rngs_from(100), r3 = rngs_from(100), r4 = rngs_from(200);
  const auto batched = generate_tokens(model, prompts, opts, r1);
  const auto again = generate_tokens(model, prompts, opts, r2);
  const auto uncached = generate_tokens_uncached(model, prompts, opts, r3);
  expect_same(again, batched, 0.0);
  expect_same(uncached, batched, 1e-4);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    Rng alone_rng(100 + i);
    const auto alone = generate_tokens(model, std::span(prompts).subspan(i, 1), opts,
                                       std::span(&alone_rng, 1));
    EXPECT_EQ(alone[0].tokens, batched[i].tokens) << "sequence " << i;
  }
  const auto other = generate_tokens(model, prompts, opts, r4);
  bool differs = false;
  for (std::size_t i = 0; i < prompts.size(); ++i) differs |= other[i].tokens != batched[i].tokens;
  EXPECT_TRUE(differs);
  // The log-probs are the model's, from the unmodified logits: log-probabilities, so < 0.
  for (const auto& g : batched)
    for (float lp : g.log_probs) EXPECT_LT(lp, 0.0f);
}

TEST(Generate, TopK1IsGreedy) {
  const Shape s = kShapes[2];
  Llama<float> model = random_model(s, 12);
  const auto prompts = random_prompts({4, 1, 7}, s.vocab, 5);
  GenerateOptions greedy, top1;
  greedy.max_new_tokens = top1.max_new_tokens = 15;
  greedy.sampling = {0.0, 0, 1.0};
  top1.sampling = {1.5, 1, 1.0};
  Rng a(1), b(2);
  const auto g = generate_tokens(model, prompts, greedy, std::span(&a, 1));
  const auto k = generate_tokens(model, prompts, top1, std::span(&b, 1));
  for (std::size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(k[i].tokens, g[i].tokens);
}

// Constructed logits with probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled order): top_p 0.7
// keeps the first two (0.5 + 0.3 >= 0.7) in proportion 5:3, top_p 0.4 only the first, and
// top_p 1 all four at their probabilities.
TEST(Sampling, TopPKeepsOnlyTheNucleus) {
  const std::vector<float> logits = {std::log(0.15f), std::log(0.5f), std::log(0.05f),
                                     std::log(0.3f)};
  SamplerScratch scratch;
  Rng rng(42);
  const int n = 20000;
  auto frequencies = [&](double top_p) {
    std::vector<double> f(4, 0.0);
    const SamplingParams p{1.0, 0, top_p};
    for (int i = 0; i < n; ++i) f[static_cast<std::size_t>(sample_token(logits, p, rng, scratch))] += 1.0 / n;
    return f;
  };
  const auto f07 = frequencies(0.7);
  EXPECT_EQ(f07[0], 0.0);
  EXPECT_EQ(f07[2], 0.0);
  EXPECT_NEAR(f07[1], 0.5 / 0.8, 0.02);
  EXPECT_NEAR(f07[3], 0.3 / 0.8, 0.02);
  const auto f04 = frequencies(0.4);
  EXPECT_EQ(f04[0] + f04[2] + f04[3], 0.0);
  const auto f1 = frequencies(1.0);
  const double want[] = {0.15, 0.5, 0.05, 0.3};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f1[static_cast<std::size_t>(i)], want[i], 0.02);
  // top-k applies first: top_k 3 drops 0.05; top_p 0.9 of the remaining 0.95 then keeps all three
  // only if 0.5 + 0.3 < 0.9 * 0.95 = 0.855: it is, so token 0 stays possible.
  const SamplingParams kp{1.0, 3, 0.9};
  std::vector<int> seen(4, 0);
  for (int i = 0; i < n; ++i) ++seen[static_cast<std::size_t>(sample_token(logits, kp, rng, scratch))];
  EXPECT_EQ(seen[2], 0);
  EXPECT_GT(seen[0], 0);
}

TEST(Sampling, LogProbIsTheModelsLogSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 0.5f};
  const double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(0.5));
  EXPECT_NEAR(token_log_prob(logits, 1), 2.0 - lse, 1e-12);
  EXPECT_NEAR(token_log_prob(logits, 2), 0.5 - lse, 1e-12);
  EXPECT_THROW(token_log_prob(logits, 3), Error);
}

TEST(Generate, StopPredicateAndBadArguments) {
  const Shape s = kShapes[0];
  Llama<float> model = random_model(s, 2);
  const auto prompts = random_prompts({3, 4}, s.vocab, 1);
  GenerateOptions opts;
  opts.sampling.temperature = 0.0;
  opts.max_new_tokens = 9;
  // Sequence i stops after i + 2 tokens.
  opts.stop = [](std::size_t i, std::span<const std::int32_t> t) { return t.size() == i + 2; };
  Rng rng(0);
  const auto out = generate_tokens(model, prompts, opts, std::span(&rng, 1));
  EXPECT_EQ(out[0].tokens.size(), 2u);
  EXPECT_EQ(out[1].tokens.size(), 3u);
  EXPECT_TRUE(out[0].stopped && out[1].stopped);

  const std::vector<std::vector<std::int32_t>> empty_prompt = {{}};
  EXPECT_THROW(generate_tokens(model, empty_prompt, opts, std::span(&rng, 1)), Error);
  std::vector<Rng> three(3);
  EXPECT_THROW(generate_tokens(model, prompts, opts, three), Error);
  opts.sampling = {1.0, 0, 0.0};
  EXPECT_THROW(generate_tokens(model, prompts, opts, std::span(&rng, 1)), Error);
  opts.sampling = {-1.0, 0, 1.0};
  EXPECT_THROW(generate_tokens(model, prompts, opts, std::span(&rng, 1)), Error);
}

}  // namespace
}  // namespace pion
