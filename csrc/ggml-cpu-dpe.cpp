// GGML_OP_ROPE_DPE and GGML_OP_DPE_NEAR_SCORES on the CPU (compiled into ggml-cpu). Semantics: ggml-dpe.h; rope arithmetic: ggml-dpe-impl.h.
#include "ggml-dpe.h"
#include "ggml-dpe-impl.h"

#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ops.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#define GGML_DPE_ANGLE_B 64 // see the angle tables in ggml_compute_forward_rope_dpe

static inline int64_t dpe_floor_div64(int64_t a, int64_t b) { // b >= 1
    return a >= 0 ? a/b : -((-a + b - 1)/b);
}

// What one part of a GGML_OP_ROPE_DPE node needs: output rows [r_begin, r_end) of one shift kind (QUERY_PAIR has
// two parts, one per half; every other kind one).
struct rope_dpe_part {
    const ggml_tensor * src0, * src2, * dst;
    const int32_t * pos, * rows;     // rows: NULL, or the cache cell of each (slot, stream)
    const double  * rate;            // [n_f]
    int     n_dims, n_f, window, shift_kind;
    int64_t n_head_kv, n_group;
    float   mscale;                  // full shift kinds: ggml_rope_ext's magnitude factor
    int64_t r_begin, r_end;
};

static void rope_dpe_compute_part(const struct ggml_compute_params * params, const rope_dpe_part & P) {
    const ggml_tensor * src0 = P.src0;
    const ggml_tensor * src2 = P.src2;
    const ggml_tensor * dst  = P.dst;
    const int32_t * pos  = P.pos;
    const int32_t * rows = P.rows;
    const double  * rate = P.rate;
    const int n_dims = P.n_dims, n_f = P.n_f, window = P.window, kind = P.shift_kind;
    const int64_t n_head_kv = P.n_head_kv, n_group = P.n_group;
    const bool    full = ggml_dpe_shift_is_full(kind);
    const float   mscale = P.mscale;
    const bool    pair_src = dst->ne[3] != src0->ne[3]; // QUERY_PAIR: both halves read i3 = 0

    const int64_t ne0 = dst->ne[0], ne1 = dst->ne[1], ne2 = dst->ne[2];
    const size_t  nb01 = src0->nb[1], nb02 = src0->nb[2], nb03 = src0->nb[3];
    const size_t  nb1 = dst->nb[1], nb2 = dst->nb[2], nb3 = dst->nb[3];
    const bool    src_f16 = src0->type == GGML_TYPE_F16;

    // the position a row (i2, i3) is rotated at: per token, or per (slot, stream) with rows
    auto pos_index = [&](int64_t i2, int64_t i3) -> int64_t { return rows ? i3*ne2 + i2 : i2; };

    // (cos, sin) per (KV head, frequency) at the current position; rot == 0: delta 0, copy the pair. The angle
    // depends on (pos, s, f) only, so KV heads that share a divisor (s_g or 1 per frequency in DPE tables) share
    // an entry, and consecutive rows at one position (its heads; the window's padding slots, all at INT32_MAX)
    // share the whole cache.
    static thread_local std::vector<float>   cache_cs; // [hk][f][2]
    static thread_local std::vector<uint8_t> cache_rot; // [hk][f]
    cache_cs.resize((size_t) 2*n_head_kv*n_f);
    cache_rot.resize((size_t) n_head_kv*n_f);
    int64_t cache_p = INT64_MIN;

    // NORMAL: pair (2f, 2f+1); NEOX: pair (f, f + n_dims/2)
    const int64_t pair_step = ggml_get_op_params_i32(dst, GGML_ROPE_DPE_P_MODE) == GGML_ROPE_TYPE_NEOX ? 1   : 2;
    const int64_t pair_offs = pair_step == 1 ? n_f : 1;

    const int64_t nr  = P.r_end - P.r_begin;
    const int     ith = params->ith;
    const int     nth = params->nth;
    const int64_t dr  = (nr + nth - 1)/nth;
    const int64_t ir0 = P.r_begin + dr*ith;
    const int64_t ir1 = MIN(ir0 + dr, P.r_end);
    if (ir0 >= ir1) {
        return;
    }

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
            const int64_t i3 = ir/(ne1*ne2);
            const int32_t p  = pos[pos_index((ir/ne1) % ne2, i3)];
            p_min = MIN(p_min, p);
            p_max = MAX(p_max, p);
            n_tok++;
        }
        for (int f = 0; n_tok >= 64 && f < n_f; f++) {
            for (int64_t hk = 0; hk < n_head_kv; hk++) {
                const int32_t sv = (int32_t) ((const float *) ((const char *) src2->data + hk*src2->nb[1]))[f];
                bool seen = sv <= 1 && !full; // divisor 1 of a delta kind: delta 0, nothing to rotate
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

    // per (KV head, f): the divisor, its reciprocal (floor(p/s) without a division per row), its angle table, and
    // the first KV head with the same divisor at f (whose angle this head shares)
    struct head_freq { int32_t s; double inv_s; const angle_table * t; int64_t first; };
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
            int64_t first = hk;
            for (int64_t h2 = hk - 1; h2 >= 0; h2--) {
                first = hf[h2*n_f + f].s == sv ? h2 : first;
            }
            hf[hk*n_f + f] = { sv, 1.0/sv, t, first };
        }
    }
    // floor(p/s), exactly: the double estimate is off by at most one either way
    auto floor_div = [](int32_t p, int32_t s, double inv_s) -> int64_t {
        int64_t q = (int64_t) floor((double) p*inv_s);
        q -= (q*s > p);
        q += ((q + 1)*s <= p);
        return q;
    };

    // the thread_local buffers through plain pointers (a thread_local in a shared library costs a
    // __tls_get_addr call per access otherwise: 2% of decode time)
    const head_freq * hfp  = hf.data();
    const float     * tabp = tab_data.data();
    float           * ccs  = cache_cs.data();
    uint8_t         * crot = cache_rot.data();

    std::vector<float> row_f32(src_f16 ? ne0 : 0);
    for (int64_t ir = ir0; ir < ir1; ir++) {
        const int64_t i3 = ir/(ne1*ne2);
        const int64_t i2 = (ir - i3*ne1*ne2)/ne1;
        const int64_t i1 = ir - i3*ne1*ne2 - i2*ne1;
        const int64_t hk = i1/n_group;
        const int64_t pi = pos_index(i2, i3);
        const int32_t p  = pos[pi];

        if (p != cache_p) {
            for (int64_t h = 0; h < n_head_kv; h++) {
                const head_freq * hrow = hfp + h*n_f;
                float   * cs  = ccs + 2*h*n_f;
                uint8_t * rot = crot + h*n_f;
                for (int f = 0; f < n_f; f++) {
                    const int32_t s     = hrow[f].s;
                    const int64_t first = hrow[f].first;
                    if (first != h) { // computed for an earlier KV head
                        rot[f]      = crot[first*n_f + f];
                        cs[2*f + 0] = ccs[2*(first*n_f + f) + 0];
                        cs[2*f + 1] = ccs[2*(first*n_f + f) + 1];
                        continue;
                    }
                    // ggml_dpe_delta_kind without its divisions (the same integers)
                    const int64_t delta = ggml_dpe_shift_from(floor_div(p, s, hrow[f].inv_s),
                                                              floor_div(window, s, hrow[f].inv_s), p, window, kind);
                    rot[f] = delta != 0 || full;
                    if (!rot[f]) {
                        continue;
                    }
                    const angle_table * t = hrow[f].t;
                    const int64_t a = dpe_floor_div64(delta, GGML_DPE_ANGLE_B);
                    const int64_t b = delta - a*GGML_DPE_ANGLE_B;
                    float hi[2];
                    float lo[2];
                    if (t != nullptr) {
                        memcpy(hi, tabp + t->off + 2*(a - t->a_lo), sizeof(hi));
                        memcpy(lo, tabp + t->off + 2*(t->n_hi + b), sizeof(lo));
                    } else {
                        const float theta_hi = ggml_dpe_angle(a*GGML_DPE_ANGLE_B, rate[f]);
                        const float theta_lo = ggml_dpe_angle(b, rate[f]);
                        hi[0] = cosf(theta_hi); hi[1] = sinf(theta_hi);
                        lo[0] = cosf(theta_lo); lo[1] = sinf(theta_lo);
                    }
                    cs[2*f + 0] = hi[0]*lo[0] - hi[1]*lo[1];
                    cs[2*f + 1] = hi[1]*lo[0] + hi[0]*lo[1];
                    if (full) {
                        cs[2*f + 0] *= mscale;
                        cs[2*f + 1] *= mscale;
                    }
                }
            }
            cache_p = p;
        }
        const float   * cache = ccs + 2*hk*n_f;
        const uint8_t * rot   = crot + hk*n_f;

        const int64_t src_i2 = rows ? rows[pi] : i2;
        const int64_t src_i3 = pair_src ? 0 : i3;
        const char * xr = (const char *) src0->data + src_i3*nb03 + src_i2*nb02 + i1*nb01;
        const float * x = (const float *) xr;
        if (src_f16) {
            ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) xr, row_f32.data(), ne0);
            x = row_f32.data();
        }
        float * y = (float *) ((char *) dst->data + i3*nb3 + i2*nb2 + i1*nb1);

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

// GGML_ROPE_DPE_KEY_WRITE (ggml_rope_dpe_key_write): each thread takes a range of tokens, rotates their keys
// with rope_dpe_compute_part as a KEY_FULL node would, writes them to their cache rows as ggml_set_rows converts
// them, and, with a store, rotates what the cache now holds back with rope_dpe_compute_part as a KEY_INVERSE node
// with rows would, into the tokens' store slots. The same functions on the same values: the same bits.
static void rope_dpe_key_write(const struct ggml_compute_params * params, struct ggml_tensor * dst,
                               rope_dpe_part part) {
    const ggml_tensor * a     = dst->src[0];
    const ggml_tensor * cache = dst->src[5];
    const int64_t     * idx   = (const int64_t *) dst->src[6]->data;
    const ggml_tensor * store = dst->src[7];
    const int64_t     * slot  = store ? (const int64_t *) dst->src[8]->data : nullptr;

    const int64_t d = a->ne[0], nh = a->ne[1], nt = a->ne[2];
    const int64_t per = (nt + params->nth - 1)/params->nth;
    const int64_t t0  = per*params->ith;
    const int64_t t1  = MIN(t0 + per, nt);
    if (t0 >= t1) {
        return;
    }
    const int64_t n = t1 - t0;

    static thread_local std::vector<float> far_buf, ord_buf;
    far_buf.resize((size_t) d*nh*n);

    // this thread's tokens as a node of their own (one thread), F32 [d, nh, n] out
    ggml_tensor src = *a;
    src.data  = (char *) a->data + t0*a->nb[2];
    src.ne[2] = n;
    ggml_tensor out = {};
    out.type  = GGML_TYPE_F32;
    out.ne[0] = d; out.ne[1] = nh; out.ne[2] = n; out.ne[3] = 1;
    out.nb[0] = sizeof(float);
    out.nb[1] = d*sizeof(float);
    out.nb[2] = d*nh*sizeof(float);
    out.nb[3] = d*nh*n*sizeof(float);
    memcpy(out.op_params, dst->op_params, sizeof(out.op_params));
    out.data = far_buf.data();
    const ggml_compute_params one = { 0, 1, params->wsize, params->wdata, params->threadpool, params->use_ref };

    part.src0       = &src;
    part.dst        = &out;
    part.pos        = (const int32_t *) dst->src[1]->data + t0;
    part.rows       = nullptr;
    part.shift_kind = GGML_ROPE_DPE_KEY_FULL;
    part.r_begin    = 0;
    part.r_end      = nh*n;
    rope_dpe_compute_part(&one, part);

    const bool f16 = cache->type == GGML_TYPE_F16;
    for (int64_t t = 0; t < n; t++) {
        char * row = (char *) cache->data + idx[t0 + t]*cache->nb[1];
        float * x  = far_buf.data() + t*d*nh;
        if (f16) {
            ggml_cpu_fp32_to_fp16(x, (ggml_fp16_t *) row, d*nh);
            ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, x, d*nh); // what the cache holds, as read back
        } else {
            memcpy(row, x, d*nh*sizeof(float));
        }
    }
    if (store == nullptr) {
        return;
    }

    ord_buf.resize((size_t) d*nh*n);
    ggml_tensor far = out;
    ggml_tensor ord = out;
    ord.data = ord_buf.data();
    part.src0       = &far;
    part.dst        = &ord;
    part.shift_kind = GGML_ROPE_DPE_KEY_INVERSE;
    rope_dpe_compute_part(&one, part);

    const int64_t n_tps = dst->src[8]->ne[0];
    for (int64_t t = 0; t < n; t++) {
        const int64_t tg = t0 + t;
        const int64_t s  = tg/n_tps;
        for (int64_t h = 0; h < nh; h++) {
            float * y = (float *) ((char *) store->data + slot[tg]*store->nb[1] + h*store->nb[2] + s*store->nb[3]);
            memcpy(y, ord_buf.data() + (t*nh + h)*d, d*sizeof(float));
        }
    }
}

void ggml_compute_forward_rope_dpe(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_tensor * src0 = dst->src[0]; // a
    const ggml_tensor * src1 = dst->src[1]; // pos
    const ggml_tensor * src2 = dst->src[2]; // table
    const ggml_tensor * src3 = dst->src[3]; // freq_factors or NULL
    const ggml_tensor * src4 = dst->src[4]; // rows or NULL

    const bool key_write = ggml_get_op_params_i32(dst, GGML_ROPE_DPE_P_KIND) == GGML_ROPE_DPE_KEY_WRITE;
    GGML_ASSERT((src0->type == GGML_TYPE_F32 || (src0->type == GGML_TYPE_F16 && src4 != nullptr)) &&
                (dst->type == GGML_TYPE_F32 || key_write));
    GGML_ASSERT(src1->type == GGML_TYPE_I32 && src2->type == GGML_TYPE_F32);
    GGML_ASSERT(src4 == nullptr || src4->type == GGML_TYPE_I32);

    const ggml_rope_dpe_op_params p = ggml_rope_dpe_get_op_params(dst);
    const int n_dims = p.n_dims;
    const int mode   = p.mode;

    GGML_ASSERT(mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX);
    GGML_ASSERT(src0->nb[0] == ggml_type_size(src0->type) && (dst->nb[0] == sizeof(float) || key_write));
    GGML_ASSERT(n_dims % 2 == 0 && n_dims <= dst->ne[0]);

    const int n_f = n_dims / 2;
    GGML_ASSERT(n_f <= GGML_DPE_MAX_F);

    const int64_t n_head_kv = src2->ne[1];
    const int64_t n_group   = src0->ne[1] / n_head_kv; // query heads per KV head
    GGML_ASSERT(n_group * n_head_kv == src0->ne[1]);

    // per-frequency rates: the same for every row (double: see ggml-dpe-impl.h)
    const float * freq_factors = src3 ? (const float *) src3->data : NULL;
    const float theta_scale = powf(p.freq_base, -2.0f/n_dims);
    float corr_dims[2];
    ggml_rope_yarn_corr_dims(n_dims, p.n_ctx_orig, p.freq_base, p.beta_fast, p.beta_slow, corr_dims);

    double rate[GGML_DPE_MAX_F];
    for (int f = 0; f < n_f; f++) {
        const float ff = freq_factors ? freq_factors[f] : 1.0f;
        rate[f] = ggml_dpe_rate(f, theta_scale, ff, p.freq_scale, p.ext_factor, corr_dims[0], corr_dims[1]);
    }

    rope_dpe_part part = { src0, src2, dst, (const int32_t *) src1->data,
                           src4 ? (const int32_t *) src4->data : nullptr, rate, n_dims, n_f, p.window, p.kind,
                           n_head_kv, n_group, ggml_dpe_mscale(p.attn_factor, p.freq_scale, p.ext_factor),
                           0, ggml_nrows(dst) };
    if (key_write) {
        rope_dpe_key_write(params, dst, part);
    } else if (p.kind == GGML_ROPE_DPE_QUERY_PAIR) {
        // each half of its own shift kind (every thread takes its share of each half)
        const int64_t half = ggml_nrows(dst)/2;
        for (int h = 0; h < 2; h++) {
            part.shift_kind = ggml_dpe_shift_kind(p.kind, h);
            part.r_begin    = h*half;
            part.r_end      = (h + 1)*half;
            rope_dpe_compute_part(params, part);
        }
    } else {
        rope_dpe_compute_part(params, part);
    }
}

void ggml_compute_forward_dpe_near_scores(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const ggml_tensor * kq      = dst->src[0];
    const ggml_tensor * kq_near = dst->src[1];
    const int32_t * idx     = (const int32_t *) dst->src[2]->data;
    const int32_t * pos_win = (const int32_t *) dst->src[3]->data;
    const int32_t * pos_q   = (const int32_t *) dst->src[4]->data;
    const int32_t   window  = ((const int32_t *) dst->op_params)[0];
    const int32_t   S       = ((const int32_t *) dst->op_params)[1]; // 0, or the slots of a store of keys by cell

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && kq_near->type == GGML_TYPE_F32);

    const int64_t n_kv  = dst->ne[0];
    const int64_t n_win = dst->src[2]->ne[0];
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
        if (n_kv > kq->ne[0]) {
            // a wider matrix than kq (ggml_dpe_near_scores made a new one): kq's far scores, then zeros
            const float * f = (const float *) ((const char *) kq->data + i*kq->nb[1] + h*kq->nb[2] + s*kq->nb[3]);
            memcpy(y, f, kq->ne[0]*sizeof(float));
            memset(y + kq->ne[0], 0, (n_kv - kq->ne[0])*sizeof(float));
        }
        for (int64_t j = 0; j < n_win; j++) {
            const int64_t r = pq - pw[j];
            if (r >= 0 && r < window) {
                GGML_ASSERT(ids[j] >= 0 && ids[j] < n_kv);
                y[ids[j]] = x[S > 0 ? ids[j] % S : j];
            }
        }
    }
}
