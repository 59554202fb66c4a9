#include "pion/dist/communicator.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <thread>

#include "pion/core/error.h"

#ifdef PION_HAVE_MPI
// The C API only: OpenMPI's mpi.h otherwise drags in the deprecated C++ bindings (libmpi_cxx).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace pion::dist {

namespace {

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

bool mpi_compiled() {
#ifdef PION_HAVE_MPI
  return true;
#else
  return false;
#endif
}

bool launched_by_mpirun() {
  // OpenMPI sets OMPI_COMM_WORLD_SIZE; MPICH/Hydra and Slurm's PMI set PMI_SIZE.
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(var) != nullptr) return true;
  return false;
}

struct Communicator::Impl {
  // When the blocking collective in progress started (0: none). Written by the main thread,
  // read by the watchdog.
  std::atomic<std::int64_t> collective_since{0};
  std::atomic<bool> stop{false};
  double timeout_seconds = 0.0;
  std::string checkpoint;
  std::thread watchdog;
  int rank = 0;
#ifdef PION_HAVE_MPI
  std::vector<MPI_Request> pending;
#endif

  ~Impl() {
    stop = true;
    if (watchdog.joinable()) watchdog.join();
  }

  void watch() {
    while (!stop) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      const std::int64_t since = collective_since.load();
      if (since == 0) continue;
      const double waited = static_cast<double>(now_ns() - since) * 1e-9;
      if (waited > timeout_seconds) {
        std::fprintf(stderr,
                     "pion: error: rank %d: no progress in a collective for %.0f s (another rank "
                     "died or hangs); the last checkpoint at %s is intact\n",
                     rank, waited, checkpoint.empty() ? "(none yet)" : checkpoint.c_str());
        std::fflush(stderr);
        // Not MPI_Abort: MPI runs FUNNELED (main thread only). mpirun sees a rank exit
        // without MPI_Finalize and ends the whole job.
        std::_Exit(3);
      }
    }
  }
};

// Marks a blocking collective for the watchdog for its lifetime.
class CollectiveGuard {
 public:
  explicit CollectiveGuard(Communicator::Impl* impl) : impl_(impl) {
    if (impl_) impl_->collective_since = now_ns();
  }
  ~CollectiveGuard() {
    if (impl_) impl_->collective_since = 0;
  }
  CollectiveGuard(const CollectiveGuard&) = delete;
  CollectiveGuard& operator=(const CollectiveGuard&) = delete;

 private:
  Communicator::Impl* impl_;
};

Communicator::~Communicator() = default;

Communicator& world() {
  static Communicator instance;
  return instance;
}

#ifdef PION_HAVE_MPI

namespace {

void mpi_check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw Error(std::string(what) + " failed: " + std::string(msg, static_cast<std::size_t>(len)));
  }
}

int count_of(std::size_t n) {
  check(n <= static_cast<std::size_t>(std::numeric_limits<int>::max()),
        "MPI message of " + std::to_string(n) + " elements is too large; use smaller buckets");
  return static_cast<int>(n);
}

}  // namespace

Session::Session(int& argc, char**& argv) {
  if (!launched_by_mpirun()) return;
  int provided = 0;
  mpi_check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  initialised_ = true;
  Communicator& w = world();
  MPI_Comm_rank(MPI_COMM_WORLD, &w.rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &w.size_);
  // Errors come back as codes (turned into pion::Error) instead of aborting inside MPI.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  w.impl_ = std::make_unique<Communicator::Impl>();
  w.impl_->rank = w.rank_;
}

Session::~Session() {
  if (!initialised_) return;
  Communicator& w = world();
  w.impl_.reset();  // stops the watchdog before MPI goes away
  w.rank_ = 0;
  w.size_ = 1;
  MPI_Finalize();
}

void Communicator::allreduce_sum(std::span<float> data) {
  if (size_ == 1 || data.empty()) return;
  CollectiveGuard g(impl_.get());
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.data(), count_of(data.size()), MPI_FLOAT, MPI_SUM,
                          MPI_COMM_WORLD),
            "MPI_Allreduce");
}

void Communicator::allreduce_sum(std::span<double> data) {
  if (size_ == 1 || data.empty()) return;
  CollectiveGuard g(impl_.get());
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.data(), count_of(data.size()), MPI_DOUBLE, MPI_SUM,
                          MPI_COMM_WORLD),
            "MPI_Allreduce");
}

double Communicator::allreduce_max(double value) {
  if (size_ == 1) return value;
  CollectiveGuard g(impl_.get());
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD),
            "MPI_Allreduce");
  return value;
}

void Communicator::broadcast(std::span<float> data, int root) {
  if (size_ == 1 || data.empty()) return;
  CollectiveGuard g(impl_.get());
  mpi_check(MPI_Bcast(data.data(), count_of(data.size()), MPI_FLOAT, root, MPI_COMM_WORLD),
            "MPI_Bcast");
}

void Communicator::broadcast(std::string& data, int root) {
  if (size_ == 1) return;
  CollectiveGuard g(impl_.get());
  std::uint64_t n = data.size();
  mpi_check(MPI_Bcast(&n, 1, MPI_UINT64_T, root, MPI_COMM_WORLD), "MPI_Bcast");
  data.resize(n);
  if (n > 0)
    mpi_check(MPI_Bcast(data.data(), count_of(n), MPI_CHAR, root, MPI_COMM_WORLD), "MPI_Bcast");
}

std::vector<std::string> Communicator::gather(const std::string& data, int root) {
  if (size_ == 1) return {data};
  CollectiveGuard g(impl_.get());
  const int n = count_of(data.size());
  std::vector<int> sizes(static_cast<std::size_t>(size_));
  mpi_check(MPI_Gather(&n, 1, MPI_INT, sizes.data(), 1, MPI_INT, root, MPI_COMM_WORLD),
            "MPI_Gather");
  std::vector<int> offsets(sizes.size(), 0);
  std::size_t total = 0;
  if (rank_ == root) {
    for (std::size_t r = 0; r < sizes.size(); ++r) {
      offsets[r] = count_of(total);
      total += static_cast<std::size_t>(sizes[r]);
    }
    count_of(total);
  }
  std::string all(total, '\0');
  mpi_check(MPI_Gatherv(data.data(), n, MPI_CHAR, all.data(), sizes.data(), offsets.data(),
                        MPI_CHAR, root, MPI_COMM_WORLD),
            "MPI_Gatherv");
  std::vector<std::string> out;
  if (rank_ == root)
    for (std::size_t r = 0; r < sizes.size(); ++r)
      out.push_back(
          all.substr(static_cast<std::size_t>(offsets[r]), static_cast<std::size_t>(sizes[r])));
  return out;
}

std::vector<double> Communicator::allgather(double value) {
  if (size_ == 1) return {value};
  CollectiveGuard g(impl_.get());
  std::vector<double> out(static_cast<std::size_t>(size_));
  mpi_check(MPI_Allgather(&value, 1, MPI_DOUBLE, out.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD),
            "MPI_Allgather");
  return out;
}

void Communicator::barrier() {
  if (size_ == 1) return;
  CollectiveGuard g(impl_.get());
  mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
}

void Communicator::start_allreduce_sum(std::span<float> data) {
  if (size_ == 1 || data.empty()) return;
  MPI_Request req;
  mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data.data(), count_of(data.size()), MPI_FLOAT, MPI_SUM,
                           MPI_COMM_WORLD, &req),
            "MPI_Iallreduce");
  impl_->pending.push_back(req);
}

void Communicator::start_broadcast(std::span<float> data, int root) {
  if (size_ == 1 || data.empty()) return;
  MPI_Request req;
  mpi_check(MPI_Ibcast(data.data(), count_of(data.size()), MPI_FLOAT, root, MPI_COMM_WORLD, &req),
            "MPI_Ibcast");
  impl_->pending.push_back(req);
}

void Communicator::wait_all() {
  if (size_ == 1 || impl_->pending.empty()) return;
  CollectiveGuard g(impl_.get());
  auto& p = impl_->pending;
  mpi_check(MPI_Waitall(count_of(p.size()), p.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
  p.clear();
}

void Communicator::progress() {
  if (size_ == 1 || impl_->pending.empty()) return;
  int done = 0;
  auto& p = impl_->pending;
  mpi_check(MPI_Testall(count_of(p.size()), p.data(), &done, MPI_STATUSES_IGNORE), "MPI_Testall");
  if (done) p.clear();
}

void Communicator::abort(int code) {
  if (size_ > 1) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

#else  // single process only: every collective is the identity

Session::Session(int&, char**&) {
  // N copies each training alone into the same out_dir would overwrite each other's files.
  // (`mpirun -np 1` is harmless: one process, so it runs.)
  const char* sizes[] = {std::getenv("OMPI_COMM_WORLD_SIZE"), std::getenv("PMI_SIZE")};
  bool several_ranks = false;
  for (const char* s : sizes)
    if (s != nullptr && std::atoi(s) > 1) several_ranks = true;
  if (several_ranks) {
    std::fprintf(stderr,
                 "pion: error: launched by mpirun, but this pion was built without MPI "
                 "(PION_MPI=OFF or no libopenmpi-dev); rebuild with MPI or run without mpirun\n");
    std::exit(2);
  }
}
Session::~Session() = default;
void Communicator::allreduce_sum(std::span<float>) {}
void Communicator::allreduce_sum(std::span<double>) {}
double Communicator::allreduce_max(double value) {
  return value;
}
void Communicator::broadcast(std::span<float>, int) {}
void Communicator::broadcast(std::string&, int) {}
std::vector<std::string> Communicator::gather(const std::string& data, int) {
  return {data};
}
std::vector<double> Communicator::allgather(double value) {
  return {value};
}
void Communicator::barrier() {}
void Communicator::start_allreduce_sum(std::span<float>) {}
void Communicator::start_broadcast(std::span<float>, int) {}
void Communicator::wait_all() {}
void Communicator::progress() {}
void Communicator::abort(int code) {
  std::_Exit(code);
}

#endif

void Communicator::allreduce_mean(std::span<float> data) {
  if (size_ == 1) return;
  allreduce_sum(data);
  const float inv = 1.0f / static_cast<float>(size_);
  for (float& x : data) x *= inv;
}

double Communicator::allreduce_sum(double value) {
  std::span<double> one(&value, 1);
  allreduce_sum(one);
  return value;
}

void Communicator::set_timeout(double seconds, const std::string& checkpoint) {
  if (size_ == 1 || !impl_) return;
  // Set once, before the watchdog thread starts reading them.
  if (seconds <= 0 || impl_->watchdog.joinable()) return;
  impl_->checkpoint = checkpoint;
  impl_->timeout_seconds = seconds;
  impl_->watchdog = std::thread([impl = impl_.get()] { impl->watch(); });
}

}  // namespace pion::dist
