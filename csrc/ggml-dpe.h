#pragma once

// DPE (dimension-wise positional embeddings, arXiv 2504.18857) for ggml: the position-delta rotation.
// Spec: docs/dpe-spec.md section 3; design: docs/engine-design.md section 1.

#include "ggml.h"

#ifdef  __cplusplus
extern "C" {
#endif

    // op_params slots of GGML_OP_ROPE_DPE (int32 each; float values stored bit-for-bit)
    enum ggml_rope_dpe_param {
        GGML_ROPE_DPE_P_N_DIMS     = 0,  // int32: rotary dims n_dims (pairs f = 0 .. n_dims/2 - 1)
        GGML_ROPE_DPE_P_MODE       = 1,  // int32: GGML_ROPE_TYPE_NORMAL or GGML_ROPE_TYPE_NEOX
        GGML_ROPE_DPE_P_N_CTX_ORIG = 2,  // int32: YaRN n_ctx_orig
        GGML_ROPE_DPE_P_FREQ_BASE  = 3,  // float
        GGML_ROPE_DPE_P_FREQ_SCALE = 4,  // float
        GGML_ROPE_DPE_P_EXT_FACTOR = 5,  // float
        GGML_ROPE_DPE_P_BETA_FAST  = 6,  // float
        GGML_ROPE_DPE_P_BETA_SLOW  = 7,  // float
        GGML_ROPE_DPE_P_WINDOW     = 8,  // int32: local window w
        GGML_ROPE_DPE_P_KIND       = 9,  // int32: enum ggml_rope_dpe_kind
        GGML_ROPE_DPE_P_COUNT      = 10,
    };

    // What GGML_OP_ROPE_DPE rotates: pos -> P(pos) for keys or queries, or a far key back to pos
    enum ggml_rope_dpe_kind {
        GGML_ROPE_DPE_KEY         = 0, // key positions P_k (a key rotated at pos -> its far key)
        GGML_ROPE_DPE_QUERY       = 1, // query positions P_q
        GGML_ROPE_DPE_KEY_INVERSE = 2, // a far key -> the key rotated at pos (the inverse of KEY)
    };

    // Rotate vectors that ordinary RoPE already rotated at position pos to DPE's far positions.
    //
    //   a            F32 [n_embd_head, n_head, n_tokens(, n_seq)], as produced by ggml_rope_ext (Qcur/Kcur);
    //                may be a view with nb[0] == sizeof(float)
    //   pos          I32 [n_tokens], the positions a was rotated at
    //   table        F32 [n_dims/2, n_head_kv]: divisors sigma(h, f) of one layer, integer-valued, >= 1
    //                (rows may be strided, e.g. a view of the [F, n_head_kv, n_layer] rope_dpe.weight);
    //                head h of a uses row h / (n_head / n_head_kv)
    //   freq_factors F32 [n_dims/2] or NULL: the model's rope_freqs, as given to ggml_rope_ext
    //
    // Frequency f of head h (pair (2f, 2f+1) in NORMAL mode, (f, f + n_dims/2) in NEOX mode) is rotated by
    //   (P(pos, s) - pos) * theta_f,   s = sigma(h, f)    (kind KEY or QUERY; KEY_INVERSE: the negative of KEY's)
    //   key:   P_k(j, s) = floor(j/s)
    //   query: P_q(i, s) = floor(i/s) + window - floor(window/s)
    // where theta_f is ggml_rope_ext's angle rate for f with the same n_dims, freq_base, freq_scale,
    // freq_factors and YaRN ramp (n_ctx_orig, ext_factor, beta_fast, beta_slow), without attn_factor or
    // YaRN's magnitude scaling (the first rope applied those). Dims beyond n_dims are copied. A pair whose
    // delta is 0 (every sigma = 1, in particular) is copied bit for bit.
    // Angles are computed in double and reduced to [-pi, pi] before a float sin/cos (the CPU kernel rotates by the
    // product of two such values, for delta = 64a + b: one more float rounding, and the same for any split of
    // the rows), so the CPU and CUDA kernels agree to float rounding at any position (see csrc/ggml-dpe-impl.h).
    // Result: F32, contiguous, shape of a. The CPU kernel asserts the table holds values >= 1;
    // the CUDA kernel treats values < 1 as 1 (the loader validates the table).
    GGML_API struct ggml_tensor * ggml_rope_dpe(
            struct ggml_context * ctx,
            struct ggml_tensor  * a,
            struct ggml_tensor  * pos,
            struct ggml_tensor  * table,
            struct ggml_tensor  * freq_factors,
            int                   n_dims,
            int                   mode,
            int                   n_ctx_orig,
            float                 freq_base,
            float                 freq_scale,
            float                 ext_factor,
            float                 beta_fast,
            float                 beta_slow,
            int                   window,
            int                   kind);   // enum ggml_rope_dpe_kind (false/true: key/query)

    // DPE's one softmax over near and far scores (spec section 3), at the width of the cache: put the near
    // scores of the window cells into a matrix of far scores, in place.
    //
    //   kq       F32 [n_kv, n_tps, n_head, n_stream]: scores of the far queries against every cell's far key
    //   kq_near  F32 [n_win, n_tps, n_head, n_stream]: scores of the ordinary queries against the keys of the
    //            window slots (ordinary RoPE)
    //   idx      I32 [n_win, n_stream]: the cell (0 .. n_kv-1) of each window slot
    //   pos_win  I32 [n_win, n_stream]: the position of each window slot's cell
    //   pos_q    I32 [n_tps*n_stream]: the position of each query, stream after stream
    //
    // kq[idx[j, s], i, h, s] = kq_near[j, i, h, s] wherever 0 <= pos_q[s*n_tps + i] - pos_win[j, s] < window;
    // every other score keeps its far value. Slots no query is near to (padding: pos_win = INT32_MAX) change
    // nothing. Returns kq (a view: the node writes into kq's memory).
    GGML_API struct ggml_tensor * ggml_dpe_near_scores(
            struct ggml_context * ctx,
            struct ggml_tensor  * kq,
            struct ggml_tensor  * kq_near,
            struct ggml_tensor  * idx,
            struct ggml_tensor  * pos_win,
            struct ggml_tensor  * pos_q,
            int                   window);

#ifdef  __cplusplus
}
#endif
