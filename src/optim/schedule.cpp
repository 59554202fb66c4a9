#include "pion/optim/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "pion/core/error.h"

namespace pion {

namespace {
double warmup_factor(std::int64_t step, std::int64_t warmup) {
  return static_cast<double>(step + 1) / static_cast<double>(warmup);
}
}  // namespace

double ConstantSchedule::factor(std::int64_t step) const {
  return step < warmup_ ? warmup_factor(step, warmup_) : 1.0;
}

WarmupCosineSchedule::WarmupCosineSchedule(std::int64_t warmup, std::int64_t total, double min_ratio)
    : warmup_(warmup), total_(total), min_ratio_(min_ratio) {
  check(warmup >= 0 && total > 0, "cosine schedule: need warmup >= 0 and total > 0");
  check(min_ratio >= 0 && min_ratio <= 1, "cosine schedule: min_lr_ratio must lie in [0, 1]");
}

double WarmupCosineSchedule::factor(std::int64_t step) const {
  if (step < warmup_) return warmup_factor(step, warmup_);
  if (step >= total_) return min_ratio_;
  const double progress =
      static_cast<double>(step - warmup_) / static_cast<double>(std::max<std::int64_t>(1, total_ - warmup_));
  return min_ratio_ + (1.0 - min_ratio_) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

WsdSchedule::WsdSchedule(std::int64_t warmup, std::int64_t total, double min_ratio, double decay_fraction)
    : warmup_(warmup), total_(total), min_ratio_(min_ratio), decay_fraction_(decay_fraction) {
  check(warmup >= 0 && total > 0, "wsd schedule: need warmup >= 0 and total > 0");
  check(min_ratio >= 0 && min_ratio <= 1, "wsd schedule: min_lr_ratio must lie in [0, 1]");
  check(decay_fraction > 0 && decay_fraction <= 1, "wsd schedule: decay fraction must lie in (0, 1]");
}

double WsdSchedule::factor(std::int64_t step) const {
  if (step < warmup_) return warmup_factor(step, warmup_);
  if (step >= total_) return min_ratio_;
  const auto decay_steps = static_cast<std::int64_t>(std::ceil(decay_fraction_ * static_cast<double>(total_)));
  const std::int64_t decay_start = std::max(warmup_, total_ - decay_steps);
  if (step < decay_start) return 1.0;
  const double progress = static_cast<double>(step - decay_start) /
                          static_cast<double>(std::max<std::int64_t>(1, total_ - decay_start));
  return 1.0 + (min_ratio_ - 1.0) * progress;
}

std::unique_ptr<Schedule> make_schedule(const std::string& name, std::int64_t warmup,
                                        std::int64_t total, double min_ratio) {
  if (name == "constant") return std::make_unique<ConstantSchedule>(warmup);
  if (name == "cosine") return std::make_unique<WarmupCosineSchedule>(warmup, total, min_ratio);
  if (name == "wsd") return std::make_unique<WsdSchedule>(warmup, total, min_ratio);
  throw Error("unknown schedule '" + name + "': choose cosine, wsd or constant");
}

}  // namespace pion
