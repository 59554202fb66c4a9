#include "pion/train/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "pion/core/error.h"

namespace pion {

JsonlWriter::JsonlWriter(const std::string& path, bool append)
    : file_(std::fopen(path.c_str(), append ? "a" : "w")), path_(path) {
  check(file_ != nullptr, "cannot open metrics file '" + path + "': " + std::strerror(errno));
}

JsonlWriter JsonlWriter::create(const std::string& path) {
  return JsonlWriter(path, false);
}

JsonlWriter JsonlWriter::resume(const std::string& path, int step) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return JsonlWriter(path, false);
  const std::string tmp = path + ".tmp";
  std::int64_t kept = 0, dropped = 0;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(static_cast<bool>(out), "cannot create '" + tmp + "': " + std::strerror(errno));
    std::string line;
    while (std::getline(in, line)) {
      // getline at end of file without a newline: the last line is partial (killed mid-write).
      const bool complete = !in.eof();
      bool keep = false;
      if (complete) {
        const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        keep = j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
               j["step"].get<std::int64_t>() <= step;
      }
      if (keep) {
        out << line << '\n';
        ++kept;
      } else {
        ++dropped;
      }
    }
    check(!in.bad(), "cannot read metrics file '" + path + "'");
    out.flush();
    check(static_cast<bool>(out), "cannot write '" + tmp + "' (disk full?)");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw Error("cannot rename '" + tmp + "' to '" + path + "'");
  }
  if (dropped > 0)
    std::cout << path << ": kept the " << kept << " records up to step " << step << ", dropped "
              << dropped
              << " written after the checkpoint (or cut short); the resumed run rewrites them\n";
  return JsonlWriter(path, true);
}

void JsonlWriter::write(const nlohmann::json& record) {
  const std::string line = record.dump() + "\n";
  const bool ok = std::fwrite(line.data(), 1, line.size(), file_.get()) == line.size() &&
                  std::fflush(file_.get()) == 0;
  check(ok, "cannot write metrics to '" + path_ + "': " + std::strerror(errno) + " (disk full?)");
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

std::string progress_line(long step, long total, double loss, double lr, double tokens_per_sec,
                          double eta_seconds) {
  char buf[160];
  const double ktok = tokens_per_sec / 1000.0;
  std::snprintf(buf, sizeof buf, "step %ld/%ld | loss %.4f | lr %.2e | %.1fK tok/s | ETA %s", step,
                total, loss, lr, ktok, format_duration(eta_seconds).c_str());
  return buf;
}

nlohmann::json StepLog::finish_step(int step, double lr, double loss, double grad_norm,
                                    double step_seconds, double elapsed_seconds, bool applied) {
  ++steps_;
  train_seconds_ += step_seconds;
  window_seconds_ += step_seconds;
  window_tokens_ += tokens_per_step_;
  auto finite_or_null = [](double v) {
    return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
  };
  nlohmann::json record = {{"step", step},
                           {"lr", lr},
                           {"train_loss", finite_or_null(loss)},
                           {"grad_norm", finite_or_null(grad_norm)},
                           {"tokens_per_sec", tokens_per_step_ / step_seconds},
                           {"elapsed_seconds", elapsed_seconds},
                           {"skipped", !applied}};
  if (!applied) std::cout << "step " << step << ": non-finite gradient, step skipped\n";
  if (step % log_interval_ == 0 || step == max_iters_) {
    const double eta = (max_iters_ - step) * (train_seconds_ / steps_);
    std::cout << progress_line(step, max_iters_, loss, lr, window_tokens_ / window_seconds_, eta)
              << std::endl;
    window_seconds_ = window_tokens_ = 0.0;
  }
  return record;
}

double StepLog::tokens_per_sec() const {
  return steps_ > 0 ? steps_ * tokens_per_step_ / train_seconds_ : 0.0;
}

}  // namespace pion
