#pragma once
// A verifiable finetuning task: multi-digit addition. Prompt "12+345=", response "357" (the
// finetuning batcher appends the end marker "\n"). Answers can be checked by recomputing
// them from the prompt, which is what an RLVR reward needs.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "pion/data/finetune.h"

namespace pion {

// n examples; each operand independently gets a digit count uniform in [min_digits,
// max_digits] and no leading zero (one-digit operands are 0..9). Deterministic in `seed`.
// Errors: n < 1, min_digits < 1, min_digits > max_digits, max_digits > 1000.
std::vector<FinetuneExample> arithmetic_examples(std::int64_t n, std::uint64_t seed, int min_digits,
                                                 int max_digits);
// The same examples written as JSONL (write_finetune_jsonl).
void generate_arithmetic(const std::string& path, std::int64_t n, std::uint64_t seed,
                         int min_digits, int max_digits);

// Harder tasks (headroom for RL): operators drawn uniformly from `ops` (a non-empty set of
// '+', '-', '*'). Subtraction orders its operands so the answer is never negative ("52-17=");
// multiplication answers are up to twice as long. With ops "+" the examples are exactly the
// ones above (no operator is drawn).
struct ArithmeticOptions {
  int min_digits = 1;
  int max_digits = 3;
  std::string ops = "+";
};
std::vector<FinetuneExample> arithmetic_examples(std::int64_t n, std::uint64_t seed,
                                                 const ArithmeticOptions& options);

// Difference a - b (a >= b) and product of non-negative decimal digit strings.
std::string sub_decimal(std::string_view a, std::string_view b);
std::string mul_decimal(std::string_view a, std::string_view b);

// Sum of two non-negative decimal numbers given as digit strings (any length).
std::string add_decimal(std::string_view a, std::string_view b);
// Parses a prompt "a+b=" and returns the correct response; errors on any other form.
std::string arithmetic_answer(std::string_view prompt);
// The same for "a+b=", "a-b=" (a >= b) and "a*b=" (the harder tasks).
std::string arithmetic_expression_answer(std::string_view prompt);
// 1.0 when `completion` is the exact answer followed by the end marker, else 0.0.
double arithmetic_reward(std::string_view prompt, std::string_view completion,
                         std::string_view end_marker = kDefaultEndMarker);

}  // namespace pion
