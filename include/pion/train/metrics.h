#pragma once
// Metrics as JSON Lines (one object per line, flushed at once so a crash loses nothing) and
// the human progress line with loss, tokens/s and ETA.
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace pion {

class JsonlWriter {
 public:
  // A new run: creates or truncates the file.
  static JsonlWriter create(const std::string& path);
  // A run resumed from a checkpoint at `step`: records written after that checkpoint (a run
  // killed after it) are about to be written again, so the file is first rewritten atomically
  // (temp file + rename) with only the records whose "step" is <= `step` (a partial last line,
  // a line that is not a JSON object with an integer "step", and every later record dropped;
  // a line says how many), then appended to. A missing file is created.
  static JsonlWriter resume(const std::string& path, int step);
  void write(const nlohmann::json& record);

 private:
  JsonlWriter(const std::string& path, bool append);
  struct Closer {
    void operator()(std::FILE* f) const { std::fclose(f); }
  };
  std::unique_ptr<std::FILE, Closer> file_;
  std::string path_;
};

// "1h02m", "3m07s", "12s".
std::string format_duration(double seconds);
// "step 120/2000 | loss 2.1345 | lr 9.8e-04 | 41.2K tok/s | ETA 3m07s"
std::string progress_line(long step, long total, double loss, double lr, double tokens_per_sec,
                          double eta_seconds);

// The per-step bookkeeping both trainers (CPU and CUDA) share: each finished step's
// metrics.jsonl record, a line when a step was skipped, and every log_interval steps (and at
// the last) the progress line, with tokens/s over the steps since the previous line and the
// ETA from this process's mean step time.
class StepLog {
 public:
  StepLog(int max_iters, int log_interval, double tokens_per_step)
      : max_iters_(max_iters), log_interval_(log_interval), tokens_per_step_(tokens_per_step) {}
  // Step `step` (1-based) took step_seconds; elapsed_seconds is the run's time so far
  // (resumed runs included). Returns the record; callers may add keys (val_loss) to it.
  nlohmann::json finish_step(int step, double lr, double loss, double grad_norm,
                             double step_seconds, double elapsed_seconds, bool applied);
  int steps() const { return steps_; }                    // steps this process ran
  double train_seconds() const { return train_seconds_; }  // their time (not evals)
  // Tokens per second over this process's steps (0 before any).
  double tokens_per_sec() const;

 private:
  int max_iters_, log_interval_;
  double tokens_per_step_;
  int steps_ = 0;
  double train_seconds_ = 0.0, window_seconds_ = 0.0, window_tokens_ = 0.0;
};

}  // namespace pion
