#include "pion/data/corpus.h"

#include <algorithm>
#include <filesystem>
#include <vector>

#include "pion/core/error.h"
#include "pion/data/text_io.h"

namespace pion {

namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<fs::path> fortune_files(const std::string& dir) {
  std::vector<fs::path> files;
  std::error_code ec;
  if (fs::is_directory(dir, ec)) {
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      const std::string name = entry.path().filename().string();
      if (entry.is_symlink(ec) || !entry.is_regular_file(ec)) continue;
      if (ends_with(name, ".dat") || ends_with(name, ".u8") || name.starts_with(".")) continue;
      files.push_back(entry.path());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

// Resolves overstriking and drops control characters other than tab and newline.
std::string clean(std::string_view text) {
  std::vector<char32_t> kept;
  kept.reserve(text.size());
  for (char32_t cp : utf8_code_points(text)) {
    if (cp == 0x08) {
      if (!kept.empty() && kept.back() != '\n') kept.pop_back();
      continue;
    }
    const bool control = cp < 0x20 || cp == 0x7F || (cp >= 0x80 && cp < 0xA0);
    if (control && cp != '\n' && cp != '\t') continue;
    kept.push_back(cp);
  }
  std::string out;
  out.reserve(kept.size());
  for (char32_t cp : kept) append_utf8(out, cp);
  return out;
}

bool blank(std::string_view line) {
  return line.find_first_not_of(" \t") == std::string_view::npos;
}

// Appends each fortune of `text` followed by one blank line, without its leading and
// trailing blank lines.
void append_fortunes(std::string& out, std::string_view text) {
  std::vector<std::string_view> lines;
  const auto flush = [&] {
    auto first = lines.begin();
    auto last = lines.end();
    while (first != last && blank(*first)) ++first;
    while (last != first && blank(*(last - 1))) --last;
    for (auto it = first; it != last; ++it) {
      out += *it;
      out += '\n';
    }
    if (first != last) out += '\n';
    lines.clear();
  };
  std::size_t pos = 0;
  while (pos < text.size()) {
    const std::size_t end = std::min(text.find('\n', pos), text.size());
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line == "%") {
      flush();
    } else {
      lines.push_back(line);
    }
  }
  flush();
}

}  // namespace

std::string default_corpus_text(const std::string& fortunes_dir) {
  const auto files = fortune_files(fortunes_dir);
  if (files.empty()) {
    throw Error("the built-in corpus needs Debian's fortunes package, but '" + fortunes_dir +
                "' has no fortune files; install it with `apt-get install fortunes`, or train on "
                "your own text file instead");
  }
  std::string out;
  for (const auto& file : files) {
    const std::string bytes = read_file_bytes(file.string());
    validate_utf8(bytes, "fortune file '" + file.string() + "'");
    append_fortunes(out, clean(bytes));
  }
  check(!out.empty(), "the fortune files in '" + fortunes_dir + "' hold no text");
  return out;
}

std::size_t build_default_corpus(const std::string& path, const std::string& fortunes_dir) {
  const std::string text = default_corpus_text(fortunes_dir);
  write_file_atomic(path, text);
  return utf8_length(text);
}

}  // namespace pion
