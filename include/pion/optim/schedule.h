#pragma once
// Learning-rate schedules as separate objects (like torch.optim.lr_scheduler): each maps a
// step index (0-based, the step about to be taken) to a factor that multiplies every
// group's base_lr. Apply with optimizer.set_lr_factor(schedule.factor(step)).
#include <cstdint>
#include <memory>
#include <string>

namespace pion {

class Schedule {
 public:
  virtual ~Schedule() = default;
  virtual double factor(std::int64_t step) const = 0;
};

class ConstantSchedule : public Schedule {
 public:
  explicit ConstantSchedule(std::int64_t warmup = 0) : warmup_(warmup) {}
  double factor(std::int64_t step) const override;

 private:
  std::int64_t warmup_;
};

// Linear warmup from 1/warmup to 1 over `warmup` steps, then cosine from 1 to min_ratio at
// step `total`, and min_ratio after it.
class WarmupCosineSchedule : public Schedule {
 public:
  WarmupCosineSchedule(std::int64_t warmup, std::int64_t total, double min_ratio);
  double factor(std::int64_t step) const override;

 private:
  std::int64_t warmup_, total_;
  double min_ratio_;
};

// Warmup-stable-decay: linear warmup, constant 1, then a linear decay to min_ratio over the
// last `decay_fraction` of the `total` steps.
class WsdSchedule : public Schedule {
 public:
  WsdSchedule(std::int64_t warmup, std::int64_t total, double min_ratio, double decay_fraction = 0.2);
  double factor(std::int64_t step) const override;

 private:
  std::int64_t warmup_, total_;
  double min_ratio_, decay_fraction_;
};

// "constant" | "cosine" | "wsd"; throws pion::Error naming the valid choices otherwise.
std::unique_ptr<Schedule> make_schedule(const std::string& name, std::int64_t warmup,
                                        std::int64_t total, double min_ratio);

}  // namespace pion
