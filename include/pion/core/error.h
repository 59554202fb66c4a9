#pragma once
// One exception type for every user-facing failure: the message says what went wrong and,
// where possible, what to do. The CLI prints it on one line and exits with code 2.
#include <stdexcept>
#include <string>

namespace pion {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Throws pion::Error(message) when the condition is false. Used for argument checks.
inline void check(bool condition, const std::string& message) {
  if (!condition) throw Error(message);
}

}  // namespace pion
