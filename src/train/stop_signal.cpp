// SIGINT/SIGTERM handling for the training loop (declared in pion/train/trainer.h).
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <string>

#include "pion/train/trainer.h"

namespace pion {

namespace {

// The first stop signal's number (0: none yet). Lock-free, so the handler may touch it.
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);

template <std::size_t N>
void write_stderr(const char (&text)[N]) {
  if (::write(STDERR_FILENO, text, N - 1) < 0) {
  }  // nothing to do from a signal handler
}

// Only async-signal-safe calls here: an atomic, write(2), _Exit.
extern "C" void on_stop_signal(int sig) {
  int none = 0;
  if (!g_stop_signal.compare_exchange_strong(none, sig)) std::_Exit(128 + sig);  // a second one
  if (sig == SIGTERM)
    write_stderr(
        "\npion: SIGTERM received: finishing this step, then saving a checkpoint "
        "(a second signal quits at once)\n");
  else
    write_stderr(
        "\npion: SIGINT received: finishing this step, then saving a checkpoint "
        "(a second Ctrl-C quits at once)\n");
}

}  // namespace

int stop_signal() {
  return g_stop_signal.load();
}

bool interrupt_requested() {
  return stop_signal() != 0;
}

std::string signal_name(int signal) {
  if (signal == SIGINT) return "SIGINT";
  if (signal == SIGTERM) return "SIGTERM";
  return "signal " + std::to_string(signal);
}

StopSignalGuard::StopSignalGuard() {
  g_stop_signal = 0;
  previous_int_ = std::signal(SIGINT, on_stop_signal);
  previous_term_ = std::signal(SIGTERM, on_stop_signal);
}

StopSignalGuard::~StopSignalGuard() {
  std::signal(SIGINT, previous_int_);
  std::signal(SIGTERM, previous_term_);
}

}  // namespace pion
