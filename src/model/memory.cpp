#include "pion/model/memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <limits>

#include "pion/core/error.h"

namespace pion {

namespace {

constexpr std::uint64_t kUnlimited = std::numeric_limits<std::uint64_t>::max();

// Sizes are computed in double (exact up to 2^53 elements, and no overflow for the largest
// shapes the config bounds allow, whose attention scores alone reach 2^66 elements), then
// saturated to uint64.
std::uint64_t to_bytes(double elements, double element_bytes) {
  const double bytes = elements * element_bytes;
  if (!(bytes < 1.8e19)) return kUnlimited;
  return static_cast<std::uint64_t>(bytes);
}

std::uint64_t add(std::uint64_t a, std::uint64_t b) {
  return a > kUnlimited - b ? kUnlimited : a + b;
}

std::string gib(std::uint64_t bytes) {
  char buf[64];
  const double g = static_cast<double>(bytes) / static_cast<double>(1ULL << 30);
  if (g < 1.0) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
    return buf;
  }
  if (g >= 1e6)
    std::snprintf(buf, sizeof buf, "%.3g GiB", g);
  else
    std::snprintf(buf, sizeof buf, "%.1f GiB", g);
  return buf;
}

}  // namespace

MemoryEstimate estimate_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                               bool training, int element_bytes, std::int64_t optimizer_bytes) {
  const double eb = element_bytes;
  const double params = static_cast<double>(config.num_params());
  MemoryEstimate e;
  // Llama allocates the parameter and the gradient buffer together, whatever it is used for.
  e.weights = to_bytes(params, eb);
  e.grads = to_bytes(params, eb);
  // AdamW keeps two moments per parameter; Muon keeps one. Pion's state depends on the variant
  // and the shapes (up to 2 (m^2 + n^2) per [m, n] matrix), so its callers pass it in.
  if (training)
    e.optimizer = optimizer_bytes >= 0 ? static_cast<std::uint64_t>(optimizer_bytes)
                                       : to_bytes(2 * params, 4);

  // The buffers of Llama<T>::ensure_buffers (src/model/llama.cpp), allocated on the first
  // forward() of a (rows, seq) shape.
  const double n = static_cast<double>(rows) * static_cast<double>(seq);
  const double d = config.d_model, f = config.ffn_size(), v = config.vocab_size;
  const double h = config.n_head, layers = config.n_layer;
  const double qkv = d + 2.0 * config.kv_dim();  // a fused q | k | v row (3 d without GQA)
  const double probs = static_cast<double>(rows) * h * static_cast<double>(seq) *
                       static_cast<double>(seq);  // B x H x T x T attention probabilities
  // x_in, h1, att, x_mid, h2 [N, d], qkv [N, d + 2 kv], two rstd [N], gu and act [N, 3 f].
  const double per_layer = 5 * n * d + n * qkv + 2 * n + probs + 3 * n * f;
  const double tail = 3 * n * d + 2 * n + n * v;  // final norm, logits [B, T, V], lse, scratch
  // dres, dh, dproj, datt [N, d], dqkv, dgu + dact, dlogits, attention scratch: one layer.
  const double grad_scratch = 4 * n * d + n * qkv + 3 * n * f + n * v + probs;
  double elements = layers * per_layer + tail + grad_scratch;
  // The token ids and targets of the batch (int32), as the model keeps its own copy.
  elements += 2 * n;
  e.activations = to_bytes(elements, eb);
  if (config.dropout > 0.0) e.activations = add(e.activations, to_bytes(2 * layers * n * d, 1));
  return e;
}

MemoryLimit process_memory_limit() {
  MemoryLimit limit{kUnlimited, "no limit"};
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page_size > 0) {
    limit.bytes = static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page_size);
    limit.source = "physical memory";
  }
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
      static_cast<std::uint64_t>(rl.rlim_cur) < limit.bytes) {
    limit.bytes = static_cast<std::uint64_t>(rl.rlim_cur);
    limit.source = "RLIMIT_AS, the address-space limit (ulimit -v)";
  }
  return limit;
}

namespace {
void check_estimate(const MemoryEstimate& e, std::int64_t rows, std::int64_t seq, bool training,
                    const std::string& what, const MemoryLimit& limit) {
  if (e.total() <= limit.bytes) return;
  const std::uint64_t model = add(add(e.weights, e.grads), e.optimizer);
  const std::string parts =
      training ? gib(add(e.weights, e.grads)) + " of weights and gradients and " +
                     gib(e.optimizer) + " of optimizer state"
               : gib(model) + " of weights and gradients";
  throw Error(what + ": batch_size " + std::to_string(rows) + " x seq_len " + std::to_string(seq) +
              " needs about " + gib(e.activations) + " for activations (" + gib(e.total()) +
              " in all with the model's " + parts + "); this process may use " +
              gib(limit.bytes) + " (" + limit.source + "); lower batch_size or seq_len" +
              (training ? ", or use an optimizer with less state (README: memory per optimizer)"
                        : ""));
}
}  // namespace

void check_batch_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                        bool training, const std::string& what, const MemoryLimit& limit) {
  check_estimate(estimate_memory(config, rows, seq, training), rows, seq, training, what, limit);
}

void check_training_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                           std::uint64_t optimizer_bytes, const std::string& what,
                           const MemoryLimit& limit) {
  const auto bytes = static_cast<std::int64_t>(
      std::min<std::uint64_t>(optimizer_bytes, std::numeric_limits<std::int64_t>::max()));
  check_estimate(estimate_memory(config, rows, seq, true, 4, bytes), rows, seq, true, what,
                 limit);
}

void check_training_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                           std::uint64_t optimizer_bytes, const std::string& what) {
  check_training_memory(config, rows, seq, optimizer_bytes, what, process_memory_limit());
}

void check_batch_memory(const ModelConfig& config, std::int64_t rows, std::int64_t seq,
                        bool training, const std::string& what) {
  check_batch_memory(config, rows, seq, training, what, process_memory_limit());
}

}  // namespace pion
