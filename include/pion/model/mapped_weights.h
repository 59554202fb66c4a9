#pragma once
// Loading a model's weights from a mapped safetensors file (MappedSafetensors), tensor by
// tensor into the model's parameter buffer: the file's bytes are never copied into memory
// first, so loading a checkpoint needs the model once (load_checkpoint, pion export-hf).
// The checks and their messages are check_model_weights's (llama.h).
#include <string>

#include "pion/core/safetensors.h"
#include "pion/model/llama.h"

namespace pion {

// Checks that `in` holds, under `prefix`, exactly the weights of a model of `config`: every
// parameter present with its shape, F32 or F64, every value finite, no other tensor under the
// prefix. Reads each tensor once (in chunks); allocates nothing sized by the config.
void check_model_weights(const MappedSafetensors& in, const std::string& prefix,
                         const ModelConfig& config, const std::string& source);

// check_model_weights, then copies every "<prefix><name>" into the model (F32 or F64,
// converted as needed). A bad file changes nothing.
template <class T>
void load_model_weights(Llama<T>& model, const MappedSafetensors& in, const std::string& prefix,
                        const std::string& source);

}  // namespace pion
