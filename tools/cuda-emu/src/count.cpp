// EMU_COUNT=<path.json>: what the emulated device did, counted from the work that actually
// ran (see ../README.md, "Counting"). Per kernel name: launches, and the device bytes each
// launch read and wrote, measured by page protection (below). Per cuBLAS GEMM shape: calls,
// flops and operand bytes (from the arguments; OpenBLAS does the work on its own threads, so
// its memory accesses cannot be watched). Copies and memsets: calls and bytes.
//
// How a launch is measured: before it runs, every live device allocation is made PROT_NONE
// (allocations are whole mmap'd pages in this mode); the SIGSEGV handler marks the faulting
// page read (and makes it PROT_READ) or written (PROT_READ | PROT_WRITE; the x86-64 page-fault
// error code says which access faulted), and the kernel continues. After the launch the
// touched pages, clipped to each allocation's size, are the launch's read and written bytes,
// and the protections are restored. So every unique page a launch touches counts once,
// however often it is touched: the bytes a GPU must move to or from DRAM for that launch when
// nothing stays in L2 between launches, at 4 KiB granularity. A page whose first access is a
// write counts as written only (a read-modify-write instruction, e.g. a plain `+=` on an int
// compiled to one x86 `add`, faults as a write).
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "emu/cuda_emu.h"
#include "emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_COUNT_ASAN 1
#else
#define EMU_COUNT_ASAN 0
#endif

namespace emu {
namespace {

constexpr std::size_t kPage = 4096;
constexpr unsigned char kRead = 1, kWritten = 2;

std::size_t whole_pages(std::size_t bytes) {
  return (bytes + kPage - 1) / kPage * kPage;
}

struct Region {
  std::uintptr_t base = 0;
  std::size_t bytes = 0;              // as cudaMalloc was asked (counts are clipped to it)
  std::size_t mapped = 0;             // whole pages
  std::vector<unsigned char> state;   // per page, during a launch: kRead | kWritten
};

struct KernelCount {
  long launches = 0;
  unsigned long long read = 0, written = 0;
};

struct GemmCount {
  std::string entry, math;
  int m = 0, n = 0, k = 0, batch = 0;
  long calls = 0;
  double flops = 0;
  unsigned long long read = 0, written = 0;
};

struct CopyCount {
  long calls = 0;
  unsigned long long bytes = 0;
};

void write_json(const char* path);

struct Counter {
  std::string path;               // EMU_COUNT; empty: counting is off
  bool window = false;            // cudaProfilerStart was called: only its ranges count
  bool active = true;             // counting now
  long ranges = 0;
  std::map<std::uintptr_t, Region> regions;  // live device allocations
  std::map<std::string, KernelCount> kernels;
  std::map<std::string, GemmCount> gemms;
  std::map<std::string, CopyCount> copies;
  long host_submits = 0, graph_launches = 0;

  Counter() {
    if (const char* p = std::getenv("EMU_COUNT"); p != nullptr && *p != 0) path = p;
    if (!path.empty() && EMU_COUNT_ASAN)
      fatal("EMU_COUNT needs the plain build: AddressSanitizer owns SIGSEGV and exact-size "
            "allocations, counting needs both");
  }
  // At exit: the totals of the whole run (or of its cudaProfilerStart/Stop ranges).
  ~Counter() {
    if (!path.empty()) write_json(path.c_str());
  }
  void clear() {
    kernels.clear();
    gemms.clear();
    copies.clear();
    host_submits = graph_launches = 0;
  }
};

Counter& counter() {
  static Counter c;
  return c;
}

// ---- the fault handler ---------------------------------------------------------------------
// Touched only by the launching thread and the handler it runs; built before a launch, so
// the handler neither allocates nor locks.
std::vector<Region*> g_armed;                             // sorted by base
std::vector<std::pair<Region*, std::size_t>> g_touched;   // capacity: every armed page
volatile sig_atomic_t g_is_armed = 0;
std::uintptr_t g_out_of_bounds = 0;  // the first fault past an allocation's size (0: none)
struct sigaction g_previous {};
bool g_installed = false;

void die_in_handler(const char* msg) {
  const ssize_t r = write(2, msg, std::strlen(msg));
  (void)r;
  signal(SIGABRT, SIG_DFL);
  abort();
}

void on_fault(int, siginfo_t* si, void* context) {
  const auto a = reinterpret_cast<std::uintptr_t>(si->si_addr);
  Region* r = nullptr;
  if (g_is_armed) {
    auto it = std::upper_bound(g_armed.begin(), g_armed.end(), a,
                               [](std::uintptr_t x, const Region* q) { return x < q->base; });
    if (it != g_armed.begin() && a < (*(it - 1))->base + (*(it - 1))->mapped) r = *(it - 1);
  }
  const bool write =
      (static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;  // W bit
  const std::size_t page = r != nullptr ? (a - r->base) / kPage : 0;
  // Not a watched page, or a fault the page's protection should not give: not ours. Put the
  // previous action back; the access faults again and ends the process as it would have.
  if (r == nullptr || (write ? (r->state[page] & kWritten) != 0 : r->state[page] != 0)) {
    sigaction(SIGSEGV, &g_previous, nullptr);
    return;
  }
  if (a >= r->base + r->bytes && g_out_of_bounds == 0) g_out_of_bounds = a;
  unsigned char& s = r->state[page];
  if (s == 0) g_touched.emplace_back(r, page);  // never reallocates: reserved before the launch
  s |= write ? kWritten : kRead;
  const int prot = (s & kWritten) ? PROT_READ | PROT_WRITE : PROT_READ;
  if (mprotect(reinterpret_cast<void*>(r->base + page * kPage), kPage, prot) != 0)
    die_in_handler(errno == ENOMEM
                       ? "[cuda-emu] FATAL: EMU_COUNT: mprotect failed with ENOMEM (too many "
                         "mappings: vm.max_map_count; a launch touching every other page of a "
                         "large buffer splits it into that many)\n"
                       : "[cuda-emu] FATAL: EMU_COUNT: mprotect failed in the fault handler\n");
}

void install_handler() {
  // The handler runs on its own stack: kernels run on 256 KiB coroutine stacks (runtime.cpp),
  // and a stack overflow must still reach the previous action.
  thread_local bool alt = false;
  if (!alt) {
    stack_t ss{};
    ss.ss_size = 64 * 1024;
    ss.ss_sp = std::malloc(ss.ss_size);  // lives as long as the thread: never freed
    if (ss.ss_sp == nullptr || sigaltstack(&ss, nullptr) != 0) fatal("EMU_COUNT: sigaltstack failed");
    alt = true;
  }
  if (g_installed) return;
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGSEGV, &sa, &g_previous) != 0) fatal("EMU_COUNT: sigaction failed");
  g_installed = true;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

void write_json(const char* path) {
  Counter& c = counter();
  std::FILE* f = std::fopen(path, "w");
  if (f == nullptr) {
    std::fprintf(stderr, "[cuda-emu] EMU_COUNT: cannot write %s\n", path);
    return;
  }
  long launches = 0, gemm_calls = 0, copy_calls = 0;
  unsigned long long kr = 0, kw = 0, gr = 0, gw = 0, copy_bytes = 0;
  double flops = 0;
  for (const auto& [name, k] : c.kernels) {
    launches += k.launches;
    kr += k.read;
    kw += k.written;
  }
  for (const auto& [key, g] : c.gemms) {
    gemm_calls += g.calls;
    flops += g.flops;
    gr += g.read;
    gw += g.written;
  }
  for (const auto& [key, x] : c.copies) {
    copy_calls += x.calls;
    copy_bytes += x.bytes;
  }
  std::fprintf(f, "{\n  \"window\": %s,\n  \"page_bytes\": %zu,\n",
               json_string(c.window ? "cudaProfilerStart/Stop ranges" : "whole run").c_str(), kPage);
  std::fprintf(f, "  \"ranges\": %ld,\n", c.ranges);
  std::fprintf(f,
               "  \"totals\": {\"kernel_launches\": %ld, \"kernel_bytes_read\": %llu, "
               "\"kernel_bytes_written\": %llu, \"gemm_calls\": %ld, \"gemm_flops\": %.0f, "
               "\"gemm_bytes_read\": %llu, \"gemm_bytes_written\": %llu, \"copy_calls\": %ld, "
               "\"copy_bytes\": %llu, \"host_submissions\": %ld, \"graph_launches\": %ld},\n",
               launches, kr, kw, gemm_calls, flops, gr, gw, copy_calls, copy_bytes, c.host_submits,
               c.graph_launches);
  std::fprintf(f, "  \"kernels\": {");
  const char* sep = "\n";
  for (const auto& [name, k] : c.kernels) {
    std::fprintf(f, "%s    %s: {\"launches\": %ld, \"bytes_read\": %llu, \"bytes_written\": %llu}",
                 sep, json_string(name).c_str(), k.launches, k.read, k.written);
    sep = ",\n";
  }
  std::fprintf(f, "\n  },\n  \"gemms\": {");
  sep = "\n";
  for (const auto& [key, g] : c.gemms) {
    std::fprintf(f,
                 "%s    %s: {\"entry\": %s, \"math\": %s, \"m\": %d, \"n\": %d, \"k\": %d, "
                 "\"batch\": %d, \"calls\": %ld, \"flops\": %.0f, \"bytes_read\": %llu, "
                 "\"bytes_written\": %llu}",
                 sep, json_string(key).c_str(), json_string(g.entry).c_str(),
                 json_string(g.math).c_str(), g.m, g.n, g.k, g.batch, g.calls, g.flops, g.read,
                 g.written);
    sep = ",\n";
  }
  std::fprintf(f, "\n  },\n  \"copies\": {");
  sep = "\n";
  for (const auto& [key, x] : c.copies) {
    std::fprintf(f, "%s    %s: {\"calls\": %ld, \"bytes\": %llu}", sep, json_string(key).c_str(),
                 x.calls, x.bytes);
    sep = ",\n";
  }
  std::fprintf(f, "\n  }\n}\n");
  std::fclose(f);
}

const char* type_name(cudaDataType t) {
  return t == CUDA_R_32F ? "f32" : t == CUDA_R_16BF ? "bf16" : t == CUDA_R_64F ? "f64" : "16bit";
}

}  // namespace

bool count_mode() {
  return !counter().path.empty();
}

void* count_alloc(std::size_t bytes) {
  Counter& c = counter();
  const std::size_t mapped = whole_pages(bytes);
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  Region& r = c.regions[reinterpret_cast<std::uintptr_t>(p)];
  r.base = reinterpret_cast<std::uintptr_t>(p);
  r.bytes = bytes;
  r.mapped = mapped;
  r.state.assign(mapped / kPage, 0);
  return p;
}

void count_free(void* p) {
  Counter& c = counter();
  auto it = c.regions.find(reinterpret_cast<std::uintptr_t>(p));
  if (it == c.regions.end()) return;
  munmap(p, it->second.mapped);
  c.regions.erase(it);
}

void count_window(bool start) {
  Counter& c = counter();
  if (c.path.empty()) return;
  if (start) {
    if (!c.window) {  // the first range: what ran before it does not count
      c.clear();
      c.window = true;
      c.active = false;
    }
    if (!c.active) {
      ++c.ranges;
      c.active = true;
    }
  } else {
    if (!c.window) return;  // a stop without a start changes nothing
    c.active = false;
    write_json(c.path.c_str());
  }
}

bool count_kernel_begin() {
  Counter& c = counter();
  if (c.path.empty() || !c.active) return false;
  install_handler();
  g_armed.clear();
  std::size_t pages = 0;
  for (auto& [base, r] : c.regions) {
    g_armed.push_back(&r);
    pages += r.mapped / kPage;
  }
  g_touched.clear();
  g_touched.reserve(pages);
  for (Region* r : g_armed)
    if (mprotect(reinterpret_cast<void*>(r->base), r->mapped, PROT_NONE) != 0)
      fatal("EMU_COUNT: mprotect(PROT_NONE) of a device allocation failed");
  g_is_armed = 1;
  return true;
}

void count_kernel_end(const char* name) {
  Counter& c = counter();
  g_is_armed = 0;
  KernelCount& k = c.kernels[name];
  ++k.launches;
  for (auto& [r, page] : g_touched) {
    const std::size_t begin = page * kPage;
    const std::size_t bytes = begin >= r->bytes ? 0 : std::min(kPage, r->bytes - begin);
    if (r->state[page] & kRead) k.read += bytes;
    if (r->state[page] & kWritten) k.written += bytes;
    r->state[page] = 0;
  }
  g_touched.clear();
  for (Region* r : g_armed)
    if (mprotect(reinterpret_cast<void*>(r->base), r->mapped, PROT_READ | PROT_WRITE) != 0)
      fatal("EMU_COUNT: restoring a device allocation's protection failed");
  g_armed.clear();
  if (g_out_of_bounds != 0) {
    warn("accessed %p, past the end of its device allocation (seen by EMU_COUNT's page "
         "protection): an illegal address on a GPU",
         reinterpret_cast<void*>(g_out_of_bounds));
    g_out_of_bounds = 0;
  }
}

void count_gemm(const char* entry, bool tf32, cudaDataType at, cudaDataType bt, cudaDataType ct,
                int m, int n, int k, int batch, bool reads_c, std::size_t extra_read) {
  Counter& c = counter();
  if (c.path.empty() || !c.active) return;
  const char* math = at == CUDA_R_16BF ? "bf16" : tf32 ? "tf32" : "fp32";
  char key[256];
  std::snprintf(key, sizeof key, "%s %s*%s->%s%s m=%d n=%d k=%d batch=%d%s", entry, type_name(at),
                type_name(bt), type_name(ct), tf32 ? " tf32" : "", m, n, k, batch,
                reads_c ? " beta!=0" : "");
  GemmCount& g = c.gemms[key];
  g.entry = entry;
  g.math = math;
  g.m = m;
  g.n = n;
  g.k = k;
  g.batch = batch;
  ++g.calls;
  const double mn = static_cast<double>(m) * n, b = batch;
  g.flops += 2.0 * mn * k * b;
  const auto size = [](cudaDataType t) -> unsigned long long {
    return t == CUDA_R_32F ? 4 : t == CUDA_R_64F ? 8 : 2;
  };
  const auto elems = [](int r, int q) {
    return static_cast<unsigned long long>(r) * static_cast<unsigned long long>(q);
  };
  const unsigned long long per = elems(m, k) * size(at) + elems(k, n) * size(bt) +
                                 (reads_c ? elems(m, n) * size(ct) : 0);
  g.read += per * static_cast<unsigned long long>(batch) + extra_read;
  g.written += elems(m, n) * size(ct) * static_cast<unsigned long long>(batch);
}

void count_submit(bool graph_launch) {
  Counter& c = counter();
  if (c.path.empty() || !c.active) return;
  ++(graph_launch ? c.graph_launches : c.host_submits);
}

void count_copy(const std::string& what, std::size_t bytes) {
  Counter& c = counter();
  if (c.path.empty() || !c.active) return;
  CopyCount& x = c.copies[what];
  ++x.calls;
  x.bytes += bytes;
}

}  // namespace emu
