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
  // Appends when `append` (a resumed run continues its file), truncates otherwise.
  JsonlWriter(const std::string& path, bool append);
  void write(const nlohmann::json& record);

 private:
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

}  // namespace pion
