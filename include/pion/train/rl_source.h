#pragma once
// The GRPO batch source of `pion rl`: the one training loop (trainer.h) runs RL through it.
//
// Every ppo_epochs steps it samples a batch: P = rl_prompts_per_step task prompts drawn
// uniformly (with replacement) with its sampling RNG, G = rl_group_size completions each from
// the CURRENT policy (the back end's PolicySampler, backend.h, given to attach() by
// run_training: generate.h's batched, KV-cached decoding on the CPU model, or on the CUDA back
// end the device's weights copied to the host first; temperature rl_temperature, nucleus
// rl_top_p; a completion ends at the end marker or after rl_max_new_tokens), scored by the
// verifier (answer_matches: exact match after normalising whitespace, 1 or 0), with
// group-relative advantages (grpo.h). It keeps each completion token's log-prob under the
// sampling policy (logp_old, of the unmodified logits, and the softmax entropy there) and
// under the frozen initial policy (ref_logp, one forward of the reference model on the training
// back end's device: TrainBackend::frozen_scorer; on the CPU the inference-only decoder over
// each row at its own length), and the batch's completion-token count N.
// The P * G rows (prompt + completion, laid out as finetuning rows: targets on completion
// tokens only) are handed out as grad_accum micro-batches, for ppo_epochs consecutive steps;
// each micro-batch carries the GRPO objective (grpo_token_objective, normalised by N), so every
// step's loss is the mean over all of the batch's completion tokens. Without a KL term
// (kl_coef 0) a row with advantage 0 (its group's rewards all equal: often half the batch) has
// weight 0 on every token, so it is left out of the micro-batches: the same loss and gradient
// for less work; the micro-batches then hold up to batch_size rows (at least one).
//
// With rl_resample_rounds = R > 0 (DAPO's dynamic sampling), a group whose G rewards are all
// equal (no gradient) is replaced by a fresh prompt's group, up to R rounds; the batch keeps its
// P x G rows, and the metric resampled_groups counts the groups redrawn (over all rounds).
//
// Under mpirun every rank draws the same P prompts and takes P / world of the groups; each
// completion samples from its own generator (seeded by the step and its global row), so the
// batch is the same for any rank count, and the objective's N is the global token count.
//
// State (in the checkpoint): the sampling RNG, the PPO epoch, and, between epochs of one
// batch, the batch itself, so a resumed run is bit-exact. Metrics per step: reward_mean,
// no_signal_frac (groups whose rewards are all equal), completion_len_mean, entropy (the
// current policy's mean entropy at the completion positions, temperature 1), kl (mean k3 to
// the initial policy), clip_frac, ppo_epoch; all over every completion token of the batch (a
// row left out contributes the entropy and KL measured when it was sampled, which is the
// current policy's at a batch's first PPO epoch).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pion/core/random.h"
#include "pion/data/finetune.h"
#include "pion/data/tokenizer.h"
#include "pion/model/llama.h"
#include "pion/train/config.h"
#include "pion/train/grpo.h"
#include "pion/train/trainer.h"

namespace pion {

// Every task's encoded prompt + rl_max_new_tokens must fit seq_len + 1 tokens (a completion
// is never generated past the context, so its log-probs are the training forward's); the
// error names the task.
void check_rl_prompts(std::span<const FinetuneExample> tasks, const Tokenizer& tokenizer,
                      const TrainConfig& config);

class RlSource final : public BatchSource {
 public:
  // `policy` is the host model being trained (it must outlive the source): its config, and what
  // samples until attach() gives the back end's sampler; `reference` a frozen copy of its
  // initial weights (its log-probs are the KL term's). Task prompts must fit: encoded prompt +
  // rl_max_new_tokens <= seq_len + 1 (checked here, naming the task).
  RlSource(Llama<float>& policy, std::unique_ptr<Llama<float>> reference,
           const Tokenizer& tokenizer, std::vector<FinetuneExample> tasks,
           const TrainConfig& config, std::string end_marker = std::string(kDefaultEndMarker));

  void next(std::vector<std::int32_t>& inputs, std::vector<std::int32_t>& targets) override;
  nlohmann::json state() const override;
  void restore(const nlohmann::json& state) override;
  TargetObjective objective() override;
  // Samples from then on with backend.policy_sampler() (the weights being trained, wherever
  // they live), and scores the reference with backend.frozen_scorer(reference) (on the device
  // the policy trains on, so the KL starts at exactly 0 there too).
  void attach(TrainBackend& backend) override;
  void annotate_step(nlohmann::json& record) override;

 private:
  struct Row {
    std::vector<std::int32_t> tokens;  // prompt + completion
    int prompt_len = 0;
    std::vector<double> logp_old, ref_logp;  // one per completion token
    double reward = 0.0;
    // The sampling policy's entropy summed over the completion's tokens; < 0: unknown (a
    // checkpoint written before it was recorded).
    double entropy = 0.0;
  };
  void sample();
  void reference_log_probs();  // rows_[*].ref_logp
  void choose_train_rows();    // train_rows_ from advantages_
  void fill(std::size_t row, std::span<std::int32_t> inputs, std::span<std::int32_t> targets) const;

  Llama<float>& policy_;
  PolicySampler sampler_;          // generate_tokens on policy_ until attach()
  TargetScorer reference_scorer_;  // reference_ on the CPU until attach()
  std::unique_ptr<Llama<float>> reference_;
  const Tokenizer& tokenizer_;
  std::vector<FinetuneExample> tasks_;
  std::vector<std::vector<std::int32_t>> task_tokens_;
  TrainConfig config_;
  GrpoOptions options_;
  std::string end_marker_;
  Rng rng_;  // shared: the same state on every rank
  int rank_ = 0, world_ = 1;
  int local_rows_ = 0;  // rows per micro-batch on this rank (batch_size / world)

  // The batch being optimised.
  std::vector<Row> rows_;
  std::vector<double> advantages_;
  double completion_tokens_ = 0.0;
  double resampled_groups_ = 0.0;  // this rank's groups redrawn for the batch (a metric)
  int epoch_ = 0, micro_ = 0;
  // Rows whose tokens can have a nonzero weight (all of them with a KL term), split into the
  // step's micro-batches; the ones next() filled last.
  std::vector<std::size_t> train_rows_, current_rows_;
  std::vector<std::int32_t> last_targets_;
  // This step's token statistics (reset at its first micro-batch).
  GrpoTokenStats stats_;
  double entropy_sum_ = 0.0;
  int step_epoch_ = 0;
  // True until the first applied optimizer step: the policy then IS the reference, so the
  // KL term's reference log-probs are the forward's own (see objective()).
  bool policy_is_reference_ = true;
};

}  // namespace pion
