// GGML_OP_DPE_FLASH_ATTN on the CPU (compiled into ggml-cpu). Semantics: ggml-dpe.h (ggml_dpe_flash_attn).
//
// One online softmax per query row over every cell of the cache, each (query, cell) pair scored once: near
// (q . k_win[slot], ordinary RoPE) where the cell is a window slot with 0 <= pos_q - pos_win < window, far
// (q_far . k[cell], the cache's far keys) everywhere else; stock's mask, scale, softcap, ALiBi slope and sinks
// as GGML_OP_FLASH_ATTN_EXT. The paths follow stock's CPU flash attention (ggml-cpu/ops.cpp):
//
// - decode (one query row, one stream, n_kv >= 512): the cells are split across threads, each thread keeps
//   (max, sum, unnormalised output) per head, and the partials are merged exactly after a barrier;
// - prefill (F16 or F32 K and V, at least GGML_FA_TILE_Q rows): tiles of GGML_FA_TILE_Q query rows by
//   GGML_FA_TILE_KV cells with stock's SIMD GEMM. A tile whose unmasked pairs are all far or all near computes
//   one GEMM (with q_far or q); only tiles that straddle the window's edge compute both and select per pair;
// - otherwise (quantized K, few rows): one row at a time, with the K type's own vec_dot for far cells.
//
// The window slots of a stream list their cells in ascending order (padding slots, with position INT32_MAX,
// after them): the engine builds them so (csrc/llama-dpe-engine.cpp), and the kernel checks it. A cell's slot
// is then found by walking the list alongside the cells.
#include "ggml-dpe.h"

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "common.h"
#include "ops.h"
#include "simd-gemm.h"
#include "vec.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

struct dpe_fa {
    const ggml_tensor * q, * q_far, * k, * v, * mask, * k_win, * sinks;
    const int32_t * idx, * pos_win, * pos_q;
    int64_t DK, DV, n_tps, n_head, n_stream, n_kv, n_win, rk2, rv2;
    float   scale, softcap, max_bias, m0, m1;
    int32_t window, kw_slots; // kw_slots > 0: slot j's key is row idx[j] % kw_slots of k_win (a store)
    uint32_t n_head_log2;
    ggml_from_float_t q_to_vec_dot;
    ggml_vec_dot_t    kq_vec_dot;
    ggml_to_float_t   v_to_float;

    float slope(int64_t h) const {
        if (max_bias <= 0.0f) {
            return 1.0f;
        }
        return h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - n_head_log2) + 1);
    }
    const float * q_row(const ggml_tensor * t, int64_t i1, int64_t h, int64_t s) const {
        return (const float *) ((const char *) t->data + i1*t->nb[1] + h*t->nb[2] + s*t->nb[3]);
    }
    const char * k_row(int64_t c, int64_t h, int64_t s) const {
        return (const char *) k->data + c*k->nb[1] + (h/rk2)*k->nb[2] + s*k->nb[3];
    }
    const char * v_row(int64_t c, int64_t h, int64_t s) const {
        return (const char *) v->data + c*v->nb[1] + (h/rv2)*v->nb[2] + s*v->nb[3];
    }
    const float * kw_row(int64_t slot, int64_t h, int64_t s) const {
        const int64_t r = kw_slots > 0 ? idx[s*n_win + slot] % kw_slots : slot;
        return (const float *) ((const char *) k_win->data + r*k_win->nb[1] + (h/rk2)*k_win->nb[2] + s*k_win->nb[3]);
    }
    const ggml_fp16_t * mask_row(int64_t i1, int64_t h, int64_t s) const {
        return mask ? (const ggml_fp16_t *) ((const char *) mask->data + i1*mask->nb[1] + (h % mask->ne[2])*mask->nb[2] +
                                             (s % mask->ne[3])*mask->nb[3])
                    : nullptr;
    }
    // the number of real window slots of stream s (their cells ascend; padding follows)
    int64_t n_valid(int64_t s) const {
        const int32_t * ids = idx + s*n_win;
        const int32_t * pw  = pos_win + s*n_win;
        int64_t n = 0;
        while (n < n_win && pw[n] != INT32_MAX) {
            GGML_ASSERT(ids[n] >= 0 && ids[n] < n_kv && "dpe_flash_attn: window slot outside the cache");
            GGML_ASSERT((n == 0 || ids[n] > ids[n - 1]) && "dpe_flash_attn: window cells must ascend");
            ++n;
        }
        return n;
    }
};

// Online softmax state of one query row: adds the score s (scaled, masked) of a cell with value row vr.
struct dpe_fa_acc {
    float M = -INFINITY, S = 0.0f;
};

// y += v * x for F16 x, in F32 (one call per cell: inline, with the CPU's F16 conversion instruction)
static inline void dpe_vec_mad_f16_f32(int64_t n, float * y, const ggml_fp16_t * x, float v) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 vv = _mm512_set1_ps(v);
    for (; i + 16 <= n; i += 16) {
        const __m512 xv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (x + i)));
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(xv, vv, _mm512_loadu_ps(y + i)));
    }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    const __m256 vv = _mm256_set1_ps(v);
    for (; i + 8 <= n; i += 8) {
        const __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(xv, vv, _mm256_loadu_ps(y + i)));
    }
#endif
    for (; i < n; ++i) {
        y[i] += v*GGML_CPU_FP16_TO_FP32(x[i]);
    }
}

// The largest of x[0 .. n) (no NaN among them), with several independent maxima in flight: ggml_vec_max_f32 is
// one chain of dependent scalar maxima, which cost a tile as much as its two GEMMs (perf, pp512 at depth 4096).
// The maximum of a set does not depend on the order it is taken in.
static inline float dpe_max_f32(const float * x, int64_t n) {
    int64_t i = 0;
    float m = -INFINITY;
#if defined(__AVX512F__)
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
    }
    for (; i + 16 <= n; i += 16) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    }
    m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
#elif defined(__AVX__)
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    for (; i + 16 <= n; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_max_ps(m0, m1));
    for (int k = 0; k < 8; ++k) {
        m = std::max(m, t[k]);
    }
#else
    float t[4] = { -INFINITY, -INFINITY, -INFINITY, -INFINITY };
    for (; i + 4 <= n; i += 4) {
        for (int k = 0; k < 4; ++k) {
            t[k] = std::max(t[k], x[i + k]);
        }
    }
    m = std::max(std::max(t[0], t[1]), std::max(t[2], t[3]));
#endif
    for (; i < n; ++i) {
        m = std::max(m, x[i]);
    }
    return m;
}

// whether any of n F16 mask values is not -inf (0xfc00): an OR of integers, which the compiler vectorises
static inline bool dpe_mask_any(const ggml_fp16_t * m, int64_t n) {
    uint16_t seen = 0;
    for (int64_t i = 0; i < n; ++i) {
        seen |= (uint16_t) (m[i] ^ 0xfc00);
    }
    return seen != 0;
}

// Values accumulate in F32 (stock's one-row path accumulates F16 values in F16; F32 is more exact at the
// same speed).
static inline void dpe_fa_add(const dpe_fa & a, dpe_fa_acc & acc, float s, const char * vr, float * VKQ, float * V32) {
    const float Mold = acc.M;
    float ms = 1.0f;
    float vs = 1.0f;
    if (s > acc.M) {
        acc.M = s;
        ms = expf(Mold - acc.M);
        ggml_vec_scale_f32(a.DV, VKQ, ms);
    } else {
        vs = expf(s - acc.M);
    }
    if (a.v->type == GGML_TYPE_F16) {
        dpe_vec_mad_f16_f32(a.DV, VKQ, (const ggml_fp16_t *) vr, vs);
    } else if (a.v->type == GGML_TYPE_F32) {
        ggml_vec_mad_f32(a.DV, VKQ, (const float *) vr, vs);
    } else {
        a.v_to_float(vr, V32, a.DV);
        ggml_vec_mad_f32(a.DV, VKQ, V32, vs);
    }
    acc.S = acc.S*ms + vs;
}

// Cells [c0, c1) for query row (i1, h, s), one dot product per cell. Qf_q: q_far converted to K's vec_dot type.
// VKQ (DV floats, zeroed by the caller) accumulates the unnormalised output; V32 is DV floats of scratch.
static void dpe_fa_row(const dpe_fa & a, int64_t i1, int64_t h, int64_t s, int64_t c0, int64_t c1, int64_t n_valid,
                       const void * Qf_q, float * VKQ, float * V32, dpe_fa_acc & acc) {
    const float   sl  = a.slope(h);
    const float * qn  = a.q_row(a.q, i1, h, s);
    const int32_t pq  = a.pos_q[s*a.n_tps + i1];
    const int32_t * ids = a.idx + s*a.n_win;
    const int32_t * pw  = a.pos_win + s*a.n_win;
    const ggml_fp16_t * mp = a.mask_row(i1, h, s);

    int64_t w = std::lower_bound(ids, ids + n_valid, (int32_t) c0) - ids; // first slot at or after c0
    for (int64_t c = c0; c < c1; ++c) {
        while (w < n_valid && ids[w] < c) {
            ++w;
        }
        const float mv = mp ? sl*GGML_CPU_FP16_TO_FP32(mp[c]) : 0.0f;
        if (mv == -INFINITY) {
            continue;
        }
        const bool near = w < n_valid && ids[w] == c && pq - pw[w] >= 0 && pq - pw[w] < a.window;
        float sc;
        if (near) {
            ggml_vec_dot_f32(a.DK, &sc, 0, a.kw_row(w, h, s), 0, qn, 0, 1);
        } else {
            a.kq_vec_dot(a.DK, &sc, 0, a.k_row(c, h, s), 0, Qf_q, 0, 1);
        }
        sc *= a.scale;
        if (a.softcap != 0.0f) {
            sc = a.softcap*tanhf(sc);
        }
        dpe_fa_add(a, acc, sc + mv, a.v_row(c, h, s), VKQ, V32);
    }
}

static void dpe_fa_sink(const dpe_fa & a, int64_t h, dpe_fa_acc & acc, float * VKQ) {
    if (!a.sinks) {
        return;
    }
    const float s = ((const float *) a.sinks->data)[h];
    float ms = 1.0f;
    float vs = 1.0f;
    if (s > acc.M) {
        ms = expf(acc.M - s);
        acc.M = s;
        ggml_vec_scale_f32(a.DV, VKQ, ms);
    } else {
        vs = expf(s - acc.M);
    }
    acc.S = acc.S*ms + vs;
}

static void dpe_fa_store(const dpe_fa & a, ggml_tensor * dst, int64_t i1, int64_t h, int64_t s, float S, float * VKQ) {
    ggml_vec_scale_f32(a.DV, VKQ, S == 0.0f ? 0.0f : 1.0f/S);
    // dst [DV, n_head, n_tps, n_stream]
    memcpy((char *) dst->data + (s*a.n_tps*a.n_head + h + i1*a.n_head)*dst->nb[1], VKQ, a.DV*sizeof(float));
}

constexpr int64_t QT = ggml_fa_tile_config::Q;
constexpr int64_t KT = ggml_fa_tile_config::KV;

// floats of per-thread scratch of each path
static int64_t dpe_fa_row_scratch(int64_t DK, int64_t DV) { return DK + 2*DV + CACHE_LINE_SIZE_F32; }
static int64_t dpe_fa_tile_scratch(int64_t DK, int64_t DV) {
    return 2*QT*DK + 4*QT*KT + QT*DV + KT*DV + 3*KT*DK + KT + CACHE_LINE_SIZE_F32;
}

// Q tile: rows [i1, i1 + rows) of head h, stream s (rows <= QT)
static void dpe_fa_tile(const dpe_fa & a, ggml_tensor * dst, float * base, int64_t i1, int64_t rows, int64_t h, int64_t s,
                        int64_t n_valid) {
    float * Qn    = base;
    float * Qf    = Qn + QT*a.DK;
    float * KQ    = Qf + QT*a.DK;
    float * KQn   = KQ + QT*KT;
    float * mask32 = KQn + QT*KT;
    float * sel   = mask32 + QT*KT;  // 1: near
    float * VKQ   = sel + QT*KT;
    float * V32   = VKQ + QT*a.DV;
    float * Kf    = V32 + KT*a.DV;
    float * Kn    = Kf + KT*a.DK;
    float * Kr    = Kn + KT*a.DK;   // [KT][DK] the tile's far keys as F32 rows, before the transposition
    int32_t * slot = (int32_t *) (Kr + KT*a.DK);

    const float sl = a.slope(h);
    const int32_t * ids = a.idx + s*a.n_win;
    const int32_t * pw  = a.pos_win + s*a.n_win;
    const int32_t * pq  = a.pos_q + s*a.n_tps + i1;

    float M[QT];
    float S[QT];
    for (int64_t t = 0; t < QT; ++t) {
        M[t] = -INFINITY;
        S[t] = 0.0f;
    }
    memset(VKQ, 0, QT*a.DV*sizeof(float));
    for (int64_t t = 0; t < QT; ++t) {
        if (t < rows) {
            memcpy(Qn + t*a.DK, a.q_row(a.q, i1 + t, h, s), a.DK*sizeof(float));
            memcpy(Qf + t*a.DK, a.q_row(a.q_far, i1 + t, h, s), a.DK*sizeof(float));
        } else {
            memset(Qn + t*a.DK, 0, a.DK*sizeof(float));
            memset(Qf + t*a.DK, 0, a.DK*sizeof(float));
        }
    }
    memset(Kf, 0, KT*a.DK*sizeof(float));
    memset(Kn, 0, KT*a.DK*sizeof(float));
    memset(V32, 0, KT*a.DV*sizeof(float));
    // rows past the tile's rows: masked in every KV tile
    std::fill(mask32 + rows*KT, mask32 + QT*KT, -INFINITY);

    int32_t pq_min = INT32_MAX, pq_max = INT32_MIN;
    for (int64_t r = 0; r < rows; ++r) {
        pq_min = std::min(pq_min, pq[r]);
        pq_max = std::max(pq_max, pq[r]);
    }

    const bool f16 = a.k->type == GGML_TYPE_F16;
    int64_t w = 0; // window cursor: first slot whose cell is >= the tile's first cell

    for (int64_t c0 = 0; c0 < a.n_kv; c0 += KT) {
        const int64_t nc = std::min(KT, a.n_kv - c0);

        // mask, and which pairs are near
        for (int64_t t = 0; t < nc; ++t) {
            while (w < n_valid && ids[w] < c0 + t) {
                ++w;
            }
            slot[t] = (w < n_valid && ids[w] == c0 + t) ? (int32_t) w : -1;
        }
        // the tile is wholly far or wholly near when every (row, window cell) distance says so: then no
        // per-pair choice is needed (most tiles; only those on the window's edge straddle)
        int64_t n_wc = 0;
        int32_t pw_min = INT32_MAX, pw_max = INT32_MIN;
        for (int64_t t = 0; t < nc; ++t) {
            if (slot[t] >= 0) {
                ++n_wc;
                pw_min = std::min(pw_min, pw[slot[t]]);
                pw_max = std::max(pw_max, pw[slot[t]]);
            }
        }
        const bool all_far  = n_wc == 0 || (int64_t) pq_min - pw_max >= a.window || (int64_t) pq_max - pw_min < 0;
        const bool all_near = n_wc == nc && (int64_t) pq_min - pw_max >= 0 && (int64_t) pq_max - pw_min < a.window;

        // slope * mask (-inf for cells past the cache); whether any pair is visible (slope > 0: a pair is masked
        // exactly where its F16 mask value is -inf)
        bool any = !a.mask, any_near = false, any_far = false;
        for (int64_t r = 0; r < rows; ++r) {
            float * mr = mask32 + r*KT;
            if (a.mask) {
                const ggml_fp16_t * mp = a.mask_row(i1 + r, h, s) + c0;
                any = any || dpe_mask_any(mp, nc);
                ggml_cpu_fp16_to_fp32(mp, mr, nc);
                if (sl != 1.0f) {
                    ggml_vec_scale_f32(nc, mr, sl);
                }
            } else {
                std::fill(mr, mr + nc, 0.0f);
            }
            std::fill(mr + nc, mr + KT, -INFINITY);
        }
        if (!any) {
            continue;
        }
        if (all_far) {
            any_far = true;
        } else if (all_near) {
            any_near = true;
        } else {
            for (int64_t r = 0; r < QT; ++r) {
                for (int64_t t = 0; t < KT; ++t) {
                    bool near = false;
                    if (mask32[r*KT + t] != -INFINITY) {
                        near = slot[t] >= 0 && pq[r] - pw[slot[t]] >= 0 && pq[r] - pw[slot[t]] < a.window;
                        any_near = any_near || near;
                        any_far  = any_far || !near;
                    }
                    sel[r*KT + t] = near ? 1.0f : 0.0f;
                }
            }
        }

        // scores: far keys with q_far, window keys with q (K tiles transposed: [DK][KT])
        if (any_far) {
            // rows converted by the CPU's F16 instructions, then transposed (F32 to F32)
            for (int64_t t = 0; f16 && t < nc; ++t) {
                ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) a.k_row(c0 + t, h, s), Kr + t*a.DK, a.DK);
            }
            for (int64_t t = 0; t < nc; ++t) {
                const float * kt = f16 ? Kr + t*a.DK : (const float *) a.k_row(c0 + t, h, s);
                for (int64_t d = 0; d < a.DK; ++d) {
                    Kf[d*KT + t] = kt[d];
                }
            }
            memset(KQ, 0, QT*KT*sizeof(float));
            simd_gemm(KQ, Qf, Kf, QT, a.DK, KT);
        }
        if (any_near) {
            for (int64_t t = 0; t < KT; ++t) {
                const float * kr = (t < nc && slot[t] >= 0) ? a.kw_row(slot[t], h, s) : nullptr;
                for (int64_t d = 0; d < a.DK; ++d) {
                    Kn[d*KT + t] = kr ? kr[d] : 0.0f;
                }
            }
            memset(KQn, 0, QT*KT*sizeof(float));
            simd_gemm(KQn, Qn, Kn, QT, a.DK, KT);
            if (!any_far) {
                memcpy(KQ, KQn, QT*KT*sizeof(float));
            } else {
                for (int64_t e = 0; e < QT*KT; ++e) {
                    KQ[e] = sel[e] != 0.0f ? KQn[e] : KQ[e];
                }
            }
        }

        ggml_vec_scale_f32(QT*KT, KQ, a.scale);
        if (a.softcap != 0.0f) {
            ggml_vec_tanh_f32(QT*KT, KQ, KQ);
            ggml_vec_scale_f32(QT*KT, KQ, a.softcap);
        }
        ggml_vec_add_f32(QT*KT, KQ, KQ, mask32); // -inf for masked pairs, padded cells and padded rows

        for (int64_t r = 0; r < QT; ++r) {
            float * row = KQ + r*KT;
            const float tile_max = dpe_max_f32(row, KT);
            if (tile_max == -INFINITY) {
                memset(row, 0, KT*sizeof(float));
                continue;
            }
            const float Mnew = fmaxf(M[r], tile_max);
            if (Mnew > M[r]) {
                const float ms = expf(M[r] - Mnew);
                ggml_vec_scale_f32(a.DV, VKQ + r*a.DV, ms);
                S[r] *= ms;
            }
            M[r] = Mnew;
            S[r] += ggml_vec_soft_max_f32(KT, row, row, Mnew);
        }

        for (int64_t t = 0; t < nc; ++t) {
            const char * vr = a.v_row(c0 + t, h, s);
            if (f16) {
                ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) vr, V32 + t*a.DV, a.DV);
            } else {
                memcpy(V32 + t*a.DV, vr, a.DV*sizeof(float));
            }
        }
        if (nc < KT) {
            memset(V32 + nc*a.DV, 0, (KT - nc)*a.DV*sizeof(float));
        }
        simd_gemm(VKQ, KQ, V32, QT, KT, a.DV);
    }

    for (int64_t r = 0; r < rows; ++r) {
        dpe_fa_acc acc;
        acc.M = M[r];
        acc.S = S[r];
        dpe_fa_sink(a, h, acc, VKQ + r*a.DV);
        dpe_fa_store(a, dst, i1 + r, h, s, acc.S, VKQ + r*a.DV);
    }
}

} // namespace

size_t ggml_dpe_flash_attn_work_size(const struct ggml_tensor * node, int n_tasks) {
    const int64_t DK     = node->src[2]->ne[0];
    const int64_t DV     = node->src[3]->ne[0];
    const int64_t n_head = node->src[0]->ne[2];
    const int64_t rows   = n_tasks*dpe_fa_row_scratch(DK, DV) + n_head*n_tasks*(2 + DV); // + decode partials
    const int64_t tiles  = n_tasks*dpe_fa_tile_scratch(DK, DV);
    return sizeof(float)*std::max(rows, tiles);
}

void ggml_compute_forward_dpe_flash_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    dpe_fa a;
    a.q      = dst->src[0];
    a.q_far  = dst->src[1];
    a.k      = dst->src[2];
    a.v      = dst->src[3];
    a.mask   = dst->src[4];
    a.k_win  = dst->src[5];
    a.idx     = (const int32_t *) dst->src[6]->data;
    a.pos_win = (const int32_t *) dst->src[7]->data;
    a.pos_q   = (const int32_t *) dst->src[8]->data;
    a.sinks  = dst->src[9];

    GGML_ASSERT(a.q->type == GGML_TYPE_F32 && a.q_far->type == GGML_TYPE_F32 && a.k_win->type == GGML_TYPE_F32);
    GGML_ASSERT(a.q->nb[0] == sizeof(float) && a.q_far->nb[0] == sizeof(float) && a.k_win->nb[0] == sizeof(float));
    GGML_ASSERT(a.k->nb[0] == ggml_type_size(a.k->type) && a.v->nb[0] == ggml_type_size(a.v->type));
    GGML_ASSERT(dst->nb[0] == sizeof(float));

    a.DK       = a.k->ne[0];
    a.DV       = a.v->ne[0];
    a.n_tps    = a.q->ne[1];
    a.n_head   = a.q->ne[2];
    a.n_stream = a.q->ne[3];
    a.n_kv     = a.k->ne[1];
    a.n_win    = dst->src[6]->ne[0];
    a.rk2      = a.n_head/a.k->ne[2];
    a.rv2      = a.n_head/a.v->ne[2];

    const float * op = (const float *) dst->op_params;
    a.scale    = op[GGML_DPE_FATTN_P_SCALE];
    a.max_bias = op[GGML_DPE_FATTN_P_MAX_BIAS];
    a.softcap  = op[GGML_DPE_FATTN_P_SOFTCAP];
    a.window   = ((const int32_t *) dst->op_params)[GGML_DPE_FATTN_P_WINDOW];
    a.kw_slots = ((const int32_t *) dst->op_params)[GGML_DPE_FATTN_P_KW_SLOTS];
    if (a.softcap != 0.0f) {
        a.scale /= a.softcap;
    }
    a.n_head_log2 = 1u << (uint32_t) floor(log2((double) a.n_head));
    a.m0 = powf(2.0f, -(a.max_bias       )/a.n_head_log2);
    a.m1 = powf(2.0f, -(a.max_bias / 2.0f)/a.n_head_log2);

    const ggml_type k_vec_dot_type = ggml_get_type_traits_cpu(a.k->type)->vec_dot_type;
    a.q_to_vec_dot = ggml_get_type_traits_cpu(k_vec_dot_type)->from_float;
    a.kq_vec_dot   = ggml_get_type_traits_cpu(a.k->type)->vec_dot;
    a.v_to_float   = ggml_get_type_traits(a.v->type)->to_float;
    GGML_ASSERT(a.q_to_vec_dot && a.kq_vec_dot && "dpe_flash_attn: unsupported K type");
    GGML_ASSERT((a.v->type == GGML_TYPE_F32 || a.v_to_float) && "dpe_flash_attn: unsupported V type");

    const int ith = params->ith;
    const int nth = params->nth;

    const bool kv_f = (a.k->type == GGML_TYPE_F16 || a.k->type == GGML_TYPE_F32) && a.v->type == a.k->type;
    const bool split_kv = !params->use_ref && a.n_tps == 1 && a.n_stream == 1 && a.n_kv >= 512;
    const bool tiled    = !params->use_ref && kv_f && a.n_tps >= QT;

    float * wdata = (float *) params->wdata;

    if (split_kv) {
        // each thread a range of cells for every head; partials [head][thread][M, S, VKQ]
        const int64_t n_valid = a.n_valid(0);
        const int64_t chunk   = (a.n_kv + nth - 1)/nth;
        const int64_t c0      = std::min(a.n_kv, ith*chunk);
        const int64_t c1      = std::min(a.n_kv, c0 + chunk);
        float * scratch  = wdata + ith*dpe_fa_row_scratch(a.DK, a.DV);
        float * VKQ      = scratch;
        float * V32      = VKQ + a.DV;
        void  * Qf_q     = V32 + a.DV;
        float * partials = wdata + nth*dpe_fa_row_scratch(a.DK, a.DV);
        const int64_t ps = 2 + a.DV;
        for (int64_t h = 0; h < a.n_head; ++h) {
            float * part = partials + (h*nth + ith)*ps;
            dpe_fa_acc acc;
            memset(VKQ, 0, a.DV*sizeof(float));
            if (c0 < c1) {
                a.q_to_vec_dot(a.q_row(a.q_far, 0, h, 0), Qf_q, a.DK);
                dpe_fa_row(a, 0, h, 0, c0, c1, n_valid, Qf_q, VKQ, V32, acc);
            }
            part[0] = acc.M;
            part[1] = acc.S;
            memcpy(part + 2, VKQ, a.DV*sizeof(float));
        }
        ggml_barrier(params->threadpool);
        for (int64_t h = ith; h < a.n_head; h += nth) {
            dpe_fa_acc acc;
            memset(VKQ, 0, a.DV*sizeof(float));
            for (int t = 0; t < nth; ++t) {
                const float * part = partials + (h*nth + t)*ps;
                if (part[1] == 0.0f) {
                    continue;
                }
                const float Mn = fmaxf(acc.M, part[0]);
                const float so = expf(acc.M - Mn);
                const float sn = expf(part[0] - Mn);
                for (int64_t d = 0; d < a.DV; ++d) {
                    VKQ[d] = VKQ[d]*so + part[2 + d]*sn;
                }
                acc.S = acc.S*so + part[1]*sn;
                acc.M = Mn;
            }
            dpe_fa_sink(a, h, acc, VKQ);
            dpe_fa_store(a, dst, 0, h, 0, acc.S, VKQ);
        }
        return;
    }

    // rows: (token, head, stream); work items: Q tiles of one (head, stream), or single rows
    const int64_t n_tiles_ps = tiled ? (a.n_tps + QT - 1)/QT : a.n_tps; // per (head, stream)
    const int64_t n_items    = n_tiles_ps*a.n_head*a.n_stream;

    // n_valid per stream, found by every thread (n_stream*n_win reads)
    std::vector<int64_t> n_valid(a.n_stream);
    for (int64_t s = 0; s < a.n_stream; ++s) {
        n_valid[s] = a.n_valid(s);
    }

    if (ith == 0) {
        ggml_threadpool_chunk_set(params->threadpool, nth);
    }
    ggml_barrier(params->threadpool);

    float * base = wdata + ith*(tiled ? dpe_fa_tile_scratch(a.DK, a.DV) : dpe_fa_row_scratch(a.DK, a.DV));
    for (int64_t item = ith; item < n_items; item = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t s  = item/(n_tiles_ps*a.n_head);
        const int64_t h  = (item/n_tiles_ps) % a.n_head;
        const int64_t ti = item % n_tiles_ps;
        if (tiled) {
            const int64_t i1 = ti*QT;
            dpe_fa_tile(a, dst, base, i1, std::min(QT, a.n_tps - i1), h, s, n_valid[s]);
        } else {
            float * VKQ  = base;
            float * V32  = VKQ + a.DV;
            void  * Qf_q = V32 + a.DV;
            dpe_fa_acc acc;
            memset(VKQ, 0, a.DV*sizeof(float));
            a.q_to_vec_dot(a.q_row(a.q_far, ti, h, s), Qf_q, a.DK);
            dpe_fa_row(a, ti, h, s, 0, a.n_kv, n_valid[s], Qf_q, VKQ, V32, acc);
            dpe_fa_sink(a, h, acc, VKQ);
            dpe_fa_store(a, dst, ti, h, s, acc.S, VKQ);
        }
    }
}
