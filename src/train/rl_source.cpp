// The GRPO batch source (pion/train/rl_source.h).
#include "pion/train/rl_source.h"

#include <algorithm>
#include <iostream>

#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/dist/communicator.h"
#include "pion/model/generate.h"
#include "pion/train/checkpoint.h"

namespace pion {

namespace {

// The sampling generator of completion `row` (its index in the step's global batch) of a step
// whose shared draw was `step_seed`: its own stream, so its tokens do not depend on how many
// ranks share the batch or on which other sequences are decoded beside it.
Rng completion_rng(std::uint64_t step_seed, std::size_t row) {
  return Rng(step_seed ^ (0x9e3779b97f4a7c15ULL * (static_cast<std::uint64_t>(row) + 1)));
}

nlohmann::json row_json(const auto& r) {
  return {{"tokens", r.tokens},
          {"prompt_len", r.prompt_len},
          {"logp_old", r.logp_old},
          {"ref_logp", r.ref_logp},
          {"reward", r.reward},
          {"entropy", r.entropy}};
}
}  // namespace

void check_rl_prompts(std::span<const FinetuneExample> tasks, const Tokenizer& tokenizer,
                      const TrainConfig& config) {
  const int seq = config.seq_len;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const auto len = static_cast<long>(tokenizer.encode(tasks[i].prompt).size());
    check(len >= 1, "rl: task " + std::to_string(i + 1) + " has an empty prompt");
    check(len + config.rl_max_new_tokens <= seq + 1,
          "rl: task " + std::to_string(i + 1) + "'s prompt " + input::describe(tasks[i].prompt) +
              " is " + std::to_string(len) + " tokens; with rl_max_new_tokens " +
              std::to_string(config.rl_max_new_tokens) + " it needs a context of " +
              std::to_string(len + config.rl_max_new_tokens - 1) +
              " tokens but the model's seq_len is " + std::to_string(seq) +
              " (shorten the prompt or lower rl_max_new_tokens)");
  }
}

RlSource::RlSource(Llama<float>& policy, std::unique_ptr<Llama<float>> reference,
                   const Tokenizer& tokenizer, std::vector<FinetuneExample> tasks,
                   const TrainConfig& config, std::string end_marker)
    : policy_(policy),
      reference_(std::move(reference)),
      tokenizer_(tokenizer),
      tasks_(std::move(tasks)),
      config_(config),
      options_{config.clip_eps, config.kl_coef, config.adv_eps, config.rl_std_normalize},
      end_marker_(std::move(end_marker)),
      rng_(config.seed ^ 0x6a09e667f3bcc909ULL) {
  check(reference_ != nullptr, "rl: no reference model");
  check(!tasks_.empty(), "rl: no task prompts");
  const int rows = config.rl_prompts_per_step * config.rl_group_size;
  check(static_cast<long>(config.batch_size) * config.grad_accum == rows,
        "rl: batch_size x grad_accum must equal rl_prompts_per_step x rl_group_size (" +
            std::to_string(rows) + " sampled completions per step)");
  dist::Communicator& comm = dist::world();
  rank_ = comm.rank();
  world_ = comm.size();
  check(config.rl_prompts_per_step % world_ == 0 && config.batch_size % world_ == 0,
        "rl: with " + std::to_string(world_) + " ranks, rl_prompts_per_step (" +
            std::to_string(config.rl_prompts_per_step) + ") and the rows per micro-batch (" +
            std::to_string(config.batch_size) + " = P x G / grad_accum) must be multiples of " +
            std::to_string(world_) + " (each rank samples whole groups of its share)");
  local_rows_ = config.batch_size / world_;
  check_rl_prompts(tasks_, tokenizer, config);
  for (const auto& t : tasks_) task_tokens_.push_back(tokenizer.encode(t.prompt));
  reference_->set_training(false);
  sampler_ = [this](std::span<const std::vector<std::int32_t>> prompts,
                    const GenerateOptions& options, std::span<Rng> rngs) {
    return generate_tokens(policy_, prompts, options, rngs);
  };
  reference_scorer_ = [this](std::span<const std::int32_t> inputs,
                             std::span<const std::int32_t> targets, int rows, int seq,
                             std::span<double> log_probs) {
    reference_->forward(inputs, targets, rows, seq);
    reference_->target_log_probs(log_probs);
  };
}

void RlSource::attach(TrainBackend& backend) {
  sampler_ = backend.policy_sampler();
  reference_scorer_ = backend.frozen_scorer(*reference_);
}

void RlSource::sample() {
  const int P = config_.rl_prompts_per_step, G = config_.rl_group_size;
  // Every rank draws the whole step's prompts and one seed from the shared RNG (so its state
  // is the same on every rank and in a one-process run), then decodes its own P / world groups.
  std::vector<std::size_t> step_tasks(static_cast<std::size_t>(P));
  for (auto& t : step_tasks) t = static_cast<std::size_t>(rng_.below(tasks_.size()));
  const std::uint64_t step_seed = rng_.next_u64();
  const int per_rank = P / world_;
  const std::size_t first_group = static_cast<std::size_t>(rank_) * per_rank;
  std::vector<std::size_t> group_task(static_cast<std::size_t>(per_rank));
  for (std::size_t q = 0; q < group_task.size(); ++q) group_task[q] = step_tasks[first_group + q];

  GenerateOptions opts;
  opts.max_new_tokens = config_.rl_max_new_tokens;
  opts.sampling.temperature = config_.rl_temperature;
  opts.sampling.top_p = config_.rl_top_p;
  opts.entropies = true;  // the entropy metric is the sampling policy's
  opts.stop = [&](std::size_t, std::span<const std::int32_t> new_tokens) {
    return tokenizer_.decode(new_tokens).find(end_marker_) != std::string::npos;
  };
  rows_.assign(static_cast<std::size_t>(per_rank) * G, Row{});
  // Samples and scores the G completions of each listed local group (its task in group_task).
  // Round 0 is the step's batch; round k > 0 redraws a group (DAPO's dynamic sampling). Every
  // random choice comes from a stream named by (step seed, global group, round), so the batch
  // does not depend on the number of ranks.
  auto sample_groups = [&](const std::vector<std::size_t>& groups, int round) {
    std::vector<std::vector<std::int32_t>> prompts;
    std::vector<Rng> row_rngs;
    const std::uint64_t round_seed =
        round == 0 ? step_seed : completion_rng(step_seed, static_cast<std::size_t>(round) << 40).next_u64();
    for (std::size_t q : groups) {
      const std::size_t global = first_group + q;
      for (int g = 0; g < G; ++g) {
        prompts.push_back(task_tokens_[group_task[q]]);
        row_rngs.push_back(completion_rng(round_seed, global * static_cast<std::size_t>(G) + g));
      }
    }
    const std::vector<Generation> gens = sampler_(prompts, opts, row_rngs);
    for (std::size_t j = 0; j < groups.size(); ++j) {
      for (int g = 0; g < G; ++g) {
        const std::size_t k = j * static_cast<std::size_t>(G) + static_cast<std::size_t>(g);
        Row& r = rows_[groups[j] * static_cast<std::size_t>(G) + static_cast<std::size_t>(g)];
        r = Row{};
        r.tokens = prompts[k];
        r.prompt_len = static_cast<int>(prompts[k].size());
        r.tokens.insert(r.tokens.end(), gens[k].tokens.begin(), gens[k].tokens.end());
        r.logp_old.assign(gens[k].log_probs.begin(), gens[k].log_probs.end());
        for (float h : gens[k].entropies) r.entropy += static_cast<double>(h);
        r.reward = answer_matches(tokenizer_.decode(gens[k].tokens),
                                  tasks_[group_task[groups[j]]].response, end_marker_)
                       ? 1.0
                       : 0.0;
      }
    }
  };
  auto no_signal = [&](std::size_t q) {
    for (int g = 1; g < G; ++g)
      if (rows_[q * G + g].reward != rows_[q * G].reward) return false;
    return true;
  };
  std::vector<std::size_t> all(group_task.size());
  for (std::size_t q = 0; q < all.size(); ++q) all[q] = q;
  sample_groups(all, 0);
  resampled_groups_ = 0.0;
  for (int round = 1; round <= config_.rl_resample_rounds; ++round) {
    std::vector<std::size_t> redo;
    for (std::size_t q : all)
      if (no_signal(q)) redo.push_back(q);
    if (redo.empty()) break;
    for (std::size_t q : redo) {
      Rng pick = completion_rng(step_seed ^ 0x5bd1e995ULL,
                                (static_cast<std::size_t>(round) << 40) + first_group + q);
      group_task[q] = static_cast<std::size_t>(pick.below(tasks_.size()));
    }
    resampled_groups_ += static_cast<double>(redo.size());
    sample_groups(redo, round);
  }
  if (world_ > 1) resampled_groups_ = dist::world().allreduce_sum(resampled_groups_);
  policy_.set_training(true);  // generation on the host model switched it to eval mode

  std::vector<double> rewards(rows_.size());
  completion_tokens_ = 0.0;
  for (std::size_t i = 0; i < rows_.size(); ++i) {
    rewards[i] = rows_[i].reward;
    completion_tokens_ += static_cast<double>(rows_[i].logp_old.size());
  }
  advantages_ = group_advantages(rewards, G, options_);
  // The objective is the mean over the completion tokens of the whole (global) batch.
  if (world_ > 1) completion_tokens_ = dist::world().allreduce_sum(completion_tokens_);

  reference_log_probs();
  choose_train_rows();
}

void RlSource::reference_log_probs() {
  // The frozen initial policy's log-probs of the same tokens (for kl_coef and the KL metric),
  // scored on the training back end's device (TrainBackend::frozen_scorer), a micro-batch of
  // rows at a time.
  const int B = local_rows_, T = config_.seq_len;
  std::vector<std::int32_t> inputs(static_cast<std::size_t>(B) * T), targets(inputs.size());
  std::vector<double> logp(inputs.size());
  for (std::size_t first = 0; first < rows_.size(); first += static_cast<std::size_t>(B)) {
    for (int b = 0; b < B; ++b)
      fill(first + static_cast<std::size_t>(b),
           std::span(inputs).subspan(static_cast<std::size_t>(b) * T, static_cast<std::size_t>(T)),
           std::span(targets).subspan(static_cast<std::size_t>(b) * T, static_cast<std::size_t>(T)));
    reference_scorer_(inputs, targets, B, T, logp);
    for (int b = 0; b < B; ++b) {
      Row& r = rows_[first + static_cast<std::size_t>(b)];
      r.ref_logp.resize(r.logp_old.size());
      for (std::size_t k = 0; k < r.ref_logp.size(); ++k)
        r.ref_logp[k] = logp[static_cast<std::size_t>(b) * T + r.prompt_len - 1 + k];
    }
  }
}

void RlSource::choose_train_rows() {
  // Without a KL term, a row whose advantage is 0 (its group's rewards are all equal) has
  // weight 0 on every token (grpo_token_objective: -min(r * 0, clip(r) * 0) = 0): its forward
  // and backward add exactly nothing, so it is not trained. It still counts in the token
  // normaliser and in the metrics.
  train_rows_.clear();
  for (std::size_t i = 0; i < rows_.size(); ++i)
    if (options_.kl_coef > 0.0 || advantages_[i] != 0.0) train_rows_.push_back(i);
}

void RlSource::fill(std::size_t row, std::span<std::int32_t> inputs,
                    std::span<std::int32_t> targets) const {
  const Row& r = rows_.at(row);
  const std::size_t len = r.tokens.size();
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    inputs[i] = i < len ? r.tokens[i] : 0;
    const bool completion = i + 1 < len && i + 1 >= static_cast<std::size_t>(r.prompt_len);
    targets[i] = completion ? r.tokens[i + 1] : -1;
  }
}

void RlSource::next(std::vector<std::int32_t>& inputs, std::vector<std::int32_t>& targets) {
  if (epoch_ == 0 && micro_ == 0) sample();
  if (micro_ == 0) {
    stats_ = {};
    entropy_sum_ = 0.0;
    step_epoch_ = epoch_;
  }
  // The micro_-th of grad_accum near-equal slices of the rows that train. An empty slice
  // (fewer such rows than micro-batches, or none) still runs one row without targets, which
  // adds nothing, so every rank makes the same forward_backward calls (collectives).
  const auto T = static_cast<std::size_t>(config_.seq_len);
  const std::size_t n = train_rows_.size(), slices = static_cast<std::size_t>(config_.grad_accum);
  const std::size_t per = std::max<std::size_t>(1, (n + slices - 1) / slices);
  const std::size_t lo = std::min(n, static_cast<std::size_t>(micro_) * per);
  const std::size_t hi = std::min(n, lo + per);
  current_rows_.assign(train_rows_.begin() + static_cast<long>(lo),
                       train_rows_.begin() + static_cast<long>(hi));
  const std::size_t B = std::max<std::size_t>(1, current_rows_.size());
  inputs.assign(B * T, 0);
  targets.assign(B * T, -1);
  for (std::size_t b = 0; b < current_rows_.size(); ++b)
    fill(current_rows_[b], std::span(inputs).subspan(b * T, T),
         std::span(targets).subspan(b * T, T));
  last_targets_ = targets;
  if (++micro_ == config_.grad_accum) {
    micro_ = 0;
    if (++epoch_ == config_.ppo_epochs) epoch_ = 0;
  }
}

TargetObjective RlSource::objective() {
  // Until the policy has taken a step it is the reference, and the reference's log-probs are
  // the forward's own: the KL and its gradient are then exactly 0. Scored apart (the inference
  // decoder on the CPU) they differ by float rounding (~1e-7), and on a batch without signal
  // that rounding is the whole gradient, which a normalised optimizer (Adam's m / sqrt(v),
  // Muon's orthogonalisation) turns into a full-size step in a random direction.
  return [this, rows = current_rows_, same = policy_is_reference_](
             std::span<const double> logp, std::span<const double> entropies,
             std::span<double> weights) {
    const std::size_t T = static_cast<std::size_t>(config_.seq_len), n = last_targets_.size();
    std::vector<double> old(n, 0.0), ref(n, 0.0), adv(n, 0.0);
    for (std::size_t b = 0; b < rows.size(); ++b) {
      const Row& r = rows_[rows[b]];
      for (std::size_t k = 0; k < r.logp_old.size(); ++k) {
        const std::size_t i = b * T + static_cast<std::size_t>(r.prompt_len) - 1 + k;
        old[i] = r.logp_old[k];
        ref[i] = same ? logp[i] : r.ref_logp[k];
        adv[i] = advantages_[rows[b]];
      }
    }
    const double loss = grpo_token_objective(last_targets_, logp, old, ref, adv,
                                             completion_tokens_, options_, weights, &stats_);
    for (std::size_t i = 0; i < n; ++i)
      if (last_targets_[i] >= 0) entropy_sum_ += entropies[i];
    return loss;
  };
}

void RlSource::annotate_step(nlohmann::json& record) {
  const auto G = static_cast<std::size_t>(config_.rl_group_size);
  // This rank's sums, then the whole batch's (every rank calls this at every step).
  // Entropy and KL are over every completion token of the batch: the current policy's (this
  // step's forward) on the rows that train, and on the rows left out (no forward of their
  // own) the sampling policy's, measured when they were sampled: the same policy at a batch's
  // first PPO epoch, so with ppo_epochs 1 every figure is the current policy's.
  std::vector<char> trains(rows_.size(), 0);
  for (std::size_t i : train_rows_) trains[i] = 1;
  double sums[8] = {};  // reward, no-signal groups, rows, completion tokens, kl, clipped,
                        // entropy, left-out rows whose entropy is unknown (older checkpoints)
  for (std::size_t g = 0; g < rows_.size(); g += G) {
    bool equal = true;
    for (std::size_t i = g; i < g + G; ++i) {
      const Row& r = rows_[i];
      sums[0] += r.reward;
      sums[3] += static_cast<double>(r.logp_old.size());
      equal = equal && r.reward == rows_[g].reward;
      if (trains[i]) continue;
      for (std::size_t k = 0; k < r.logp_old.size(); ++k)
        sums[4] += k3_kl(r.logp_old[k], r.ref_logp[k]);
      if (r.entropy >= 0.0)
        sums[6] += r.entropy;
      else
        sums[7] += 1.0;
    }
    sums[1] += equal ? 1.0 : 0.0;
  }
  sums[2] = static_cast<double>(rows_.size());
  sums[4] += stats_.kl;
  sums[5] = stats_.clipped;
  sums[6] += entropy_sum_;
  if (world_ > 1) dist::world().allreduce_sum(std::span<double>(sums, 8));
  const double rows = std::max(sums[2], 1.0);
  const double tokens = std::max(sums[3], 1.0);
  record["reward_mean"] = sums[0] / rows;
  record["no_signal_frac"] = sums[1] / (rows / static_cast<double>(G));
  record["completion_len_mean"] = sums[3] / rows;
  if (sums[7] == 0.0) record["entropy"] = sums[6] / tokens;
  record["kl"] = sums[4] / tokens;
  record["clip_frac"] = sums[5] / tokens;  // a token that does not train never clips
  record["ppo_epoch"] = step_epoch_;
  // Groups redrawn by dynamic sampling for this step's batch, summed over the rounds (so up
  // to rl_resample_rounds x P); only with rl_resample_rounds > 0.
  if (config_.rl_resample_rounds > 0) record["resampled_groups"] = resampled_groups_;
  if (!record.value("skipped", false)) policy_is_reference_ = false;
  const int step = record.value("step", 0);
  if (step % config_.log_interval == 0 || step == config_.max_iters)
    std::cout << "rl step " << step << " | reward " << record["reward_mean"].get<double>()
              << " | no signal " << record["no_signal_frac"].get<double>() << " | len "
              << record["completion_len_mean"].get<double>() << " | entropy "
              << record.value("entropy", -1.0) << " | kl " << record["kl"].get<double>()
              << "\n";
}

nlohmann::json RlSource::state() const {
  nlohmann::json s = {{"rng", rng_json(rng_)}, {"epoch", epoch_}};
  if (policy_is_reference_) s["policy_is_reference"] = true;  // every step so far skipped
  if (epoch_ != 0) {  // between PPO epochs: the batch is still being optimised
    // The whole batch in global row order: each rank's rows, gathered on rank 0 (every rank
    // calls this when the trainer saves; only rank 0 writes).
    nlohmann::json rows = nlohmann::json::array();
    for (const Row& r : rows_) rows.push_back(row_json(r));
    if (world_ > 1) {
      const std::vector<std::string> parts = dist::world().gather(rows.dump(), 0);
      rows = nlohmann::json::array();
      for (const std::string& part : parts)
        for (auto& r : nlohmann::json::parse(part)) rows.push_back(std::move(r));
    }
    s["rows"] = std::move(rows);
    s["resampled_groups"] = resampled_groups_;
  }
  return s.dump();  // the checkpoint stores data states as strings
}

void RlSource::restore(const nlohmann::json& state) {
  const std::string where = "the checkpoint's rl data_state";
  check(state.is_string(), where + " must be a string");
  const nlohmann::json s =
      input::parse_json(state.get<std::string>(), where, kMaxDataStateBytes, 6);
  check(s.is_object(), where + " must be a JSON object");
  Rng rng;
  rng.set_state(rng_state_from_json(input::member(s, "rng", where), where + " 'rng'"));
  const int epoch = input::to_int32(input::member(s, "epoch", where), 0, config_.ppo_epochs - 1,
                                    where + " 'epoch'");
  std::vector<Row> rows;
  double resampled = 0.0;
  if (epoch != 0) {
    // Absent in checkpoints written before dynamic sampling existed: none was redrawn then.
    if (s.contains("resampled_groups"))
      resampled = input::to_double(s["resampled_groups"], 0,
                                   static_cast<double>(config_.rl_prompts_per_step) *
                                       config_.rl_resample_rounds,
                                   where + " 'resampled_groups'");
    const nlohmann::json& jr = input::member(s, "rows", where);
    const auto expected =
        static_cast<std::size_t>(config_.rl_prompts_per_step) * config_.rl_group_size;
    check(jr.is_array() && jr.size() == expected,
          where + " 'rows' must hold " + std::to_string(expected) + " rows");
    const int vocab = policy_.config().vocab_size, T = config_.seq_len;
    for (const auto& x : jr) {
      Row r;
      const nlohmann::json& toks = input::member(x, "tokens", where);
      check(toks.is_array() && toks.size() >= 2 && toks.size() <= static_cast<std::size_t>(T) + 1,
            where + ": a row's tokens must be 2..seq_len+1 ids");
      for (const auto& t : toks) r.tokens.push_back(input::to_int32(t, 0, vocab - 1, where + " token"));
      r.prompt_len = input::to_int32(input::member(x, "prompt_len", where), 1,
                                     static_cast<int>(r.tokens.size()) - 1, where + " prompt_len");
      const std::size_t comp = r.tokens.size() - static_cast<std::size_t>(r.prompt_len);
      for (const char* key : {"logp_old", "ref_logp"}) {
        const nlohmann::json& v = input::member(x, key, where);
        check(v.is_array() && v.size() == comp, where + ": '" + key + "' must have one entry per completion token");
        auto& dst = std::string(key) == "logp_old" ? r.logp_old : r.ref_logp;
        for (const auto& y : v) dst.push_back(input::to_double(y, -1e30, 0.0, where + " " + key));
      }
      r.reward = input::to_double(input::member(x, "reward", where), -1e30, 1e30, where + " reward");
      // Absent in checkpoints written before the entropy was measured at sampling: unknown.
      r.entropy = x.contains("entropy")
                      ? input::to_double(x["entropy"], 0.0, 1e30, where + " entropy")
                      : -1.0;
      rows.push_back(std::move(r));
    }
  }
  const bool same = s.contains("policy_is_reference") &&
                    input::to_bool(s["policy_is_reference"], where + " 'policy_is_reference'");
  // Validated: apply.
  policy_is_reference_ = same;
  rng_ = rng;
  epoch_ = epoch;
  micro_ = 0;
  if (epoch != 0) {
    // The checkpoint holds the global batch (whatever the rank count that wrote it); this
    // rank keeps its share, and the token count stays the global one.
    completion_tokens_ = 0.0;
    for (const Row& r : rows) completion_tokens_ += static_cast<double>(r.logp_old.size());
    const auto share = rows.size() / static_cast<std::size_t>(world_);
    const auto first = static_cast<long>(share * static_cast<std::size_t>(rank_));
    rows_.assign(std::make_move_iterator(rows.begin() + first),
                 std::make_move_iterator(rows.begin() + first + static_cast<long>(share)));
    std::vector<double> rewards;
    for (const Row& r : rows_) rewards.push_back(r.reward);
    advantages_ = group_advantages(rewards, config_.rl_group_size, options_);
    resampled_groups_ = resampled;
    choose_train_rows();
  }
}

}  // namespace pion
