// GGML_OP_ROPE_DPE: graph constructor (compiled into ggml-base). Kernels: ggml-cpu-dpe.cpp, ggml-cuda-dpe.cu.
#include "ggml-dpe.h"

#include "ggml-impl.h"

#include <string.h>

// A GGML_OP_ROPE_DPE node's checks of what every kind takes, its op_params and its first four sources
static void rope_dpe_init(struct ggml_tensor * result, struct ggml_tensor * a, struct ggml_tensor * pos,
                          struct ggml_tensor * table, struct ggml_tensor * freq_factors, int n_dims, int mode,
                          int n_ctx_orig, float freq_base, float freq_scale, float ext_factor, float attn_factor,
                          float beta_fast, float beta_slow, int window, int kind) {
    GGML_ASSERT((mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX) && "ggml_rope_dpe: only NORMAL and NEOX rope");
    GGML_ASSERT(a->nb[0] == ggml_type_size(a->type));
    GGML_ASSERT(n_dims > 0 && n_dims % 2 == 0 && n_dims <= a->ne[0]);
    GGML_ASSERT(n_dims / 2 <= 512); // GGML_DPE_MAX_F
    GGML_ASSERT(ggml_is_contiguous(pos) && pos->type == GGML_TYPE_I32);
    GGML_ASSERT(table->type == GGML_TYPE_F32);
    GGML_ASSERT(table->nb[0] == sizeof(float));
    GGML_ASSERT(table->ne[0] == n_dims / 2);
    GGML_ASSERT(table->ne[2] == 1 && table->ne[3] == 1);
    GGML_ASSERT(table->ne[1] >= 1 && a->ne[1] % table->ne[1] == 0); // n_head is a multiple of n_head_kv

    if (freq_factors) {
        GGML_ASSERT(freq_factors->type == GGML_TYPE_F32);
        GGML_ASSERT(ggml_is_contiguous(freq_factors));
        GGML_ASSERT(freq_factors->ne[0] >= n_dims / 2);
    }
    GGML_ASSERT(window >= 0);

    int32_t params[GGML_ROPE_DPE_P_COUNT] = { 0 };
    params[GGML_ROPE_DPE_P_N_DIMS]     = n_dims;
    params[GGML_ROPE_DPE_P_MODE]       = mode;
    params[GGML_ROPE_DPE_P_N_CTX_ORIG] = n_ctx_orig;
    memcpy(params + GGML_ROPE_DPE_P_FREQ_BASE,   &freq_base,   sizeof(float));
    memcpy(params + GGML_ROPE_DPE_P_FREQ_SCALE,  &freq_scale,  sizeof(float));
    memcpy(params + GGML_ROPE_DPE_P_EXT_FACTOR,  &ext_factor,  sizeof(float));
    memcpy(params + GGML_ROPE_DPE_P_BETA_FAST,   &beta_fast,   sizeof(float));
    memcpy(params + GGML_ROPE_DPE_P_BETA_SLOW,   &beta_slow,   sizeof(float));
    memcpy(params + GGML_ROPE_DPE_P_ATTN_FACTOR, &attn_factor, sizeof(float));
    params[GGML_ROPE_DPE_P_WINDOW]     = window;
    params[GGML_ROPE_DPE_P_KIND]       = kind;
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_ROPE_DPE;
    result->src[0] = a;
    result->src[1] = pos;
    result->src[2] = table;
    result->src[3] = freq_factors;
}

struct ggml_tensor * ggml_rope_dpe_ext(
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
        int                   kind) {
    GGML_ASSERT(kind == GGML_ROPE_DPE_KEY || kind == GGML_ROPE_DPE_QUERY || kind == GGML_ROPE_DPE_KEY_INVERSE ||
                kind == GGML_ROPE_DPE_KEY_FULL || kind == GGML_ROPE_DPE_QUERY_PAIR);

    int64_t ne[GGML_MAX_DIMS] = { a->ne[0], a->ne[1], a->ne[2], a->ne[3] };
    if (rows) {
        GGML_ASSERT(kind == GGML_ROPE_DPE_KEY || kind == GGML_ROPE_DPE_QUERY || kind == GGML_ROPE_DPE_KEY_INVERSE);
        GGML_ASSERT(a->type == GGML_TYPE_F32 || a->type == GGML_TYPE_F16);
        GGML_ASSERT(rows->type == GGML_TYPE_I32 && ggml_is_contiguous(rows));
        GGML_ASSERT(rows->ne[1] == a->ne[3] && rows->ne[2] == 1 && rows->ne[3] == 1);
        ne[2] = rows->ne[0];
        GGML_ASSERT(ggml_nelements(pos) == ne[2]*ne[3]);
    } else {
        GGML_ASSERT(a->type == GGML_TYPE_F32);
        GGML_ASSERT(ggml_is_vector(pos) && pos->ne[0] == a->ne[2]);
    }
    if (kind == GGML_ROPE_DPE_QUERY_PAIR) {
        GGML_ASSERT(a->ne[3] == 1);
        ne[3] = 2;
    }

    struct ggml_tensor * result = ggml_new_tensor(ctx, GGML_TYPE_F32, GGML_MAX_DIMS, ne);
    rope_dpe_init(result, a, pos, table, freq_factors, n_dims, mode, n_ctx_orig, freq_base, freq_scale, ext_factor,
                  attn_factor, beta_fast, beta_slow, window, kind);
    result->src[4] = rows;

    return result;
}

struct ggml_tensor * ggml_rope_dpe(
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
        int                   kind) {
    GGML_ASSERT(kind == GGML_ROPE_DPE_KEY || kind == GGML_ROPE_DPE_QUERY || kind == GGML_ROPE_DPE_KEY_INVERSE);
    return ggml_rope_dpe_ext(ctx, a, pos, table, freq_factors, NULL, n_dims, mode, n_ctx_orig, freq_base, freq_scale,
                             ext_factor, 1.0f, beta_fast, beta_slow, window, kind);
}

struct ggml_tensor * ggml_rope_dpe_key_write(
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
        int                   window) {
    GGML_ASSERT(a->type == GGML_TYPE_F32 && a->ne[3] == 1); // rows of unit stride (rope_dpe_init), views allowed
    GGML_ASSERT(ggml_is_vector(pos) && pos->ne[0] == a->ne[2]);
    const int64_t d = a->ne[0], n_head_kv = a->ne[1], n_tokens = a->ne[2];
    GGML_ASSERT(cache->type == GGML_TYPE_F16 || cache->type == GGML_TYPE_F32);
    GGML_ASSERT(cache->ne[0] == d*n_head_kv && cache->ne[2] == 1 && cache->ne[3] == 1);
    GGML_ASSERT(cache->nb[0] == ggml_type_size(cache->type));
    GGML_ASSERT(idx->type == GGML_TYPE_I64 && ggml_is_contiguous(idx) && ggml_nelements(idx) == n_tokens);
    GGML_ASSERT(table->ne[1] == n_head_kv);
    if (store) {
        GGML_ASSERT(store->type == GGML_TYPE_F32 && store->nb[0] == sizeof(float));
        GGML_ASSERT(store->ne[0] == d && store->ne[2] == n_head_kv);
        GGML_ASSERT(slot && slot->type == GGML_TYPE_I64 && ggml_is_contiguous(slot));
        GGML_ASSERT(slot->ne[1] == 1 && slot->ne[2] == store->ne[3] && slot->ne[3] == 1);
        GGML_ASSERT(slot->ne[0]*slot->ne[2] == n_tokens);
    } else {
        GGML_ASSERT(slot == NULL);
    }

    struct ggml_tensor * result = ggml_view_tensor(ctx, cache);
    rope_dpe_init(result, a, pos, table, freq_factors, n_dims, mode, n_ctx_orig, freq_base, freq_scale, ext_factor,
                  attn_factor, beta_fast, beta_slow, window, GGML_ROPE_DPE_KEY_WRITE);
    result->src[5] = cache;
    result->src[6] = idx;
    result->src[7] = store;
    result->src[8] = slot;

    return result;
}

struct ggml_tensor * ggml_dpe_near_scores(
        struct ggml_context * ctx,
        struct ggml_tensor  * kq,
        struct ggml_tensor  * kq_near,
        struct ggml_tensor  * idx,
        struct ggml_tensor  * pos_win,
        struct ggml_tensor  * pos_q,
        int                   window,
        int                   kw_slots,
        int64_t               n_kv) {
    GGML_ASSERT(kq->type == GGML_TYPE_F32 && kq_near->type == GGML_TYPE_F32);
    GGML_ASSERT(kq->nb[0] == sizeof(float) && kq_near->nb[0] == sizeof(float));
    GGML_ASSERT(kq_near->ne[1] == kq->ne[1] && kq_near->ne[2] == kq->ne[2] && kq_near->ne[3] == kq->ne[3]);
    GGML_ASSERT(idx->type == GGML_TYPE_I32 && pos_win->type == GGML_TYPE_I32 && pos_q->type == GGML_TYPE_I32);
    GGML_ASSERT(ggml_is_contiguous(idx) && ggml_is_contiguous(pos_win) && ggml_is_contiguous(pos_q));
    GGML_ASSERT(idx->ne[1] == kq->ne[3] && ggml_nelements(idx) == ggml_nelements(pos_win));
    GGML_ASSERT(kw_slots >= 0);
    GGML_ASSERT(n_kv >= kq->ne[0]);
    if (kw_slots == 0) {
        GGML_ASSERT(idx->ne[0] == kq_near->ne[0] && kq_near->ne[0] <= n_kv);
    } else {
        GGML_ASSERT(kq_near->ne[0] >= kw_slots); // rows of a store: slot j's score in row idx[j] % kw_slots
    }
    GGML_ASSERT(ggml_nelements(pos_q) == kq->ne[1]*kq->ne[3]);
    GGML_ASSERT(window >= 0);

    struct ggml_tensor * result = n_kv == kq->ne[0] ? ggml_view_tensor(ctx, kq)
                                : ggml_new_tensor_4d(ctx, GGML_TYPE_F32, n_kv, kq->ne[1], kq->ne[2], kq->ne[3]);

    int32_t params[2] = { window, kw_slots };
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_DPE_NEAR_SCORES;
    result->src[0] = kq;
    result->src[1] = kq_near;
    result->src[2] = idx;
    result->src[3] = pos_win;
    result->src[4] = pos_q;

    return result;
}

struct ggml_tensor * ggml_dpe_flash_attn(
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
        int                   kw_slots) {
    const int64_t d = q->ne[0], n_tps = q->ne[1], n_head = q->ne[2], n_stream = q->ne[3];
    GGML_ASSERT(q->type == GGML_TYPE_F32 && q_far->type == GGML_TYPE_F32 && k_win->type == GGML_TYPE_F32);
    GGML_ASSERT(ggml_are_same_shape(q, q_far));
    GGML_ASSERT(q->nb[0] == sizeof(float) && q_far->nb[0] == sizeof(float) && k_win->nb[0] == sizeof(float));
    GGML_ASSERT(k->ne[0] == d && k_win->ne[0] == d);
    GGML_ASSERT(k->nb[0] == ggml_type_size(k->type) && v->nb[0] == ggml_type_size(v->type));
    GGML_ASSERT(v->ne[1] == k->ne[1] && v->ne[2] == k->ne[2]);
    GGML_ASSERT(k->ne[3] == n_stream && v->ne[3] == n_stream && k_win->ne[3] == n_stream);
    GGML_ASSERT(k->ne[2] >= 1 && n_head % k->ne[2] == 0 && k_win->ne[2] == k->ne[2]);
    if (mask) {
        GGML_ASSERT(mask->type == GGML_TYPE_F16 && ggml_is_contiguous(mask));
        GGML_ASSERT(mask->ne[0] == k->ne[1] && mask->ne[1] >= n_tps);
        GGML_ASSERT(n_head % mask->ne[2] == 0 && n_stream % mask->ne[3] == 0);
    }
    if (max_bias > 0.0f) {
        GGML_ASSERT(mask);
    }
    GGML_ASSERT(idx->type == GGML_TYPE_I32 && pos_win->type == GGML_TYPE_I32 && pos_q->type == GGML_TYPE_I32);
    GGML_ASSERT(ggml_is_contiguous(idx) && ggml_is_contiguous(pos_win) && ggml_is_contiguous(pos_q));
    GGML_ASSERT(kw_slots >= 0);
    GGML_ASSERT(kw_slots > 0 ? k_win->ne[1] >= kw_slots : idx->ne[0] == k_win->ne[1]);
    GGML_ASSERT(idx->ne[1] == n_stream && ggml_are_same_shape(idx, pos_win));
    GGML_ASSERT(ggml_nelements(pos_q) == n_tps*n_stream);
    if (sinks) {
        GGML_ASSERT(sinks->type == GGML_TYPE_F32 && ggml_is_contiguous(sinks) && sinks->ne[0] == n_head);
    }
    GGML_ASSERT(window >= 0);

    const int64_t ne[4] = { v->ne[0], n_head, n_tps, n_stream };
    struct ggml_tensor * result = ggml_new_tensor(ctx, GGML_TYPE_F32, 4, ne);

    int32_t params[GGML_DPE_FATTN_P_COUNT] = { 0 };
    memcpy(params + GGML_DPE_FATTN_P_SCALE,    &scale,         sizeof(float));
    memcpy(params + GGML_DPE_FATTN_P_MAX_BIAS, &max_bias,      sizeof(float));
    memcpy(params + GGML_DPE_FATTN_P_SOFTCAP,  &logit_softcap, sizeof(float));
    params[GGML_DPE_FATTN_P_WINDOW]   = window;
    params[GGML_DPE_FATTN_P_KW_SLOTS] = kw_slots;
    ggml_set_op_params(result, params, sizeof(params));

    result->op     = GGML_OP_DPE_FLASH_ATTN;
    result->src[0] = q;
    result->src[1] = q_far;
    result->src[2] = k;
    result->src[3] = v;
    result->src[4] = mask;
    result->src[5] = k_win;
    result->src[6] = idx;
    result->src[7] = pos_win;
    result->src[8] = pos_q;
    result->src[9] = sinks;

    return result;
}
