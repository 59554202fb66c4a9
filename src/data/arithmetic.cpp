#include "pion/data/arithmetic.h"

#include <algorithm>

#include "pion/core/error.h"
#include "pion/core/random.h"

namespace pion {

namespace {

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

std::string random_number(Rng& rng, int digits) {
  if (digits == 1) return std::string(1, static_cast<char>('0' + rng.below(10)));
  std::string s(1, static_cast<char>('1' + rng.below(9)));
  for (int i = 1; i < digits; ++i) s.push_back(static_cast<char>('0' + rng.below(10)));
  return s;
}

}  // namespace

std::string add_decimal(std::string_view a, std::string_view b) {
  check(all_digits(a) && all_digits(b),
        "add_decimal: operands must be non-empty digit strings, got '" + std::string(a) +
            "' and '" + std::string(b) + "'");
  std::string out;
  int carry = 0;
  for (std::size_t i = 0; i < std::max(a.size(), b.size()) || carry; ++i) {
    int sum = carry;
    if (i < a.size()) sum += a[a.size() - 1 - i] - '0';
    if (i < b.size()) sum += b[b.size() - 1 - i] - '0';
    out.push_back(static_cast<char>('0' + sum % 10));
    carry = sum / 10;
  }
  while (out.size() > 1 && out.back() == '0') out.pop_back();  // "007" + "0" -> "7"
  std::reverse(out.begin(), out.end());
  return out;
}

namespace {
// Strips leading zeros ("007" -> "7", "000" -> "0").
std::string strip_zeros(std::string s) {
  const std::size_t first = s.find_first_not_of('0');
  return first == std::string::npos ? "0" : s.substr(first);
}

// a < b as numbers (digit strings without leading zeros).
bool less_decimal(std::string_view a, std::string_view b) {
  return a.size() != b.size() ? a.size() < b.size() : a < b;
}
}  // namespace

std::string sub_decimal(std::string_view a, std::string_view b) {
  check(all_digits(a) && all_digits(b), "sub_decimal: operands must be digit strings");
  const std::string x = strip_zeros(std::string(a)), y = strip_zeros(std::string(b));
  check(!less_decimal(x, y), "sub_decimal: " + x + " < " + y);
  std::string out;
  int borrow = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    int d = (x[x.size() - 1 - i] - '0') - borrow - (i < y.size() ? y[y.size() - 1 - i] - '0' : 0);
    borrow = d < 0 ? 1 : 0;
    out.push_back(static_cast<char>('0' + d + 10 * borrow));
  }
  std::reverse(out.begin(), out.end());
  return strip_zeros(out);
}

std::string mul_decimal(std::string_view a, std::string_view b) {
  check(all_digits(a) && all_digits(b), "mul_decimal: operands must be digit strings");
  std::vector<int> acc(a.size() + b.size(), 0);
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t j = 0; j < b.size(); ++j)
      acc[i + j + 1] += (a[i] - '0') * (b[j] - '0');
  for (std::size_t k = acc.size(); k-- > 1;) {
    acc[k - 1] += acc[k] / 10;
    acc[k] %= 10;
  }
  std::string out;
  for (int d : acc) out.push_back(static_cast<char>('0' + d));
  return strip_zeros(out);
}

std::vector<FinetuneExample> arithmetic_examples(std::int64_t n, std::uint64_t seed,
                                                 const ArithmeticOptions& options) {
  check(!options.ops.empty() && options.ops.find_first_not_of("+-*") == std::string::npos,
        "arithmetic: operators must be a non-empty set of + - *, got '" + options.ops + "'");
  if (options.ops == "+")
    return arithmetic_examples(n, seed, options.min_digits, options.max_digits);
  check(n >= 1, "arithmetic: the number of examples must be >= 1, got " + std::to_string(n));
  check(options.min_digits >= 1 && options.min_digits <= options.max_digits &&
            options.max_digits <= 1000,
        "arithmetic: need 1 <= min_digits <= max_digits <= 1000");
  Rng rng(seed);
  const auto span = static_cast<std::uint64_t>(options.max_digits - options.min_digits + 1);
  std::vector<FinetuneExample> out;
  for (std::int64_t i = 0; i < n; ++i) {
    const char op = options.ops[rng.below(options.ops.size())];
    std::string a = random_number(rng, options.min_digits + static_cast<int>(rng.below(span)));
    std::string b = random_number(rng, options.min_digits + static_cast<int>(rng.below(span)));
    if (op == '-' && less_decimal(a, b)) std::swap(a, b);
    const std::string answer =
        op == '+' ? add_decimal(a, b) : op == '-' ? sub_decimal(a, b) : mul_decimal(a, b);
    out.push_back({a + op + b + "=", answer});
  }
  return out;
}

std::vector<FinetuneExample> arithmetic_examples(std::int64_t n, std::uint64_t seed, int min_digits,
                                                 int max_digits) {
  check(n >= 1, "arithmetic: the number of examples must be >= 1, got " + std::to_string(n));
  check(min_digits >= 1 && min_digits <= max_digits && max_digits <= 1000,
        "arithmetic: need 1 <= min_digits <= max_digits <= 1000, got min_digits " +
            std::to_string(min_digits) + ", max_digits " + std::to_string(max_digits));
  Rng rng(seed);
  const auto span = static_cast<std::uint64_t>(max_digits - min_digits + 1);
  std::vector<FinetuneExample> out;
  out.reserve(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const int da = min_digits + static_cast<int>(rng.below(span));
    const int db = min_digits + static_cast<int>(rng.below(span));
    const std::string a = random_number(rng, da);
    const std::string b = random_number(rng, db);
    out.push_back({a + "+" + b + "=", add_decimal(a, b)});
  }
  return out;
}

void generate_arithmetic(const std::string& path, std::int64_t n, std::uint64_t seed,
                         int min_digits, int max_digits) {
  write_finetune_jsonl(path, arithmetic_examples(n, seed, min_digits, max_digits));
}

std::string arithmetic_answer(std::string_view prompt) {
  const std::size_t plus = prompt.find('+');
  const bool well_formed = plus != std::string_view::npos && !prompt.empty() &&
                           prompt.back() == '=' && all_digits(prompt.substr(0, plus)) &&
                           all_digits(prompt.substr(plus + 1, prompt.size() - plus - 2));
  if (!well_formed) {
    // Built with append: GCC 12 warns falsely (-Wrestrict) on "'" + std::string(...) here.
    std::string message = "'";
    message.append(prompt).append("' is not an addition prompt of the form \"12+345=\"");
    throw Error(message);
  }
  return add_decimal(prompt.substr(0, plus), prompt.substr(plus + 1, prompt.size() - plus - 2));
}

std::string arithmetic_expression_answer(std::string_view prompt) {
  const std::size_t at = prompt.find_first_of("+-*");
  const bool well_formed = at != std::string_view::npos && !prompt.empty() &&
                           prompt.back() == '=' && all_digits(prompt.substr(0, at)) &&
                           all_digits(prompt.substr(at + 1, prompt.size() - at - 2));
  if (!well_formed) {
    std::string message = "'";
    message.append(prompt).append("' is not an arithmetic prompt like \"12+345=\", \"52-17=\" or \"12*34=\"");
    throw Error(message);
  }
  const std::string_view a = prompt.substr(0, at);
  const std::string_view b = prompt.substr(at + 1, prompt.size() - at - 2);
  if (prompt[at] == '-') {
    if (less_decimal(strip_zeros(std::string(a)), strip_zeros(std::string(b)))) {
      std::string message = "'";
      message.append(prompt).append("' has a negative answer");
      throw Error(message);
    }
    return sub_decimal(a, b);
  }
  return prompt[at] == '*' ? mul_decimal(a, b) : add_decimal(a, b);
}

double arithmetic_reward(std::string_view prompt, std::string_view completion,
                         std::string_view end_marker) {
  return exact_match(completion, arithmetic_answer(prompt), end_marker) ? 1.0 : 0.0;
}

}  // namespace pion
