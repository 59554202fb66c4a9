// `pion train`: pretrain a LLaMA-style model on text with AdamW, Muon or Pion.
#include <filesystem>
#include <iostream>

#include "cli/commands.h"
#include "cli/config_flags.h"
#include "cli/run_on_device.h"
#include "cli/validators.h"
#include "pion/core/error.h"
#include "pion/core/input.h"
#include "pion/core/random.h"
#include "pion/dist/communicator.h"
#include "pion/model/init.h"
#include "pion/model/memory.h"
#include "pion/train/session.h"

namespace pion::cli {

namespace {

void print_spectrum_summary(Llama<float>& model) {
  auto spectra = hidden_spectra(model.named_params());
  if (spectra.empty()) return;
  double lo = spectra[0].sigma_min, hi = spectra[0].sigma_max;
  for (const auto& s : spectra) {
    lo = std::min(lo, s.sigma_min);
    hi = std::max(hi, s.sigma_max);
  }
  std::cout << "hidden-matrix spectrum at init: " << spectra.size()
            << " matrices, singular values in [" << lo << ", " << hi << "]\n";
}

void run_train(const ConfigFlags& flags, bool resume, int stop_after, double collective_timeout) {
  TrainConfig config;
  apply_config_flags(flags, config);
  if (resume) {
    // The run's own config.json is the base; flags may extend it (e.g. a larger max_iters).
    const std::string saved = config.out_dir + "/config.json";
    if (std::filesystem::exists(saved)) {
      TrainConfig from_run;
      apply_config_json(from_run, read_json_file(saved));
      apply_config_flags(flags, from_run);
      config = from_run;
    }
  }
  config.validate();
  require_device(config);
  // A text file given as data must be a regular file: a device such as /dev/zero or a FIFO is
  // refused by name here, before anything is prepared or read.
  if (config.data != "fortunes" && std::filesystem::exists(config.data) &&
      !std::filesystem::is_directory(config.data))
    input::regular_file_size(config.data, "data");
  // Checked before the dataset is prepared, so a mistyped out_dir fails at once.
  const std::string checkpoint = config.out_dir + "/checkpoint.safetensors";
  check(!resume || std::filesystem::exists(checkpoint),
        "--resume: no checkpoint at '" + checkpoint +
            "'; start without --resume or point out_dir at a run");
  // Under mpirun, rank 0 prepares the dataset and copies the tokenizer; the others wait and
  // then find it prepared (no two processes write the same files).
  dist::Communicator& comm = dist::world();
  DatasetSummary data;
  const std::string tokenizer_copy = config.out_dir + "/tokenizer.json";
  if (comm.is_root()) {
    data = resolve_dataset(config);
    std::filesystem::create_directories(config.out_dir);
    if (!std::filesystem::exists(tokenizer_copy) ||
        !std::filesystem::equivalent(tokenizer_copy, data.tokenizer_path))
      std::filesystem::copy_file(data.tokenizer_path, tokenizer_copy,
                                 std::filesystem::copy_options::overwrite_existing);
  }
  comm.barrier();
  if (!comm.is_root()) data = resolve_dataset(config);
  std::cout << "data: " << data.source << " | " << data.tokenizer_kind << " tokenizer, vocab "
            << data.vocab_size << " | " << data.train_tokens << " train / " << data.val_tokens
            << " val tokens\n";

  // What one batch needs, checked before the model, the data loaders or the activations are
  // allocated (each rank runs batch_size / ranks rows).
  const ModelConfig model_config = model_config_for(config, data.vocab_size);
  if (config.device == "cpu")
    check_batch_memory(model_config, config.batch_size / comm.size(), config.seq_len, true,
                       "pion train");
  Llama<float> model(model_config);
  Rng init_rng(config.seed);
  model.init_weights(init_rng);
  model.dropout_rng() = Rng(config.seed ^ 0xd50f07ULL);
  std::cout << "model: " << config.n_layer << " layers, d_model " << config.d_model << ", "
            << model.config().num_params() << " parameters";
  if (model_config.kv_heads() < model_config.n_head)
    std::cout << ", grouped-query attention " << model_config.n_head << " query / "
              << model_config.kv_heads() << " K/V heads";
  if (model_config.tie_embeddings) std::cout << ", tied embeddings";
  std::cout << " | optimizer " << config.optimizer << "\n";
  print_spectrum_summary(model);

  TrainInputs in;
  in.config = config;
  in.resume = resume;
  in.stop_after = stop_after;
  in.collective_timeout = collective_timeout;
  in.extra_metadata = {{"mode", "pretrain"}, {"tokenizer", tokenizer_copy}, {"dataset", data.dir}};
  in.train_source = make_shard_source(data.train_path, config);
  in.evaluate = make_shard_evaluator(data.val_path, config, config.eval_iters);
  TrainSummary s = run_training_on_device(std::move(in), model);
  std::cout << "done: best val loss " << s.best_val_loss << ", " << s.tokens_per_sec
            << " tok/s, spectrum drift " << s.spectrum_drift_max << ", skipped steps "
            << s.skipped_steps << " -> " << config.out_dir << "/summary.json\n";
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "pretrain a LLaMA-style model (AdamW, Muon or Pion)");
  auto flags = add_config_flags(*cmd);
  auto resume = std::make_shared<bool>(false);
  cmd->add_flag("--resume", *resume, "continue bit-exactly from <out_dir>/checkpoint.safetensors");
  auto stop_after = std::make_shared<int>(0);
  cmd->add_option("--stop_after", *stop_after,
                  "stop with a checkpoint after this many steps (the schedule still spans "
                  "max_iters; continue with --resume; 0 = run to max_iters)")
      ->check(FiniteRange(0, 1 << 30));
  auto collective_timeout = std::make_shared<double>(600.0);
  cmd->add_option("--collective_timeout", *collective_timeout,
                  "under mpirun: seconds a rank waits in one collective before it ends the job "
                  "(another rank died or hangs); 0 waits forever")
      ->check(FiniteRange(0, 1e7))
      ->capture_default_str();
  cmd->callback([flags, resume, stop_after, collective_timeout] {
    run_train(*flags, *resume, *stop_after, *collective_timeout);
  });
}

}  // namespace pion::cli
