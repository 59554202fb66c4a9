#include "helpers.h"

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sys/wait.h>
#include <unistd.h>

#include "pion/core/random.h"
#ifdef PION_HAVE_CUDA
#include "pion/cuda/runtime.h"
#endif

namespace pion::test {

Tensor random_tensor(const Shape& shape, std::uint64_t seed, double std, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype);
  Rng rng(seed);
  fill_normal(t, rng, 0.0, std);
  return t;
}

std::vector<std::int32_t> random_ids(std::size_t n, int vocab, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
  return t;
}

ModelConfig tiny_model_config() {
  return {
      .vocab_size = 13, .n_layer = 2, .n_head = 2, .d_model = 16, .seq_len = 7, .init_std = 0.2};
}

std::string temp_dir(const std::string& tag) {
  static std::atomic<int> counter{0};
  auto dir = std::filesystem::temp_directory_path() /
             ("pion_test_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

CommandResult run_command(const std::string& command) {
  CommandResult r;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf{};
  std::size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

bool single_error_line(const std::string& output) {
  const auto at = output.find("pion: error:");
  return at != std::string::npos && (at == 0 || output[at - 1] == '\n') &&
         output.find("pion: error:", at + 12) == std::string::npos &&
         output.find('\n', at) == output.size() - 1;
}

CommandResult run_pion(const std::string& args) { return run_command(std::string(PION_BINARY) + " " + args); }

std::string tiny_train_flags(const std::string& data, const std::string& out,
                             const std::string& optimizer) {
  return "--data " + data + " --out_dir " + out + " --optimizer " + optimizer +
         " --n_layer 2 --n_head 2 --d_model 32 --seq_len 16 --batch_size 4 --max_iters 12"
         " --warmup_iters 3 --eval_interval 6 --eval_iters 2 --log_interval 4 --threads 1"
         " --matrix_lr 0.02 --lr 0.003 --dropout 0.1";
}

bool python_has(const std::string& modules) {
  std::string imports;
  std::string m;
  for (char c : modules + " ") {
    if (c == ' ') {
      if (!m.empty()) imports += "import " + m + ";";
      m.clear();
    } else {
      m += c;
    }
  }
  return run_command(python() + " -c '" + imports + "'").exit_code == 0;
}

bool cuda_device_present() {
#ifdef PION_HAVE_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

std::string source_dir() { return PION_SOURCE_DIR; }

std::string shared_data_path(const std::string& name) {
  return source_dir() + "/../shared/data/" + name;
}

std::string fallback_corpus(std::size_t bytes) {
  static const char* const kSentences[] = {
      "The quick brown fox jumps over the lazy dog.",
      "THE FIVE BOXING WIZARDS JUMP QUICKLY!",
      "Pack my box with five dozen liquor jugs?",
      "Sphinx of black quartz, judge my vow; 'tis all I ask.",
      "ROMEO: Then, the night is young (and so are we) -- come away.",
      "JULIET: \"What's in a name?\" That which we call a rose...",
      "Jackdaws love my big sphinx of quartz: 100% true, said Val & Max.",
      "The cost was $3.50 + tax = $4.20 [approx.] at 9:45 on 2024-06-01.",
      "Email <someone@example.com> or see {the notes} at /usr/share/doc | ~/readme.",
      "A back\\slash, a caret ^, a backtick `, an underscore _ and a hash #.",
      "They said: 'The end is near'; we said: \"The end is far\".",
      "Zebras quietly vex the jumping fog; Kings wax bold.",
  };
  constexpr std::size_t kCount = sizeof(kSentences) / sizeof(kSentences[0]);
  std::string text;
  // Every printable ASCII character at least once, whatever the sentences hold.
  for (char c = ' '; c <= '~'; ++c) text += c;
  text += "\n";
  std::uint64_t state = 0x2545f4914f6cdd1dULL;
  auto next = [&] {  // xorshift64: a fixed, dependency-free sequence
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  for (int i = 0; text.size() < bytes / 2; ++i) {
    text += kSentences[next() % kCount];
    text += (i % 4 == 3) ? "\n\n" : " ";
  }
  for (int i = 0; text.size() < bytes; ++i)
    text += std::to_string(i * 7 % 1000) + "+" + std::to_string(i % 97) + "=" +
            std::to_string(i * 7 % 1000 + i % 97) + "\n";
  return text;
}
// $PION_PYTHON overrides the build's choice (e.g. a GPU machine whose numpy and torch live in
// another Python than Debian's).
std::string python() {
  const char* env = std::getenv("PION_PYTHON");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(PION_PYTHON);
}

}  // namespace pion::test
