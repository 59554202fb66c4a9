#pragma once
// How the tests check a refusal: a call throws pion::Error, or the `pion` binary exits 2 with
// one error line; either way the message names what was wrong.
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <vector>

#include "helpers.h"
#include "pion/core/error.h"

namespace pion::test {

// Runs `fn`, which must throw pion::Error whose message contains every fragment. Returns the
// message for further checks, or nothing when `fn` did not throw.
template <class Fn>
std::optional<std::string> expect_error(Fn&& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
    ADD_FAILURE() << "no pion::Error; expected one mentioning " << fragments.front();
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const auto& f : fragments)
      EXPECT_NE(what.find(f), std::string::npos) << "'" << f << "' not in: " << what;
    return what;
  }
  return std::nullopt;
}

// Runs `pion args`, which must exit 2 with a single "pion: error: ..." line that contains every
// needle (a usage error: refused before anything runs).
inline void expect_cli_error(const std::string& args, const std::vector<std::string>& needles) {
  const auto r = run_pion(args);
  EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
  EXPECT_TRUE(single_error_line(r.output)) << args << "\n" << r.output;
  for (const auto& n : needles)
    EXPECT_NE(r.output.find(n), std::string::npos)
        << "'" << n << "' not in output of " << args << ":\n"
        << r.output;
}

}  // namespace pion::test
