#pragma once
// The built-in default corpus: the plain-text fortune files of Debian's `fortunes` package
// (/usr/share/games/fortunes; about 2.5 million characters), so `pion train` works with no
// data of its own. Files are read in name order; *.dat and *.u8 files, symbolic links and
// directories are skipped. Each file is a list of fortunes separated by lines holding a
// single '%'; in the corpus every fortune is followed by one blank line. Terminal
// overstriking ("_\bX", "X\bX": underline and bold for old printers) is resolved to the
// character that shows (a backspace deletes the character before it), and other control
// characters except tab and newline (e.g. the bell in "^G") are dropped.
#include <cstddef>
#include <string>

namespace pion {

inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";

// The corpus text. Errors: no fortune files in `fortunes_dir` (the message says to
// `apt-get install fortunes`), or a file that is not valid UTF-8.
std::string default_corpus_text(const std::string& fortunes_dir = kFortunesDir);
// Writes the corpus to `path` atomically and returns its length in characters (code points).
std::size_t build_default_corpus(const std::string& path,
                                 const std::string& fortunes_dir = kFortunesDir);

}  // namespace pion
