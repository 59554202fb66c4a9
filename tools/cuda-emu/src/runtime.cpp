// The CUDA emulator's core: coroutine scheduler for kernels (barriers, warp exchange), device
// memory, streams, events, stream capture into graphs, errors. See ../README.md.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "emu/cuda_emu.h"
#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim;
dim3 gridDim;

// ---- context switch (x86-64 System V): callee-saved registers, MXCSR and x87 control word ----
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch,.-emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
extern "C" void emu_switch(void** save_sp, void* to_sp);

namespace emu {

// ---- configuration (environment) ------------------------------------------------------------
Config& config() {
  static Config c = [] {
    Config k;
    if (const char* s = std::getenv("EMU_ORDER")) {
      const std::string v = s;
      k.order = v == "reverse" ? 1 : v == "random" ? 2 : 0;
    }
    if (const char* s = std::getenv("EMU_SEED")) k.seed = static_cast<unsigned>(std::atoi(s));
    if (const char* s = std::getenv("EMU_POISON")) k.poison = std::atoi(s) != 0;
    if (const char* s = std::getenv("EMU_STRICT")) k.strict = std::atoi(s) != 0;
    if (const char* s = std::getenv("EMU_TRACE")) k.trace = std::atoi(s) != 0;
    return k;
  }();
  return c;
}

// ---- warnings ---------------------------------------------------------------------------------
namespace {
std::mutex g_mutex;  // one host thread in the emulator at a time
std::recursive_mutex g_api_mutex;
const LaunchSpec* g_spec = nullptr;  // the kernel running now
bool g_in_block = false;             // a block is being run (threadIdx is meaningful)
long g_warnings = 0;
std::map<std::string, long> g_warning_counts;

struct Summary {
  ~Summary() {
    if (g_warnings == 0) return;
    std::fprintf(stderr, "[cuda-emu] %ld warning(s) in this process:\n", g_warnings);
    for (const auto& [k, n] : g_warning_counts) std::fprintf(stderr, "[cuda-emu]   %ldx %s\n", n, k.c_str());
  }
} g_summary;
}  // namespace

long warning_count() {
  return g_warnings;
}

void warn(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  std::string key = buf;
  if (g_spec != nullptr)
    key = std::string("kernel ") + g_spec->name + " (" + g_spec->file + ":" +
          std::to_string(g_spec->line) + "): " + key;
  ++g_warnings;
  if (g_warning_counts[key]++ == 0) {
    if (g_spec != nullptr && g_in_block)
      std::fprintf(stderr, "[cuda-emu] WARNING %s [first at block (%u,%u,%u) thread (%u,%u,%u)]\n",
                   key.c_str(), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
                   threadIdx.z);
    else
      std::fprintf(stderr, "[cuda-emu] WARNING %s\n", key.c_str());
  }
  if (config().strict) {
    std::fprintf(stderr, "[cuda-emu] EMU_STRICT=1: aborting at the first warning\n");
    std::abort();
  }
}

[[noreturn]] void fatal(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  if (g_spec != nullptr)
    std::fprintf(stderr, "[cuda-emu] FATAL in kernel %s (%s:%d), block (%u,%u,%u): %s\n", g_spec->name,
                 g_spec->file, g_spec->line, blockIdx.x, blockIdx.y, blockIdx.z, buf);
  else
    std::fprintf(stderr, "[cuda-emu] FATAL: %s\n", buf);
  std::fflush(stderr);
  std::abort();
}

// ---- the block scheduler ----------------------------------------------------------------------
namespace {

enum class State : unsigned char { Runnable, WaitBlock, WaitWarp, Done };

struct Fiber {
  void* sp = nullptr;
  uint3 tid{};
  unsigned linear = 0;
  State state = State::Done;
  unsigned gen = 0;  // the barrier generation this thread waits in
  const char* file = nullptr;
  int line = 0;
};

struct Warp {
  unsigned present = 0;  // lanes that exist
  unsigned live = 0;     // lanes not exited
  unsigned waiting = 0;  // lanes waiting at the warp barrier
  unsigned gen = 0;
  unsigned part[2] = {0, 0};
  const char* file = nullptr;
  int line = 0;
  alignas(16) unsigned char slots[2][32 * 16];
};

struct BlockState {
  unsigned n = 0, live = 0, waiting = 0, gen = 0;
  int acc_or[2] = {0, 0}, acc_and[2] = {1, 1}, acc_count[2] = {0, 0};
  int res_or[2] = {0, 0}, res_and[2] = {0, 0}, res_count[2] = {0, 0};
  const char* file = nullptr;
  int line = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> dyn_shared;
};

BlockState B;
void* g_sched_sp = nullptr;
Fiber* g_cur = nullptr;
KernelBody g_body = nullptr;
void* g_closure = nullptr;
std::set<std::string> g_partial_barrier_sites;

constexpr std::size_t kMaxThreads = 1024;
constexpr std::size_t kStackBytes = 256 * 1024;
constexpr std::size_t kGuard = 4096;
unsigned char* g_stacks = nullptr;

#if EMU_ASAN
void* g_asan_fake = nullptr;
const void* g_main_stack_bottom = nullptr;
std::size_t g_main_stack_size = 0;
#endif

unsigned char* stack_top(unsigned t) {
  if (g_stacks == nullptr) {
    const std::size_t total = kMaxThreads * (kStackBytes + kGuard);
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) fatal("cannot map %zu bytes of coroutine stacks", total);
    g_stacks = static_cast<unsigned char*>(p);
    for (std::size_t i = 0; i < kMaxThreads; ++i)  // a guard page below every stack
      mprotect(g_stacks + i * (kStackBytes + kGuard), kGuard, PROT_NONE);
  }
  return g_stacks + static_cast<std::size_t>(t) * (kStackBytes + kGuard) + kGuard + kStackBytes;
}

// Switch from the scheduler into a thread and back.
inline void resume(Fiber* f) {
  g_cur = f;
  threadIdx = f->tid;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&g_asan_fake, stack_top(f->linear) - kStackBytes, kStackBytes);
#endif
  emu_switch(&g_sched_sp, f->sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(g_asan_fake, nullptr, nullptr);
#endif
}

// From a thread back to the scheduler.
inline void yield_to_scheduler(bool exiting) {
  Fiber* f = g_cur;
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, g_main_stack_bottom, g_main_stack_size);
#else
  (void)exiting;
#endif
  emu_switch(&f->sp, g_sched_sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

void release_block() {
  const unsigned g = B.gen & 1u;
  B.res_or[g] = B.acc_or[g];
  B.res_and[g] = B.acc_and[g];
  B.res_count[g] = B.acc_count[g];
  const unsigned h = g ^ 1u;
  B.acc_or[h] = 0;
  B.acc_and[h] = 1;
  B.acc_count[h] = 0;
  if (B.live < B.n) {
    const std::string site = std::string(g_spec->name) + "@" + B.file + ":" + std::to_string(B.line);
    if (g_partial_barrier_sites.insert(site).second)
      warn("%s:%d: __syncthreads completed by %u of the block's %u threads (the others had "
           "exited): undefined behaviour in CUDA (the condition around a barrier must be uniform)",
           B.file, B.line, B.live, B.n);
  }
  for (Fiber& f : B.fibers)
    if (f.state == State::WaitBlock) f.state = State::Runnable;
  B.waiting = 0;
  ++B.gen;
}

void check_block() {
  if (B.waiting > 0 && B.waiting == B.live) release_block();
}

void check_warp(unsigned w) {
  Warp& wp = B.warps[w];
  if (wp.waiting == 0 || wp.waiting != wp.live) return;
  wp.part[wp.gen & 1u] = wp.waiting;
  for (unsigned lane = 0; lane < 32; ++lane)
    if (wp.waiting & (1u << lane)) B.fibers[w * 32 + lane].state = State::Runnable;
  wp.waiting = 0;
  ++wp.gen;
}

void on_exit(Fiber* f) {
  f->state = State::Done;
  --B.live;
  Warp& wp = B.warps[f->linear / 32];
  wp.live &= ~(1u << (f->linear % 32));
  check_warp(f->linear / 32);
  check_block();
}

extern "C" [[noreturn]] void emu_fiber_entry() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_stack_bottom, &g_main_stack_size);
#endif
  g_body(g_closure);
  on_exit(g_cur);
  yield_to_scheduler(true);
  fatal("a finished thread was resumed");
}

void init_fiber(Fiber& f) {
  unsigned char* top = stack_top(f.linear);
  auto* sp = reinterpret_cast<std::uint64_t*>(top);
  *--sp = 0;                                                  // fake return address
  *--sp = reinterpret_cast<std::uint64_t>(&emu_fiber_entry);  // where `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = 0;                      // rbp rbx r12 r13 r14 r15
  std::uint32_t mxcsr = 0;
  std::uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  --sp;
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  f.sp = sp;
}

const char* state_name(State s) {
  switch (s) {
    case State::Runnable: return "runnable";
    case State::WaitBlock: return "__syncthreads";
    case State::WaitWarp: return "warp barrier";
    case State::Done: return "exited";
  }
  return "?";
}

[[noreturn]] void deadlock() {
  std::string msg = "deadlock: no thread can run. Threads waiting:";
  int shown = 0;
  for (const Fiber& f : B.fibers) {
    if (f.state == State::Done) continue;
    if (shown++ < 12)
      msg += "\n    thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
             std::to_string(f.tid.z) + ") at " + state_name(f.state) + " " +
             (f.file ? f.file : "?") + ":" + std::to_string(f.line);
  }
  msg += "\n    (" + std::to_string(B.live) + " of " + std::to_string(B.n) +
         " threads still live; a barrier inside divergent code hangs or misbehaves on a GPU)";
  fatal("%s", msg.c_str());
}

std::mt19937 g_rng;

void run_block(unsigned nthreads, const dim3& bd) {
  B.n = nthreads;
  B.live = nthreads;
  B.waiting = 0;
  B.gen = 0;
  B.acc_or[0] = B.acc_or[1] = 0;
  B.acc_and[0] = B.acc_and[1] = 1;
  B.acc_count[0] = B.acc_count[1] = 0;
  B.fibers.resize(nthreads);
  const unsigned nw = (nthreads + 31) / 32;
  B.warps.resize(nw);
  for (unsigned w = 0; w < nw; ++w) {
    Warp& wp = B.warps[w];
    const unsigned lanes = std::min(32u, nthreads - w * 32);
    wp.present = wp.live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    wp.waiting = 0;
    wp.gen = 0;
    if (config().poison) std::memset(wp.slots, 0xff, sizeof(wp.slots));
  }
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = B.fibers[t];
    f.linear = t;
    f.tid = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
    f.state = State::Runnable;
    f.file = nullptr;
    f.line = 0;
    init_fiber(f);
  }
  if (config().poison) std::fill(B.dyn_shared.begin(), B.dyn_shared.end(), 0xff);
  std::vector<unsigned> order(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) order[t] = config().order == 1 ? nthreads - 1 - t : t;
  while (B.live > 0) {
    if (config().order == 2) std::shuffle(order.begin(), order.end(), g_rng);
    bool ran = false;
    for (unsigned t : order) {
      Fiber& f = B.fibers[t];
      if (f.state != State::Runnable) continue;
      ran = true;
      resume(&f);
    }
    if (!ran && B.live > 0) deadlock();
  }
}

}  // namespace

unsigned lane_id() {
  return g_cur->linear % 32;
}

void* dynamic_shared_base() {
  if (B.dyn_shared.empty()) return nullptr;
  // A GPU's dynamic shared memory starts at least 128-byte aligned (wmma wants 32); the
  // buffer has 128 bytes to spare for it.
  const auto p = reinterpret_cast<std::uintptr_t>(B.dyn_shared.data());
  return reinterpret_cast<void*>((p + 127) & ~static_cast<std::uintptr_t>(127));
}

void syncthreads(const char* file, int line) {
  Fiber* f = g_cur;
  if (f == nullptr) fatal("__syncthreads outside a kernel");
  if (B.waiting == 0) {
    B.file = file;
    B.line = line;
  } else if (B.line != line || std::strcmp(B.file, file) != 0) {
    warn("barrier divergence: threads of one block wait at different __syncthreads (%s:%d and "
         "%s:%d)",
         B.file, B.line, file, line);
  }
  f->file = file;
  f->line = line;
  f->state = State::WaitBlock;
  f->gen = B.gen;
  ++B.waiting;
  check_block();
  yield_to_scheduler(false);
}

int syncthreads_op(int pred, int op, const char* file, int line) {
  const unsigned g = B.gen & 1u;
  B.acc_or[g] |= pred;
  B.acc_and[g] &= pred;
  B.acc_count[g] += pred;
  syncthreads(file, line);
  const unsigned mine = g_cur->gen & 1u;
  return op == 0 ? B.res_or[mine] : op == 1 ? B.res_and[mine] : B.res_count[mine];
}

namespace {
void arrive_warp(unsigned mask, const char* file, int line, const char* what) {
  Fiber* f = g_cur;
  if (f == nullptr) fatal("%s outside a kernel", what);
  const unsigned w = f->linear / 32, bit = 1u << (f->linear % 32);
  Warp& wp = B.warps[w];
  if ((mask & wp.present) != wp.present)
    warn("%s:%d: %s with mask 0x%08x over a warp whose lanes are 0x%08x (partial masks are "
         "emulated as the whole warp)",
         file, line, what, mask, wp.present);
  if (!(mask & bit)) warn("%s:%d: %s called by a lane outside its mask", file, line, what);
  if (wp.waiting == 0) {
    wp.file = file;
    wp.line = line;
  } else if (wp.line != line || std::strcmp(wp.file, file) != 0) {
    warn("warp divergence: lanes of one warp meet at different warp barriers (%s:%d and %s:%d)",
         wp.file, wp.line, file, line);
  }
  f->file = file;
  f->line = line;
  f->state = State::WaitWarp;
  f->gen = wp.gen;
  wp.waiting |= bit;
  check_warp(w);
  yield_to_scheduler(false);
}
}  // namespace

void syncwarp(unsigned mask, const char* file, int line) {
  arrive_warp(mask, file, line, "__syncwarp");
}

const unsigned char* warp_exchange(unsigned mask, const void* v, std::size_t size,
                                   unsigned* participants, const char* file, int line) {
  Fiber* f = g_cur;
  if (f == nullptr) fatal("warp shuffle outside a kernel");
  Warp& wp = B.warps[f->linear / 32];
  const unsigned g = wp.gen & 1u;
  std::memcpy(wp.slots[g] + 16 * (f->linear % 32), v, size);
  arrive_warp(mask, file, line, "warp shuffle");
  *participants = wp.part[g];
  return wp.slots[g];
}

// ---- device memory -----------------------------------------------------------------------------
namespace {
std::map<std::uintptr_t, std::size_t> g_allocs;  // base -> bytes
}

bool device_range(const void* p, std::size_t bytes) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = g_allocs.upper_bound(a);
  if (it == g_allocs.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}

bool device_pointer(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto it = g_allocs.upper_bound(a);
  if (it == g_allocs.begin()) return false;
  --it;
  return a >= it->first && a <= it->first + it->second;  // one past the end is allowed
}

void check_kernel_pointer(const LaunchSpec& spec, int index, const void* p) {
  if (p == nullptr || device_pointer(p)) return;
  const LaunchSpec* saved = g_spec;
  g_spec = &spec;
  warn("argument %d is a pointer %p outside every cudaMalloc allocation (a host pointer or a "
       "stale one?): an illegal address on a GPU",
       index, p);
  g_spec = saved;
}

// ---- errors, streams, capture ------------------------------------------------------------------
namespace {
cudaError_t g_last = cudaSuccess;
cudaError_t g_sticky = cudaSuccess;

cudaError_t ret(cudaError_t e) {
  if (e != cudaSuccess) g_last = e;
  return e;
}
}  // namespace

void set_sticky(cudaError_t e) {
  if (g_sticky == cudaSuccess) g_sticky = e;
  g_last = e;
}

struct Stream {
  unsigned flags = 0;
  bool capturing = false;
  bool invalidated = false;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id capture_thread;
  Graph* graph = nullptr;
};
struct Graph {
  std::vector<std::function<void()>> ops;
  long kernels = 0;
};
struct GraphExec {
  std::vector<std::function<void()>> ops;
};
struct Event {
  bool recorded = false;
  bool captured = false;
  bool timing = true;
  double t_ms = 0.0;
};

namespace {
Stream g_legacy;
std::set<Stream*> g_streams;
std::set<Event*> g_events;
std::set<Graph*> g_graphs;
std::set<GraphExec*> g_execs;

Stream* resolve(cudaStream_t s) {
  return s == nullptr ? &g_legacy : s;
}
bool valid_stream(cudaStream_t s) {
  return s == nullptr || g_streams.count(s) != 0;
}

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// A call that is "potentially unsafe" during stream capture (synchronous copies, allocations,
// synchronisation): CUDA refuses it and invalidates the captures it would interfere with.
bool capture_forbids(const char* what) {
  bool hit = false;
  for (Stream* s : g_streams) {
    if (!s->capturing || s->invalidated) continue;
    if (s->mode == cudaStreamCaptureModeRelaxed) continue;
    if (s->mode == cudaStreamCaptureModeThreadLocal && s->capture_thread != std::this_thread::get_id())
      continue;
    s->invalidated = true;
    hit = true;
  }
  if (hit)
    warn("%s during a stream capture: CUDA returns cudaErrorStreamCaptureUnsupported and "
         "invalidates the capture",
         what);
  return hit;
}
}  // namespace

namespace {
bool g_replaying = false;  // cudaGraphLaunch is running a graph's operations
}  // namespace

// Runs the operation now, or records it when the stream is capturing.
cudaError_t enqueue(cudaStream_t stream, std::function<void()> op, bool is_kernel) {
  if (!valid_stream(stream)) return ret(cudaErrorInvalidResourceHandle);
  if (g_sticky != cudaSuccess) return ret(g_sticky);
  Stream* s = resolve(stream);
  if (s->capturing) {
    if (s->invalidated) return ret(cudaErrorStreamCaptureInvalidated);
    s->graph->ops.push_back(std::move(op));
    if (is_kernel) ++s->graph->kernels;
    return cudaSuccess;
  }
  if (stream == nullptr) {
    // The legacy stream synchronises with every blocking stream: not allowed while one captures.
    for (Stream* o : g_streams)
      if (o->capturing && !(o->flags & cudaStreamNonBlocking) && !o->invalidated) {
        o->invalidated = true;
        warn("work on the legacy default stream while a blocking stream captures");
        return ret(cudaErrorStreamCaptureImplicit);
      }
  }
  if (!g_replaying) count_submit(false);
  op();
  return g_sticky != cudaSuccess ? ret(g_sticky) : cudaSuccess;
}

namespace {
std::map<const void*, int> g_max_dyn_smem;

void run_grid(const LaunchSpec& spec, KernelBody body, void* closure) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const LaunchSpec* saved_spec = g_spec;
  g_spec = &spec;
  if (config().trace)
    std::fprintf(stderr, "[cuda-emu] launch %s grid (%u,%u,%u) block (%u,%u,%u) at %s:%d\n", spec.name,
                 spec.grid.x, spec.grid.y, spec.grid.z, spec.block.x, spec.block.y, spec.block.z,
                 spec.file, spec.line);
  gridDim = spec.grid;
  blockDim = spec.block;
  const bool counted = count_kernel_begin();
  g_body = body;
  g_closure = closure;
  B.dyn_shared.assign(spec.shmem == 0 ? 0 : spec.shmem + 128, 0xff);
  const unsigned nthreads = spec.block.x * spec.block.y * spec.block.z;
  const std::uint64_t nblocks =
      static_cast<std::uint64_t>(spec.grid.x) * spec.grid.y * spec.grid.z;
  std::vector<std::uint64_t> order;
  if (config().order != 0) {
    order.resize(nblocks);
    for (std::uint64_t i = 0; i < nblocks; ++i) order[i] = config().order == 1 ? nblocks - 1 - i : i;
    if (config().order == 2) std::shuffle(order.begin(), order.end(), g_rng);
  }
  for (std::uint64_t i = 0; i < nblocks; ++i) {
    const std::uint64_t b = order.empty() ? i : order[i];
    blockIdx = uint3{static_cast<unsigned>(b % spec.grid.x),
                     static_cast<unsigned>((b / spec.grid.x) % spec.grid.y),
                     static_cast<unsigned>(b / (static_cast<std::uint64_t>(spec.grid.x) * spec.grid.y))};
    g_in_block = true;
    run_block(nthreads, spec.block);
    g_in_block = false;
  }
  g_cur = nullptr;
  if (counted) count_kernel_end(spec.name);
  g_spec = saved_spec;
}
}  // namespace

void launch(const LaunchSpec& spec, KernelBody body, void* closure, void (*destroy)(void*)) {
  std::lock_guard<std::recursive_mutex> api(g_api_mutex);
  std::shared_ptr<void> owned(closure, destroy);
  const dim3 g = spec.grid, b = spec.block;
  const std::uint64_t threads = static_cast<std::uint64_t>(b.x) * b.y * b.z;
  const LaunchSpec* saved = g_spec;
  g_spec = &spec;
  cudaError_t bad = cudaSuccess;
  if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64 || g.x == 0 ||
      g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    warn("invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u): "
         "cudaErrorInvalidConfiguration",
         g.x, g.y, g.z, b.x, b.y, b.z);
    bad = cudaErrorInvalidConfiguration;
  } else if (spec.shmem > 48 * 1024) {
    auto it = g_max_dyn_smem.find(spec.func);
    if (it == g_max_dyn_smem.end() || static_cast<std::size_t>(it->second) < spec.shmem) {
      warn("%zu bytes of dynamic shared memory without cudaFuncSetAttribute("
           "cudaFuncAttributeMaxDynamicSharedMemorySize)",
           spec.shmem);
      bad = cudaErrorInvalidValue;
    }
  }
  g_spec = saved;
  if (bad != cudaSuccess) {
    ret(bad);
    return;
  }
  LaunchSpec copy = spec;
  const cudaError_t e = enqueue(
      spec.stream, [copy, body, owned]() { run_grid(copy, body, owned.get()); }, true);
  if (e != cudaSuccess) ret(e);
}

}  // namespace emu

using namespace emu;

// ---- runtime API --------------------------------------------------------------------------------
#define EMU_API_LOCK std::lock_guard<std::recursive_mutex> emu_api_lock(g_api_mutex)

// EMU_FAKE_DEVICE_ERROR=<cudaError_t number> makes cudaGetDeviceCount fail with that error
// (and EMU_FAKE_DRIVER_VERSION sets what cudaDriverGetVersion reports, default 13000), so
// the path of a broken GPU set-up (pion::cuda::device_count must throw, not say "no GPU")
// runs end to end; run.sh checks it.
cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return ret(cudaErrorInvalidValue);
  if (const char* fake = std::getenv("EMU_FAKE_DEVICE_ERROR"); fake != nullptr && *fake != 0) {
    *count = 0;
    return ret(static_cast<cudaError_t>(std::atoi(fake)));
  }
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  if (version == nullptr) return ret(cudaErrorInvalidValue);
  const char* fake = std::getenv("EMU_FAKE_DRIVER_VERSION");
  *version = fake != nullptr && *fake != 0 ? std::atoi(fake) : 13000;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  if (version == nullptr) return ret(cudaErrorInvalidValue);
  *version = 13000;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (prop == nullptr || device != 0) return ret(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "pion CUDA emulator (CPU)");
  prop->totalGlobalMem = std::size_t{80} << 30;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = 227 * 1024;
  prop->regsPerBlock = 65536;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 132;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->sharedMemPerMultiprocessor = 228 * 1024;
  prop->l2CacheSize = 50u << 20;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : ret(cudaErrorInvalidDevice);
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = g_sticky;  // a sticky error stays
  return e;
}
cudaError_t cudaPeekAtLastError() {
  return g_last;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
#define EMU_CASE(x) \
  case x:           \
    return #x;
    EMU_CASE(cudaSuccess)
    EMU_CASE(cudaErrorInvalidValue)
    EMU_CASE(cudaErrorMemoryAllocation)
    EMU_CASE(cudaErrorInitializationError)
    EMU_CASE(cudaErrorInvalidConfiguration)
    EMU_CASE(cudaErrorInvalidDevicePointer)
    EMU_CASE(cudaErrorInvalidMemcpyDirection)
    EMU_CASE(cudaErrorInsufficientDriver)
    EMU_CASE(cudaErrorNoDevice)
    EMU_CASE(cudaErrorInvalidDevice)
    EMU_CASE(cudaErrorInvalidResourceHandle)
    EMU_CASE(cudaErrorIllegalState)
    EMU_CASE(cudaErrorNotReady)
    EMU_CASE(cudaErrorIllegalAddress)
    EMU_CASE(cudaErrorLaunchFailure)
    EMU_CASE(cudaErrorStreamCaptureUnsupported)
    EMU_CASE(cudaErrorStreamCaptureInvalidated)
    EMU_CASE(cudaErrorStreamCaptureUnmatched)
    EMU_CASE(cudaErrorStreamCaptureImplicit)
    EMU_CASE(cudaErrorStreamCaptureWrongThread)
    EMU_CASE(cudaErrorUnknown)
#undef EMU_CASE
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorUnknown: return "unknown error";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalState: return "operation not permitted when stream is capturing";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureImplicit: return "operation would make the legacy stream depend on a capturing blocking stream";
    default: return cudaGetErrorName(e);
  }
}

cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  EMU_API_LOCK;
  if (p == nullptr) return ret(cudaErrorInvalidValue);
  *p = nullptr;
  if (capture_forbids("cudaMalloc")) return ret(cudaErrorStreamCaptureUnsupported);
  if (bytes == 0) return cudaSuccess;
  void* q = nullptr;
  // Exact size (no rounding up), so an AddressSanitizer build sees overruns by kernels; under
  // EMU_COUNT whole pages of their own, which the counter protects around each launch.
  if (count_mode()) {
    if ((q = count_alloc(bytes)) == nullptr) return ret(cudaErrorMemoryAllocation);
  } else if (posix_memalign(&q, 256, bytes) != 0) {
    return ret(cudaErrorMemoryAllocation);
  }
  // cudaMalloc memory is uninitialised: NaN bytes make a read-before-write visible.
  std::memset(q, config().poison ? 0xff : 0, bytes);
  g_allocs[reinterpret_cast<std::uintptr_t>(q)] = bytes;
  *p = q;
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  EMU_API_LOCK;
  if (p == nullptr) return cudaSuccess;
  if (capture_forbids("cudaFree")) return ret(cudaErrorStreamCaptureUnsupported);
  auto it = g_allocs.find(reinterpret_cast<std::uintptr_t>(p));
  if (it == g_allocs.end()) {
    warn("cudaFree(%p): not a live cudaMalloc allocation", p);
    return ret(cudaErrorInvalidValue);
  }
  g_allocs.erase(it);
  if (count_mode())
    count_free(p);
  else
    std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** p, std::size_t bytes) {
  *p = std::malloc(bytes == 0 ? 1 : bytes);
  return *p ? cudaSuccess : ret(cudaErrorMemoryAllocation);
}
cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}

namespace {
cudaError_t check_copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                       const char* who) {
  const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind == cudaMemcpyDefault) return cudaSuccess;
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return cudaErrorInvalidMemcpyDirection;
  if (dst_dev && !device_range(dst, bytes)) {
    warn("%s: destination %p (+%zu bytes) is not inside a device allocation", who, dst, bytes);
    return cudaErrorInvalidValue;
  }
  if (src_dev && !device_range(src, bytes)) {
    warn("%s: source %p (+%zu bytes) is not inside a device allocation", who, src, bytes);
    return cudaErrorInvalidValue;
  }
  if (!dst_dev && device_pointer(dst) && kind != cudaMemcpyHostToHost)
    warn("%s: destination %p is device memory but the kind says host", who, dst);
  if (!src_dev && device_pointer(src) && kind != cudaMemcpyHostToHost)
    warn("%s: source %p is device memory but the kind says host", who, src);
  return cudaSuccess;
}

// "cudaMemcpy HtoD" etc. for EMU_COUNT (cudaMemcpyDefault: the direction the pointers say).
std::string copy_name(const char* api, const void* dst, const void* src, cudaMemcpyKind kind) {
  bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind == cudaMemcpyDefault) {
    dst_dev = device_pointer(dst);
    src_dev = device_pointer(src);
  }
  return std::string(api) + " " + (src_dev ? "D" : "H") + "to" + (dst_dev ? "D" : "H");
}
}  // namespace

cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  EMU_API_LOCK;
  if (bytes == 0) return cudaSuccess;
  if (capture_forbids("cudaMemcpy (synchronous)")) return ret(cudaErrorStreamCaptureUnsupported);
  if (g_sticky != cudaSuccess) return ret(g_sticky);
  if (const cudaError_t e = check_copy(dst, src, bytes, kind, "cudaMemcpy"); e != cudaSuccess)
    return ret(e);
  count_copy(copy_name("cudaMemcpy", dst, src, kind), bytes);
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  EMU_API_LOCK;
  if (bytes == 0) return cudaSuccess;
  if (const cudaError_t e = check_copy(dst, src, bytes, kind, "cudaMemcpyAsync"); e != cudaSuccess)
    return ret(e);
  return enqueue(stream, [dst, src, bytes, what = copy_name("cudaMemcpyAsync", dst, src, kind)] {
    count_copy(what, bytes);
    std::memmove(dst, src, bytes);
  }, false);
}

cudaError_t cudaMemset(void* p, int value, std::size_t bytes) {
  EMU_API_LOCK;
  if (bytes == 0) return cudaSuccess;
  if (capture_forbids("cudaMemset (synchronous)")) return ret(cudaErrorStreamCaptureUnsupported);
  if (g_sticky != cudaSuccess) return ret(g_sticky);
  if (!device_range(p, bytes)) {
    warn("cudaMemset: %p (+%zu bytes) is not inside a device allocation", p, bytes);
    return ret(cudaErrorInvalidValue);
  }
  count_copy("cudaMemset", bytes);
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t stream) {
  EMU_API_LOCK;
  if (bytes == 0) return cudaSuccess;
  if (!device_range(p, bytes)) {
    warn("cudaMemsetAsync: %p (+%zu bytes) is not inside a device allocation", p, bytes);
    return ret(cudaErrorInvalidValue);
  }
  return enqueue(stream, [p, value, bytes] {
    count_copy("cudaMemsetAsync", bytes);
    std::memset(p, value, bytes);
  }, false);
}

cudaError_t cudaDeviceSynchronize() {
  EMU_API_LOCK;
  if (capture_forbids("cudaDeviceSynchronize")) return ret(cudaErrorStreamCaptureUnsupported);
  return g_sticky != cudaSuccess ? ret(g_sticky) : cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* s) {
  return cudaStreamCreateWithFlags(s, cudaStreamDefault);
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  EMU_API_LOCK;
  auto* st = new Stream;
  st->flags = flags;
  g_streams.insert(st);
  *s = st;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  EMU_API_LOCK;
  if (s == nullptr || !g_streams.count(s)) return ret(cudaErrorInvalidResourceHandle);
  if (s->capturing) warn("cudaStreamDestroy of a stream that is still capturing");
  g_streams.erase(s);
  delete s->graph;
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  EMU_API_LOCK;
  if (!valid_stream(s)) return ret(cudaErrorInvalidResourceHandle);
  Stream* st = resolve(s);
  if (st->capturing) {
    st->invalidated = true;
    warn("cudaStreamSynchronize on a capturing stream: cudaErrorStreamCaptureUnsupported");
    return ret(cudaErrorStreamCaptureUnsupported);
  }
  if (s == nullptr && capture_forbids("cudaStreamSynchronize(legacy stream)"))
    return ret(cudaErrorStreamCaptureUnsupported);
  return g_sticky != cudaSuccess ? ret(g_sticky) : cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t s) {
  EMU_API_LOCK;
  if (!valid_stream(s)) return ret(cudaErrorInvalidResourceHandle);
  if (resolve(s)->capturing) {
    resolve(s)->invalidated = true;
    return ret(cudaErrorStreamCaptureUnsupported);
  }
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
  EMU_API_LOCK;
  if (!valid_stream(s) || !g_events.count(e)) return ret(cudaErrorInvalidResourceHandle);
  return cudaSuccess;  // everything already ran in order
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
  EMU_API_LOCK;
  if (s == nullptr) return ret(cudaErrorStreamCaptureUnsupported);  // not the legacy stream
  if (!g_streams.count(s)) return ret(cudaErrorInvalidResourceHandle);
  if (s->capturing) return ret(cudaErrorIllegalState);
  s->capturing = true;
  s->invalidated = false;
  s->mode = mode;
  s->capture_thread = std::this_thread::get_id();
  s->graph = new Graph;
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph) {
  EMU_API_LOCK;
  if (graph == nullptr) return ret(cudaErrorInvalidValue);
  *graph = nullptr;
  if (s == nullptr || !g_streams.count(s)) return ret(cudaErrorInvalidResourceHandle);
  if (!s->capturing) return ret(cudaErrorIllegalState);
  if (s->capture_thread != std::this_thread::get_id() && s->mode != cudaStreamCaptureModeRelaxed)
    return ret(cudaErrorStreamCaptureWrongThread);
  s->capturing = false;
  Graph* g = s->graph;
  s->graph = nullptr;
  // EMU_FAKE_CAPTURE_ERROR (non-empty): every capture ends invalidated, as a capture that met an
  // unsupported call does on a GPU, so callers' fallbacks to eager work can be tested.
  if (const char* fake = std::getenv("EMU_FAKE_CAPTURE_ERROR"); fake != nullptr && *fake != 0)
    s->invalidated = true;
  if (s->invalidated) {
    s->invalidated = false;
    delete g;
    return ret(cudaErrorStreamCaptureInvalidated);
  }
  g_graphs.insert(g);
  *graph = g;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
  EMU_API_LOCK;
  if (status == nullptr) return ret(cudaErrorInvalidValue);
  if (!valid_stream(s)) return ret(cudaErrorInvalidResourceHandle);
  const Stream* st = resolve(s);
  *status = !st->capturing      ? cudaStreamCaptureStatusNone
            : st->invalidated ? cudaStreamCaptureStatusInvalidated
                              : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  EMU_API_LOCK;
  if (exec == nullptr || graph == nullptr || !g_graphs.count(graph)) return ret(cudaErrorInvalidValue);
  if (capture_forbids("cudaGraphInstantiate")) return ret(cudaErrorStreamCaptureUnsupported);
  auto* x = new GraphExec;
  x->ops = graph->ops;  // the closures are shared and immutable: a copy of the graph
  g_execs.insert(x);
  *exec = x;
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
  EMU_API_LOCK;
  if (exec == nullptr || !g_execs.count(exec)) return ret(cudaErrorInvalidValue);
  count_submit(true);
  g_replaying = true;
  for (const auto& op : exec->ops) {
    const cudaError_t e = enqueue(s, op, false);
    if (e != cudaSuccess) {
      g_replaying = false;
      return ret(e);
    }
  }
  g_replaying = false;
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  EMU_API_LOCK;
  if (g == nullptr || !g_graphs.erase(g)) return ret(cudaErrorInvalidValue);
  delete g;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t g) {
  EMU_API_LOCK;
  if (g == nullptr || !g_execs.erase(g)) return ret(cudaErrorInvalidValue);
  delete g;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) {
  return cudaEventCreateWithFlags(e, cudaEventDefault);
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  EMU_API_LOCK;
  auto* ev = new Event;
  ev->timing = !(flags & cudaEventDisableTiming);
  g_events.insert(ev);
  *e = ev;
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  EMU_API_LOCK;
  if (!g_events.erase(e)) return ret(cudaErrorInvalidResourceHandle);
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  EMU_API_LOCK;
  if (!g_events.count(e)) return ret(cudaErrorInvalidResourceHandle);
  if (valid_stream(s) && resolve(s)->capturing) e->captured = true;
  return enqueue(s, [e] {
    e->recorded = true;
    e->captured = false;
    e->t_ms = now_ms();
  }, false);
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  EMU_API_LOCK;
  if (!g_events.count(e)) return ret(cudaErrorInvalidResourceHandle);
  if (capture_forbids("cudaEventSynchronize")) return ret(cudaErrorStreamCaptureUnsupported);
  return g_sticky != cudaSuccess ? ret(g_sticky) : cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
  EMU_API_LOCK;
  if (!g_events.count(e)) return ret(cudaErrorInvalidResourceHandle);
  return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  EMU_API_LOCK;
  if (ms == nullptr) return ret(cudaErrorInvalidValue);
  if (!g_events.count(a) || !g_events.count(b)) return ret(cudaErrorInvalidResourceHandle);
  if (!a->timing || !b->timing) return ret(cudaErrorInvalidResourceHandle);
  if (!a->recorded || !b->recorded) return ret(cudaErrorInvalidResourceHandle);
  *ms = static_cast<float>(b->t_ms - a->t_ms);
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute_impl(const void* func, cudaFuncAttribute attr, int value) {
  EMU_API_LOCK;
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return ret(cudaErrorInvalidValue);
    g_max_dyn_smem[func] = value;
  }
  return cudaSuccess;
}

// The range CUDA's profilers capture (nsys --capture-range=cudaProfilerApi, ncu
// --profile-from-start off), and EMU_COUNT's counting window.
cudaError_t cudaProfilerStart() {
  EMU_API_LOCK;
  count_window(true);
  return cudaSuccess;
}
cudaError_t cudaProfilerStop() {
  EMU_API_LOCK;
  count_window(false);
  return cudaSuccess;
}
