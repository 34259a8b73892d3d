#pragma once

// GGML_OP_ROPE_DPE on CUDA (compiled into ggml-cuda). Semantics: ggml-dpe.h.
#include "common.cuh"

#define CUDA_ROPE_DPE_BLOCK_SIZE 256

void ggml_cuda_op_rope_dpe(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// what ggml_cuda_op_rope_dpe handles: F32 a with contiguous rows, I32 pos, F32 table, optional F32 freq_factors
bool ggml_cuda_supports_rope_dpe(const ggml_tensor * op);
