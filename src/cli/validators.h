#pragma once
// Range checks for numeric command-line options, in one place: every numeric option of every
// subcommand takes one, so NaN, Inf and out-of-range values are refused by CLI11 with a
// one-line "pion: error: --name: ..." and exit code 2 (src/cli/main.cpp) before anything runs.
// (CLI::Range lets NaN through: every comparison with NaN is false.)
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>

namespace pion::cli {

// A finite number in [lo, hi] (lo_open / hi_open exclude an end). The option's own type still
// decides integrality: an int option given 1.5 is a CLI11 conversion error.
inline CLI::Validator FiniteRange(double lo, double hi, bool lo_open = false,
                                  bool hi_open = false) {
  // Whole numbers print as such ("1000000", not "1e+06").
  auto number = [](double v) {
    std::ostringstream s;
    if (v == std::floor(v) && std::fabs(v) < 1e15)
      s << static_cast<long long>(v);
    else
      s << v;
    return s.str();
  };
  const std::string range =
      (lo_open ? "(" : "[") + number(lo) + ", " + number(hi) + (hi_open ? ")" : "]");
  const std::string text = range;
  return CLI::Validator(
      [lo, hi, lo_open, hi_open, text](std::string& input) -> std::string {
        const char* begin = input.c_str();
        char* end = nullptr;
        const double v = std::strtod(begin, &end);
        const bool parsed = end != begin && *end == '\0';
        const bool ok = parsed && std::isfinite(v) && (lo_open ? v > lo : v >= lo) &&
                        (hi_open ? v < hi : v <= hi);
        if (ok) return {};
        const std::string shown = input.size() <= 40 ? input : input.substr(0, 40) + "...";
        return "'" + shown + "' is not a finite number in " + text;
      },
      "in " + text);
}

}  // namespace pion::cli
