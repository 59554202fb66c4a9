// libFuzzer target: the finetuning JSONL reader (pion::parse_finetune_jsonl, which
// load_finetune_jsonl calls on a file's bytes). pion::Error is the expected answer to bad
// input; anything else (another exception, a sanitizer report, a leak, a hang) is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "pion/core/error.h"
#include "pion/data/finetune.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto examples = pion::parse_finetune_jsonl(text, "fuzz.jsonl");
    (void)pion::finetune_text(examples);
  } catch (const pion::Error&) {
  }
  return 0;
}
