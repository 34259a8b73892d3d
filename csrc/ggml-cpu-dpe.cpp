// GGML_OP_ROPE_DPE and GGML_OP_DPE_NEAR_SCORES on the CPU (compiled into ggml-cpu). Semantics: ggml-dpe.h; rope arithmetic: ggml-dpe-impl.h.
#include "ggml-dpe.h"
#include "ggml-dpe-impl.h"

#include "ggml-cpu-impl.h"
#include "ops.h"

#include <math.h>
#include <string.h>

#include <vector>

#define GGML_DPE_ANGLE_B 64 // see the angle tables in ggml_compute_forward_rope_dpe

static inline int64_t dpe_floor_div64(int64_t a, int64_t b) { // b >= 1
    return a >= 0 ? a/b : -((-a + b - 1)/b);
}

void ggml_compute_forward_rope_dpe(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_tensor * src0 = dst->src[0]; // a
    const ggml_tensor * src1 = dst->src[1]; // pos
    const ggml_tensor * src2 = dst->src[2]; // table
    const ggml_tensor * src3 = dst->src[3]; // freq_factors or NULL

    GGML_ASSERT(src0->type == GGML_TYPE_F32 && dst->type == GGML_TYPE_F32);
    GGML_ASSERT(src1->type == GGML_TYPE_I32 && src2->type == GGML_TYPE_F32);

    const ggml_rope_dpe_op_params p = ggml_rope_dpe_get_op_params(dst);
    const int   n_dims     = p.n_dims;
    const int   mode       = p.mode;
    const int   n_ctx_orig = p.n_ctx_orig;
    const int   window     = p.window;
    const int   kind       = p.kind;
    const float freq_base  = p.freq_base;
    const float freq_scale = p.freq_scale;
    const float ext_factor = p.ext_factor;
    const float beta_fast  = p.beta_fast;
    const float beta_slow  = p.beta_slow;

    GGML_TENSOR_UNARY_OP_LOCALS

    GGML_ASSERT(mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX);
    GGML_ASSERT(nb00 == sizeof(float) && nb0 == sizeof(float));
    GGML_ASSERT(n_dims % 2 == 0 && n_dims <= ne0);

    const int n_f = n_dims / 2;
    GGML_ASSERT(n_f <= GGML_DPE_MAX_F);

    const int64_t n_head_kv = src2->ne[1];
    const int64_t n_group   = ne01 / n_head_kv; // query heads per KV head
    GGML_ASSERT(n_group * n_head_kv == ne01);

    const float   * freq_factors = src3 ? (const float *) src3->data : NULL;
    const int32_t * pos          = (const int32_t *) src1->data;

    // per-frequency rates: the same for every row (double: see ggml-dpe-impl.h)
    const float theta_scale = powf(freq_base, -2.0f/n_dims);
    float corr_dims[2];
    ggml_rope_yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow, corr_dims);

    double rate[GGML_DPE_MAX_F];
    for (int f = 0; f < n_f; f++) {
        const float ff = freq_factors ? freq_factors[f] : 1.0f;
        rate[f] = ggml_dpe_rate(f, theta_scale, ff, freq_scale, ext_factor, corr_dims[0], corr_dims[1]);
    }

    // (cos, sin) per frequency for the current (token, KV head); rot[f] == 0: delta 0, copy the pair.
    // The angle depends on (pos, s, f) only: cache_s[f] remembers the divisor the entry was computed for, so
    // KV heads that share a divisor (s_g or 1 per frequency in DPE tables) reuse it within a token.
    float   cache[2*GGML_DPE_MAX_F];
    uint8_t rot[GGML_DPE_MAX_F];
    int32_t cache_s[GGML_DPE_MAX_F];
    int64_t cache_i2 = -1;
    int64_t cache_hk = -1;

    // NORMAL: pair (2f, 2f+1); NEOX: pair (f, f + n_dims/2)
    const int64_t pair_step = mode == GGML_ROPE_TYPE_NEOX ? 1      : 2;
    const int64_t pair_offs = mode == GGML_ROPE_TYPE_NEOX ? n_f    : 1;

    const int64_t nr  = ne1*ne2*ne3;
    const int     ith = params->ith;
    const int     nth = params->nth;
    const int64_t dr  = (nr + nth - 1)/nth;
    const int64_t ir0 = dr*ith;
    const int64_t ir1 = MIN(ir0 + dr, nr);

    // The rotation of delta d is E(B*a) * E(b) with d = B*a + b, 0 <= b < B, B = GGML_DPE_ANGLE_B, and
    // E(x) = (cos, sin) of x*theta_f formed like a direct angle (double, reduced, float sin/cos): one complex
    // product more (~1.2e-7). B is fixed, so a row's rotation does not depend on how rows are split into
    // ubatches or threads (same logits for any n_ubatch and thread count, as stock). Dense rows (the window's
    // keys, a long prompt) take E from per-(f, s) tables: span/B + B sin/cos per (f, s) instead of 2 per row.
    struct angle_table { int32_t s; int64_t a_lo, n_hi; size_t off; }; // E(B*(a_lo + k)) then E(b)
    static thread_local std::vector<float>       tab_data;
    static thread_local std::vector<angle_table> tabs;   // [f*n_head_kv + k], k < n_tabs[f]
    int32_t n_tabs[GGML_DPE_MAX_F] = { 0 };
    tab_data.clear();
    tabs.resize((size_t) n_f*n_head_kv);
    {
        int64_t n_tok = 0;
        int32_t p_min = INT32_MAX;
        int32_t p_max = INT32_MIN;
        for (int64_t ir = ir0; ir < ir1; ir = (ir/ne1 + 1)*ne1) {
            const int32_t p = pos[(ir/ne1) % ne2];
            p_min = MIN(p_min, p);
            p_max = MAX(p_max, p);
            n_tok++;
        }
        for (int f = 0; n_tok >= 64 && f < n_f; f++) {
            for (int64_t hk = 0; hk < n_head_kv; hk++) {
                const int32_t sv = (int32_t) ((const float *) ((const char *) src2->data + hk*src2->nb[1]))[f];
                bool seen = sv <= 1; // divisor 1: delta 0, nothing to rotate
                for (int k = 0; k < n_tabs[f]; k++) {
                    seen = seen || tabs[f*n_head_kv + k].s == sv;
                }
                if (seen) {
                    continue;
                }
                // delta is monotone in the position for every kind: its range is that of the ends
                const int64_t da   = ggml_dpe_delta_kind(p_min, sv, window, kind);
                const int64_t db   = ggml_dpe_delta_kind(p_max, sv, window, kind);
                const int64_t a_lo = dpe_floor_div64(MIN(da, db), GGML_DPE_ANGLE_B);
                const int64_t n_hi = dpe_floor_div64(MAX(da, db), GGML_DPE_ANGLE_B) - a_lo + 1;
                if (n_hi + GGML_DPE_ANGLE_B > n_tok) {
                    continue; // too spread out: E per row is cheaper
                }
                const angle_table t = { sv, a_lo, n_hi, tab_data.size() };
                tab_data.resize(tab_data.size() + 2*(n_hi + GGML_DPE_ANGLE_B));
                float * hi = tab_data.data() + t.off;
                float * lo = hi + 2*n_hi;
                for (int64_t a = 0; a < n_hi; a++) {
                    const float theta = ggml_dpe_angle((a_lo + a)*GGML_DPE_ANGLE_B, rate[f]);
                    hi[2*a + 0] = cosf(theta);
                    hi[2*a + 1] = sinf(theta);
                }
                for (int64_t b = 0; b < GGML_DPE_ANGLE_B; b++) {
                    const float theta = ggml_dpe_angle(b, rate[f]);
                    lo[2*b + 0] = cosf(theta);
                    lo[2*b + 1] = sinf(theta);
                }
                tabs[f*n_head_kv + n_tabs[f]++] = t;
            }
        }
    }

    // per (KV head, f): the divisor, its reciprocal (floor(p/s) without a division per row), and its angle table
    struct head_freq { int32_t s; double inv_s; const angle_table * t; };
    static thread_local std::vector<head_freq> hf;
    hf.resize((size_t) n_head_kv*n_f);
    for (int64_t hk = 0; hk < n_head_kv; hk++) {
        const float * sigma = (const float *) ((const char *) src2->data + hk*src2->nb[1]);
        for (int f = 0; f < n_f; f++) {
            const int32_t sv = (int32_t) sigma[f];
            GGML_ASSERT(sv >= 1 && "rope_dpe: divisors must be >= 1");
            const angle_table * t = nullptr;
            for (int k = 0; k < n_tabs[f]; k++) {
                t = tabs[f*n_head_kv + k].s == sv ? &tabs[f*n_head_kv + k] : t;
            }
            hf[hk*n_f + f] = { sv, 1.0/sv, t };
        }
    }
    // floor(p/s), exactly: the double estimate is off by at most one either way
    auto floor_div = [](int32_t p, int32_t s, double inv_s) -> int64_t {
        int64_t q = (int64_t) floor((double) p*inv_s);
        q -= (q*s > p);
        q += ((q + 1)*s <= p);
        return q;
    };

    for (int64_t ir = ir0; ir < ir1; ir++) {
        const int64_t i3 = ir/(ne1*ne2);
        const int64_t i2 = (ir - i3*ne1*ne2)/ne1;
        const int64_t i1 = ir - i3*ne1*ne2 - i2*ne1;
        const int64_t hk = i1/n_group;

        if (i2 != cache_i2 || hk != cache_hk) {
            if (i2 != cache_i2) {
                memset(cache_s, 0, n_f*sizeof(int32_t));
            }
            const head_freq * hrow = hf.data() + hk*n_f;
            const int32_t p = pos[i2];
            for (int f = 0; f < n_f; f++) {
                const int32_t s = hrow[f].s;
                if (s == cache_s[f]) {
                    continue;
                }
                cache_s[f] = s;
                // ggml_dpe_delta_kind without its division (the same integers)
                int64_t delta = floor_div(p, s, hrow[f].inv_s);
                if (kind == GGML_ROPE_DPE_QUERY) {
                    delta += (int64_t) window - floor_div(window, s, hrow[f].inv_s);
                }
                delta -= p;
                if (kind == GGML_ROPE_DPE_KEY_INVERSE) {
                    delta = -delta;
                }
                rot[f] = delta != 0;
                if (!rot[f]) {
                    continue;
                }
                const angle_table * t = hrow[f].t;
                const int64_t a = dpe_floor_div64(delta, GGML_DPE_ANGLE_B);
                const int64_t b = delta - a*GGML_DPE_ANGLE_B;
                float hi[2];
                float lo[2];
                if (t != nullptr) {
                    memcpy(hi, tab_data.data() + t->off + 2*(a - t->a_lo), sizeof(hi));
                    memcpy(lo, tab_data.data() + t->off + 2*(t->n_hi + b), sizeof(lo));
                } else {
                    const float theta_hi = ggml_dpe_angle(a*GGML_DPE_ANGLE_B, rate[f]);
                    const float theta_lo = ggml_dpe_angle(b, rate[f]);
                    hi[0] = cosf(theta_hi); hi[1] = sinf(theta_hi);
                    lo[0] = cosf(theta_lo); lo[1] = sinf(theta_lo);
                }
                cache[2*f + 0] = hi[0]*lo[0] - hi[1]*lo[1];
                cache[2*f + 1] = hi[1]*lo[0] + hi[0]*lo[1];
            }
            cache_i2 = i2;
            cache_hk = hk;
        }

        const float * x = (const float *) ((const char *) src0->data + i3*nb03 + i2*nb02 + i1*nb01);
        float       * y = (float       *) ((char       *)  dst->data + i3*nb3  + i2*nb2  + i1*nb1);

        for (int f = 0; f < n_f; f++) {
            const int64_t i0 = f*pair_step;
            const float x0 = x[i0];
            const float x1 = x[i0 + pair_offs];
            if (rot[f]) {
                const float c = cache[2*f + 0];
                const float s = cache[2*f + 1];
                y[i0]             = x0*c - x1*s;
                y[i0 + pair_offs] = x0*s + x1*c;
            } else {
                y[i0]             = x0;
                y[i0 + pair_offs] = x1;
            }
        }
        for (int64_t i0 = n_dims; i0 < ne0; i0++) {
            y[i0] = x[i0];
        }
    }
}

void ggml_compute_forward_dpe_near_scores(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_tensor * kq_near = dst->src[1];
    const int32_t * idx     = (const int32_t *) dst->src[2]->data;
    const int32_t * pos_win = (const int32_t *) dst->src[3]->data;
    const int32_t * pos_q   = (const int32_t *) dst->src[4]->data;
    const int32_t   window  = ((const int32_t *) dst->op_params)[0];

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && kq_near->type == GGML_TYPE_F32);

    const int64_t n_kv  = dst->ne[0];
    const int64_t n_win = kq_near->ne[0];
    const int64_t n_tps = dst->ne[1];
    const int64_t n_h   = dst->ne[2];
    const int64_t nr    = n_tps*n_h*dst->ne[3];

    const int64_t dr  = (nr + params->nth - 1)/params->nth;
    const int64_t ir0 = dr*params->ith;
    const int64_t ir1 = MIN(ir0 + dr, nr);

    for (int64_t ir = ir0; ir < ir1; ir++) {
        const int64_t s  = ir/(n_tps*n_h);
        const int64_t h  = (ir - s*n_tps*n_h)/n_tps;
        const int64_t i  = ir - s*n_tps*n_h - h*n_tps;
        const int64_t pq = pos_q[s*n_tps + i];

        float       * y = (float       *) ((char       *) dst->data     + i*dst->nb[1]     + h*dst->nb[2]     + s*dst->nb[3]);
        const float * x = (const float *) ((const char *) kq_near->data + i*kq_near->nb[1] + h*kq_near->nb[2] + s*kq_near->nb[3]);
        const int32_t * ids = idx     + s*n_win;
        const int32_t * pw  = pos_win + s*n_win;
        for (int64_t j = 0; j < n_win; j++) {
            const int64_t r = pq - pw[j];
            if (r >= 0 && r < window) {
                GGML_ASSERT(ids[j] >= 0 && ids[j] < n_kv);
                y[ids[j]] = x[j];
            }
        }
    }
}
