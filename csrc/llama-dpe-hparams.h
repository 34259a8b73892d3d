// dpe-gguf: the DPE parameters a loaded model carries (a member of llama_hparams, see patches/0004).
#pragma once

#include <cstdint>

struct ggml_tensor;
struct llama_model;

struct llama_dpe_hparams {
    uint32_t version = 0;              // dpe.version of the file; 0 when the file has no DPE parameters
    uint32_t window  = 0;              // w; 0 turns DPE off (override: --dpe off, dpe.window=int:0)
    ggml_tensor * table = nullptr;     // rope_dpe.weight, F32 [n_rot/2, n_head_kv, n_layer]; set when DPE is on
    const llama_model * model = nullptr; // for the per-layer rope factors (llama_model::get_rope_factors)

    bool active() const { return table != nullptr && window > 0; }
};
