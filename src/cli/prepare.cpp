// `pion prepare`: tokenize a text file into llm.c token shards (train.bin, val.bin) plus the
// tokenizer, in a directory that `pion train --data DIR` reads.
#include <iostream>

#include "cli/commands.h"
#include "cli/validators.h"
#include "pion/data/corpus.h"
#include "pion/data/prepare.h"

namespace pion::cli {

namespace {
struct PrepareArgs {
  std::string input = "fortunes";
  std::string tokenizer = "char";
  int vocab_size = 512;
  double val_fraction = 0.1;
  std::string out;
};
}  // namespace

void add_prepare_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("prepare", "tokenize text into token shards + tokenizer");
  auto args = std::make_shared<PrepareArgs>();
  cmd->add_option("--input", args->input, "UTF-8 text file, or 'fortunes' for the built-in corpus");
  cmd->add_option("--tokenizer", args->tokenizer, "char | byte | bpe")->check(CLI::IsMember({"char", "byte", "bpe"}));
  cmd->add_option("--vocab_size", args->vocab_size, "bpe vocabulary size")
      ->check(FiniteRange(8, 65536))
      ->capture_default_str();
  cmd->add_option("--val_fraction", args->val_fraction, "last fraction of the text for validation")
      ->check(FiniteRange(0, 1, true, true))
      ->capture_default_str();
  cmd->add_option("--out", args->out, "output directory")->required();
  cmd->callback([args] {
    DatasetSummary s = args->input == "fortunes"
                           ? prepare_dataset_from_text(default_corpus_text(), "fortunes", args->tokenizer,
                                                       args->vocab_size, args->out, args->val_fraction)
                           : prepare_dataset(args->input, args->tokenizer, args->vocab_size, args->out,
                                             args->val_fraction);
    std::cout << s.to_json().dump(2) << "\n";
  });
}

}  // namespace pion::cli
