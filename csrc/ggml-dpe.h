#pragma once

// DPE (dimension-wise positional embeddings, arXiv 2504.18857) for ggml: the position-delta rotation.
// Design: docs/design.md sections 3 (the math) and 6 (the engine).

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
        GGML_ROPE_DPE_P_ATTN_FACTOR = 10, // float: ggml_rope_ext's attn_factor (kinds KEY_FULL and QUERY_PAIR)
        GGML_ROPE_DPE_P_COUNT      = 11,
    };

    // What GGML_OP_ROPE_DPE rotates: pos -> P(pos) for keys or queries, or a far key back to pos; the last two
    // take vectors that no rope has rotated yet and do ggml_rope_ext's work as well (one node instead of two)
    enum ggml_rope_dpe_kind {
        GGML_ROPE_DPE_KEY         = 0, // key positions P_k (a key rotated at pos -> its far key)
        GGML_ROPE_DPE_QUERY       = 1, // query positions P_q
        GGML_ROPE_DPE_KEY_INVERSE = 2, // a far key -> the key rotated at pos (the inverse of KEY)
        GGML_ROPE_DPE_KEY_FULL    = 3, // an unrotated key -> its far key (rotated at P_k(pos))
        GGML_ROPE_DPE_QUERY_PAIR  = 4, // an unrotated query -> [the query rotated at pos ; its far query (at P_q(pos))]
        GGML_ROPE_DPE_KEY_WRITE   = 5, // KEY_FULL written to cache rows (and the key rotated at pos to a store):
                                       // ggml_rope_dpe_key_write
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

    // ggml_rope_dpe with every option:
    //
    //   kinds KEY_FULL and QUERY_PAIR: a has not been rotated (ggml_rope_ext's input, with its parameters, its
    //   attn_factor included); frequency f is rotated by P(pos, s) * theta_f (QUERY_PAIR: also by pos * theta_f)
    //   and, as ggml_rope_ext does, scaled by attn_factor (times YaRN's 1 + 0.1 ln(1/freq_scale) when ext_factor
    //   != 0); dims beyond n_dims are copied. QUERY_PAIR needs a->ne[3] == 1 and returns [ne0, ne1, ne2, 2]: the
    //   ordinary query at [..., 0], the far query at [..., 1].
    //
    //   rows (I32 [n_slots, n_stream], or NULL): a is then a cache, [n_embd_head, n_head_kv, n_cells, n_stream]
    //   (F32 or F16, rows of unit stride), and the result is F32 [n_embd_head, n_head_kv, n_slots, n_stream]
    //   whose slot j of stream t is cell rows[t, j] of a rotated at pos[t*n_slots + j] (pos: I32, n_slots*n_stream
    //   elements): ggml_get_rows and the rotation in one node. Kinds KEY, QUERY and KEY_INVERSE only.
    GGML_API struct ggml_tensor * ggml_rope_dpe_ext(
            struct ggml_context * ctx,
            struct ggml_tensor  * a,
            struct ggml_tensor  * pos,
            struct ggml_tensor  * table,
            struct ggml_tensor  * freq_factors,
            struct ggml_tensor  * rows,
            int                   n_dims,
            int                   mode,
            int                   n_ctx_orig,
            float                 freq_base,
            float                 freq_scale,
            float                 ext_factor,
            float                 attn_factor,
            float                 beta_fast,
            float                 beta_slow,
            int                   window,
            int                   kind);

    // The new keys of a ubatch written to the cache, as ggml_set_rows(cache, KEY_FULL(a), idx) writes them, in one
    // node; with a store, also what rotating them back from the cache gives (KEY_INVERSE of the far key as the
    // cache holds it), to slots of the store.
    //
    //   cache  F16 or F32 [n_embd_head*n_head_kv, n_rows]: the layer's K cache, streams merged (as llama.cpp's
    //          cpy_k views it); idx (I64 [n_tokens]) gives each token's row, as ggml_set_rows's
    //   a      F32 [n_embd_head, n_head_kv, n_tokens], unrotated (ggml_rope_ext's input; may be a view with rows
    //          of unit stride); pos: its positions;
    //          table, freq_factors and the rope parameters as ggml_rope_dpe_ext's (kind KEY_FULL)
    //   store  F32 [n_embd_head, n_slots, n_head_kv, n_stream] or NULL; slot (I64 [n_tps, 1, n_stream], n_tokens =
    //          n_tps*n_stream, stream after stream): token i of stream t goes to store[:, slot[i, t], head, t]
    //
    // cache row idx[i] = round(KEY_FULL(a_i)) (round: the cache type's conversion), and with a store
    // store[:, slot, h, t] = KEY_INVERSE(float(round(KEY_FULL(a_i)))) at pos[i], bit for bit what the separate
    // nodes (and ggml_rope_dpe_ext with rows reading the cache) compute. Returns a view of cache (like
    // ggml_set_rows); the store is written in place (build the node into the graph before its readers).
    GGML_API struct ggml_tensor * ggml_rope_dpe_key_write(
            struct ggml_context * ctx,
            struct ggml_tensor  * cache,
            struct ggml_tensor  * a,
            struct ggml_tensor  * idx,
            struct ggml_tensor  * pos,
            struct ggml_tensor  * table,
            struct ggml_tensor  * freq_factors,
            struct ggml_tensor  * store,
            struct ggml_tensor  * slot,
            int                   n_dims,
            int                   mode,
            int                   n_ctx_orig,
            float                 freq_base,
            float                 freq_scale,
            float                 ext_factor,
            float                 attn_factor,
            float                 beta_fast,
            float                 beta_slow,
            int                   window);

    // DPE's one softmax over near and far scores (spec section 3), at the width of the cache: put the near
    // scores of the window cells into a matrix of far scores, in place.
    //
    //   kq       F32 [n_kv, n_tps, n_head, n_stream]: scores of the far queries against every cell's far key
    //   kq_near  F32 [n_win, n_tps, n_head, n_stream]: scores of the ordinary queries against the keys of the
    //            window slots (ordinary RoPE); with kw_slots = S > 0, [n_rows >= S, ...]: scores against the rows of
    //            a store of keys by cell, slot j's score in row idx[j] % S
    //   idx      I32 [n_win, n_stream]: the cell (0 .. n_kv-1) of each window slot
    //   pos_win  I32 [n_win, n_stream]: the position of each window slot's cell
    //   pos_q    I32 [n_tps*n_stream]: the position of each query, stream after stream
    //
    // kq[idx[j, s], i, h, s] = kq_near[r(j), i, h, s] (r(j) = j, or idx[j, s] % S) wherever
    // 0 <= pos_q[s*n_tps + i] - pos_win[j, s] < window; every other score keeps its far value. Slots no query is
    // near to (padding: pos_win = INT32_MAX) change nothing. Returns kq (a view: the node writes into kq's memory)
    // when n_kv = kq->ne[0]. With n_kv > kq->ne[0] (far scores computed only for the first cells), returns a new
    // [n_kv, n_tps, n_head, n_stream] matrix: kq's columns, then zeros, and the near scores merged into it.
    GGML_API struct ggml_tensor * ggml_dpe_near_scores(
            struct ggml_context * ctx,
            struct ggml_tensor  * kq,
            struct ggml_tensor  * kq_near,
            struct ggml_tensor  * idx,
            struct ggml_tensor  * pos_win,
            struct ggml_tensor  * pos_q,
            int                   window,
            int                   kw_slots,
            int64_t               n_kv);

    // op_params slots of GGML_OP_DPE_FLASH_ATTN (float values; WINDOW is int32)
    enum ggml_dpe_fattn_param {
        GGML_DPE_FATTN_P_SCALE    = 0, // float: KQ scale
        GGML_DPE_FATTN_P_MAX_BIAS = 1, // float: ALiBi max bias (0: none)
        GGML_DPE_FATTN_P_SOFTCAP  = 2, // float: logit softcap (0: none)
        GGML_DPE_FATTN_P_WINDOW   = 3, // int32: local window w
        GGML_DPE_FATTN_P_KW_SLOTS = 4, // int32: 0, or S: slot j's key is row idx[j] % S of k_win (a store)
        GGML_DPE_FATTN_P_COUNT    = 5,
    };

    // DPE's attention with one online softmax (spec section 3), as ggml_flash_attn_ext computes stock's:
    // every (query, cell) pair is scored once, near where the cell is a window slot within w of the query,
    // far everywhere else, and no K or V is copied.
    //
    //   q        F32 [d, n_tps, n_head, n_stream]: the ordinary queries (permuted as ggml_flash_attn_ext's q)
    //   q_far    F32, shape of q: the far queries
    //   k        [d, n_kv, n_head_kv, n_stream]: the cache's far keys (F16, F32 or a quantized type)
    //   v        [d_v, n_kv, n_head_kv, n_stream]: the values (any type with to_float)
    //   mask     F16 [n_kv, >= n_tps, 1 or n_head, n_stream] or NULL: stock's mask (causal, sequences, empty cells)
    //   k_win    F32 [d, n_win, n_head_kv, n_stream]: the ordinary keys of the window slots (rows contiguous);
    //            with kw_slots = S > 0, [d, >= S, n_head_kv, n_stream], slot j's key in row idx[j] % S (a store
    //            of ordinary keys by cell, see ggml_rope_dpe_key_write)
    //   idx      I32 [n_win, n_stream]: the cell of each slot; the real slots come first with ascending
    //            cells, padding slots (pos_win = INT32_MAX) after them
    //   pos_win  I32 [n_win, n_stream]: the position of each slot's cell
    //   pos_q    I32 [n_tps*n_stream]: the position of each query, stream after stream
    //   sinks    F32 [n_head] or NULL: attention sinks, as ggml_flash_attn_ext_add_sinks
    //
    // score(i, j) = scale * (near ? q_i . k_win[slot(j)] : q_far_i . k_j), near: j = idx[slot] and
    // 0 <= pos_q[i] - pos_win[slot] < window; then softcap, slope * mask, one softmax over j (and the sink),
    // and the product with V. Result: F32 [d_v, n_head, n_tps, n_stream] (ggml_flash_attn_ext's layout).
    GGML_API struct ggml_tensor * ggml_dpe_flash_attn(
            struct ggml_context * ctx,
            struct ggml_tensor  * q,
            struct ggml_tensor  * q_far,
            struct ggml_tensor  * k,
            struct ggml_tensor  * v,
            struct ggml_tensor  * mask,
            struct ggml_tensor  * k_win,
            struct ggml_tensor  * idx,
            struct ggml_tensor  * pos_win,
            struct ggml_tensor  * pos_q,
            struct ggml_tensor  * sinks,
            float                 scale,
            float                 max_bias,
            float                 logit_softcap,
            int                   window,
            int                   kw_slots);

#ifdef  __cplusplus
}
#endif
