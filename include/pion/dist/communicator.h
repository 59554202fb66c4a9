#pragma once
// Processes and CPU collectives for data-parallel training (`mpirun -np N pion train ...`).
//
// One Communicator type, two back ends chosen at run time:
//   - MPI (OpenMPI from Debian), when pion was built with PION_HAVE_MPI and the process was
//     launched by mpirun/mpiexec (detected from the launcher's environment variables);
//   - a single-process fallback where every collective is a no-op (size 1), so the trainer
//     has ONE code path whether or not MPI is present. A plain `pion train` never initialises
//     MPI (no singleton start-up cost, no MPI noise in the single-process tests).
// GPU collectives (NCCL) are not here: a CUDA trainer would add a second communicator with
// the same allreduce/broadcast shape over device buffers; this one stays the process layer.
//
// Watchdog: every blocking collective runs under a guard that records when it started. A
// thread checks once a second; a collective older than the timeout means another rank died
// or hangs, so the watchdog prints one line saying so (and that the last checkpoint, written
// atomically by rank 0, is intact) and ends the process with exit code 3. mpirun then ends
// the whole job. (It exits rather than calling MPI_Abort because MPI is initialised with
// MPI_THREAD_FUNNELED: only the main thread may call MPI.)
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace pion::dist {

// True when this binary was built with MPI support.
bool mpi_compiled();
// True when the launcher's environment says this process is one rank of an mpirun job.
bool launched_by_mpirun();

class Communicator {
 public:
  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root() const { return rank_ == 0; }
  bool distributed() const { return size_ > 1; }

  // In-place sums / means over all ranks.
  void allreduce_sum(std::span<float> data);
  void allreduce_sum(std::span<double> data);
  void allreduce_mean(std::span<float> data);
  double allreduce_sum(double value);
  double allreduce_max(double value);
  // Copies root's data into every rank's buffer.
  void broadcast(std::span<float> data, int root);
  void broadcast(std::string& data, int root);
  // Root receives every rank's string (index = rank); other ranks get an empty vector.
  std::vector<std::string> gather(const std::string& data, int root);
  // Every rank receives every rank's value.
  std::vector<double> allgather(double value);
  void barrier();

  // Non-blocking sum (MPI_Iallreduce); wait_all() completes every started one. Lets the
  // trainer start reducing a bucket of gradients while backward still computes others.
  void start_allreduce_sum(std::span<float> data);
  // Non-blocking broadcast of root's data (used for the all-gather of updated weights, one
  // call per parameter, each from its owning rank).
  void start_broadcast(std::span<float> data, int root);
  void wait_all();
  // Gives MPI a chance to progress started operations (MPI_Testall), without blocking.
  void progress();

  // Seconds a collective may wait before the watchdog ends the process (<= 0: no watchdog).
  // `checkpoint` is named in the message.
  void set_timeout(double seconds, const std::string& checkpoint);
  // Ends every rank of the job at once (MPI_Abort), after the caller printed why.
  [[noreturn]] void abort(int code);

  struct Impl;  // MPI requests and the watchdog (opaque)

  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  ~Communicator();

 private:
  friend class Session;
  friend Communicator& world();
  Communicator() = default;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0;
  int size_ = 1;
};

// The process's communicator: MPI's world after a Session started it, else size 1.
Communicator& world();

// RAII: initialises MPI when launched by mpirun (and built with MPI), finalises at the end.
// Construct once, first thing in main(). Launched by mpirun with more than one rank but
// without MPI support compiled in, it prints an error and exits with code 2.
class Session {
 public:
  Session(int& argc, char**& argv);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

 private:
  bool initialised_ = false;
};

}  // namespace pion::dist
