#pragma once

// GGML_OP_ROPE_DPE and GGML_OP_DPE_NEAR_SCORES on CUDA (compiled into ggml-cuda). Semantics: ggml-dpe.h.
#include "common.cuh"

#define CUDA_ROPE_DPE_BLOCK_SIZE 256

void ggml_cuda_op_rope_dpe(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// what ggml_cuda_op_rope_dpe handles: F32 a with contiguous rows, I32 pos, F32 table, optional F32 freq_factors
bool ggml_cuda_supports_rope_dpe(const ggml_tensor * op);

// GGML_OP_DPE_NEAR_SCORES (ggml-dpe.h): near scores into the far score matrix, in place
void ggml_cuda_op_dpe_near_scores(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// what ggml_cuda_op_dpe_near_scores handles: F32 scores with float-aligned strides, I32 index and positions
bool ggml_cuda_supports_dpe_near_scores(const ggml_tensor * op);

// GGML_OP_DPE_FLASH_ATTN (ggml-dpe.h): DPE's one-softmax attention (csrc/ggml-cuda-dpe-fattn.cu)
void ggml_cuda_op_dpe_flash_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// what ggml_cuda_op_dpe_flash_attn handles on this device: NVIDIA Ampere or newer; K and V of one type (F16, F32,
// Q8_0) with head dim 64, 128 or 256; F32 queries and window keys; F16 mask; F32 sinks
bool ggml_cuda_supports_dpe_flash_attn(int device, const ggml_tensor * op);
