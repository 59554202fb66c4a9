#include "cli/sweep_runner.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <ctime>
#include <iostream>
#include <map>
#include <sstream>

#include "pion/core/error.h"

extern char** environ;

namespace pion::cli {

namespace {

volatile std::sig_atomic_t g_signal = 0;
volatile std::sig_atomic_t g_signal_count = 0;

void on_stop_signal(int sig) {
  g_signal = sig;
  g_signal_count = g_signal_count + 1;
}

// Installs the handlers for the scheduler's lifetime (without SA_RESTART, so sleeps wake).
class StopSignals {
 public:
  StopSignals() {
    g_signal = 0;
    g_signal_count = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopSignals() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

std::string duration_text(double seconds) {
  const long s = static_cast<long>(seconds + 0.5);
  std::ostringstream o;
  if (s >= 3600) o << s / 3600 << "h ";
  if (s >= 60) o << (s / 60) % 60 << "m ";
  o << s % 60 << "s";
  return o.str();
}

// The environment of a child: ours, with the thread counts replaced.
std::vector<std::string> child_environment(int threads) {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    if (entry.rfind("OMP_NUM_THREADS=", 0) == 0 || entry.rfind("OPENBLAS_NUM_THREADS=", 0) == 0)
      continue;
    env.push_back(entry);
  }
  env.push_back("OMP_NUM_THREADS=" + std::to_string(threads));
  env.push_back("OPENBLAS_NUM_THREADS=" + std::to_string(threads));
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// fork + exec of this binary; between the two only async-signal-safe calls.
pid_t spawn(const ChildJob& job, std::vector<std::string> env) {
  std::vector<std::string> argv = {"pion"};
  argv.insert(argv.end(), job.args.begin(), job.args.end());
  std::vector<char*> argv_c = c_strings(argv);
  std::vector<char*> env_c = c_strings(env);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  check(pid >= 0, std::string("pion sweep: fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    // Its own process group: a Ctrl-C in the terminal reaches the sweep only, which forwards
    // it once (a second SIGINT would make pion train quit without a checkpoint).
    setpgid(0, 0);
    // If the sweep itself dies, the run still checkpoints and stops.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(143);
    const int fd = open(job.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) _exit(126);
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    const int null_in = open("/dev/null", O_RDONLY);
    if (null_in >= 0) dup2(null_in, STDIN_FILENO);
    execve("/proc/self/exe", argv_c.data(), env_c.data());
    _exit(127);
  }
  return pid;
}

}  // namespace

int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

SchedulerReport run_children(const std::vector<ChildJob>& jobs, int parallel, int threads,
                             int total, int already_done,
                             const std::function<std::string(std::size_t, const ChildResult&)>&
                                 on_finish) {
  using Clock = std::chrono::steady_clock;
  StopSignals signals;
  SchedulerReport report;
  report.results.resize(jobs.size());
  const std::vector<std::string> env = child_environment(threads);
  std::map<pid_t, std::pair<std::size_t, Clock::time_point>> running;
  std::size_t next = 0;
  int done = already_done;
  int finished_here = 0;
  double finished_seconds = 0;
  int forwarded = 0;
  const auto sweep_start = Clock::now();
  while (next < jobs.size() || !running.empty()) {
    if (g_signal_count > forwarded) {
      forwarded = g_signal_count;
      report.stop_signal = g_signal;
      std::cout << "pion sweep: " << (g_signal == SIGTERM ? "SIGTERM" : "SIGINT")
                << " received: forwarded to " << running.size()
                << " running run(s); they checkpoint and stop (a rerun of the sweep resumes them)"
                << std::endl;
      for (const auto& [pid, _] : running) kill(pid, g_signal);
    }
    while (report.stop_signal == 0 && static_cast<int>(running.size()) < parallel &&
           next < jobs.size()) {
      const pid_t pid = spawn(jobs[next], env);
      running[pid] = {next, Clock::now()};
      report.results[next].started = true;
      std::cout << "[start " << already_done + static_cast<int>(next) + 1 << "/" << total << "] "
                << jobs[next].label << std::endl;
      ++next;
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid == 0 || (pid < 0 && errno == EINTR)) {
      struct timespec ts {0, 50'000'000};
      nanosleep(&ts, nullptr);
      continue;
    }
    if (pid < 0) break;  // ECHILD: nothing left to wait for
    auto it = running.find(pid);
    if (it == running.end()) continue;
    const auto [index, started] = it->second;
    running.erase(it);
    ChildResult& r = report.results[index];
    r.seconds = std::chrono::duration<double>(Clock::now() - started).count();
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    ++done;
    ++finished_here;
    finished_seconds += r.seconds;
    const std::string detail = on_finish(index, r);
    std::ostringstream line;
    line << "[done " << done << "/" << total << "] " << jobs[index].label << ": " << detail << " ("
         << duration_text(r.seconds) << ")";
    const std::size_t left = jobs.size() - next;
    if (report.stop_signal == 0 && (left > 0 || !running.empty())) {
      // Runs left, each taking the mean time so far, `parallel` at once (the running ones are
      // counted as half done).
      const double mean = finished_seconds / finished_here;
      const double eta = mean * (static_cast<double>(left) + 0.5 * static_cast<double>(running.size())) /
                         parallel;
      line << " | " << running.size() << " running, " << left << " queued, ETA "
           << duration_text(eta);
    }
    std::cout << line.str() << std::endl;
  }
  if (report.stop_signal == 0)
    std::cout << "pion sweep: " << jobs.size() << " run(s) took "
              << duration_text(std::chrono::duration<double>(Clock::now() - sweep_start).count())
              << std::endl;
  return report;
}

}  // namespace pion::cli
