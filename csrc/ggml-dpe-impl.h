#pragma once

// Shared arithmetic of the GGML_OP_ROPE_DPE kernels (CPU: ggml-cpu-dpe.cpp, CUDA: ggml-cuda-dpe.cu).
// Both kernels call these exact functions, so they compute the same angle for every (token, head, f).
//
// Precision. The rotation angle is delta * theta_f with |delta| up to ~1.3e5 at 128k context. A float
// product (ggml's own rope style) has an error of up to ulp(1.3e5)/2 = 0.004 rad, and ggml's CPU
// (iterated theta *= theta_scale) and CUDA (powf per thread, __sinf/__cosf under -use_fast_math, whose
// error grows with |x|) do not agree at that level. Here theta_f is formed in double from ggml's own
// float theta_scale (powf(freq_base, -2/n_dims), computed on the host in both kernels) by repeated
// squaring (multiplications only: the same IEEE result on CPU and GPU), the product delta * theta_f is
// formed in double and reduced to [-pi, pi] in double, and only then rounded to float for sinf/cosf.
// The angle then carries ~1e-7 rad of error at any position: what remains is sin/cos rounding
// (~6e-8 on the CPU; __sinf/__cosf on [-pi, pi] ~4e-7 on CUDA).

#include "ggml-dpe.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define GGML_DPE_HD static __host__ __device__ __forceinline__
#else
#define GGML_DPE_HD static inline
#endif

#define GGML_DPE_MAX_F 512 // most frequencies (n_dims/2) a head may have: bounds the CPU kernel's stack cache

// floor(a / b) for b >= 1 and any sign of a (C division truncates toward zero)
GGML_DPE_HD int32_t ggml_dpe_floor_div(int32_t a, int32_t b) {
    int32_t q = a / b;
    if ((a % b != 0) && (a < 0)) {
        q -= 1;
    }
    return q;
}

// What one output row of a GGML_OP_ROPE_DPE node is rotated by, in units of theta_f: the kinds of
// enum ggml_rope_dpe_kind, and the two halves of QUERY_PAIR (GGML_DPE_SHIFT_PLAIN: pos, GGML_DPE_SHIFT_QUERY_FULL: P_q)
#define GGML_DPE_SHIFT_QUERY_FULL 5
#define GGML_DPE_SHIFT_PLAIN      6

// the shift kind of half `half` (0 or 1: the output's dim 3 index) of a node of kind `kind`
GGML_DPE_HD int ggml_dpe_shift_kind(int kind, int64_t half) {
    if (kind == GGML_ROPE_DPE_QUERY_PAIR) {
        return half == 0 ? GGML_DPE_SHIFT_PLAIN : GGML_DPE_SHIFT_QUERY_FULL;
    }
    return kind;
}

// whether a shift kind rotates unrotated vectors (ggml_rope_ext's magnitude scaling, no copy at shift 0)
GGML_DPE_HD bool ggml_dpe_shift_is_full(int shift_kind) {
    return shift_kind == GGML_ROPE_DPE_KEY_FULL || shift_kind == GGML_DPE_SHIFT_QUERY_FULL ||
           shift_kind == GGML_DPE_SHIFT_PLAIN;
}

// the shift from floor(p/s) (fp) and floor(w/s) (fw); every shift kind is monotone in p
GGML_DPE_HD int64_t ggml_dpe_shift_from(int64_t fp, int64_t fw, int32_t p, int32_t w, int shift_kind) {
    switch (shift_kind) {
        case GGML_ROPE_DPE_KEY:         return fp - p;
        case GGML_ROPE_DPE_QUERY:       return fp + w - fw - p;
        case GGML_ROPE_DPE_KEY_INVERSE: return p - fp;
        case GGML_ROPE_DPE_KEY_FULL:    return fp;
        case GGML_DPE_SHIFT_QUERY_FULL: return fp + w - fw;
        default:                        return p; // GGML_DPE_SHIFT_PLAIN
    }
}

// the position delta of a shift kind: KEY_INVERSE undoes KEY
GGML_DPE_HD int64_t ggml_dpe_delta_kind(int32_t p, int32_t s, int32_t w, int shift_kind) {
    return ggml_dpe_shift_from(ggml_dpe_floor_div(p, s), ggml_dpe_floor_div(w, s), p, w, shift_kind);
}

// ggml_rope_ext's magnitude factor (rope_yarn): attn_factor, times YaRN's 1 + 0.1 ln(1/freq_scale) when extending
static inline float ggml_dpe_mscale(float attn_factor, float freq_scale, float ext_factor) {
    float mscale = attn_factor;
    if (ext_factor != 0.0f) {
        mscale *= 1.0f + 0.1f*logf(1.0f/freq_scale);
    }
    return mscale;
}

// theta_f per unit position, in double: theta_scale^f / ff, times freq_scale mixed with the YaRN ramp as in
// ggml's rope_yarn (theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix), without magnitude scaling.
GGML_DPE_HD double ggml_dpe_rate(int f, float theta_scale, float ff, float freq_scale, float ext_factor,
                                 float corr_low, float corr_high) {
    // theta_scale^f by repeated squaring: only multiplications, identical on every IEEE machine
    double r = 1.0;
    double b = (double) theta_scale;
    for (int e = f; e > 0; e >>= 1) {
        if (e & 1) {
            r *= b;
        }
        b *= b;
    }
    r /= (double) ff;

    double mix = (double) freq_scale;
    if (ext_factor != 0.0f) {
        const double den  = fmax(0.001, (double) corr_high - (double) corr_low);
        const double y    = ((double) f - (double) corr_low) / den;
        const double ramp = (1.0 - fmin(1.0, fmax(0.0, y))) * (double) ext_factor;
        mix = (double) freq_scale * (1.0 - ramp) + ramp;
    }
    return r * mix;
}

// delta * rate reduced to [-pi, pi], as float
GGML_DPE_HD float ggml_dpe_angle(int64_t delta, double rate) {
    const double two_pi = 6.283185307179586476925286766559;
    const double a = (double) delta * rate;
    return (float) (a - two_pi * rint(a / two_pi));
}

// The op_params of a GGML_OP_ROPE_DPE node (layout: enum ggml_rope_dpe_param), decoded on the host.
struct ggml_rope_dpe_op_params {
    int   n_dims, mode, n_ctx_orig, window;
    int   kind; // enum ggml_rope_dpe_kind
    float freq_base, freq_scale, ext_factor, beta_fast, beta_slow, attn_factor;
};

static inline struct ggml_rope_dpe_op_params ggml_rope_dpe_get_op_params(const struct ggml_tensor * dst) {
    const int32_t * op = (const int32_t *) dst->op_params;
    struct ggml_rope_dpe_op_params p;
    p.n_dims     = op[GGML_ROPE_DPE_P_N_DIMS];
    p.mode       = op[GGML_ROPE_DPE_P_MODE];
    p.n_ctx_orig = op[GGML_ROPE_DPE_P_N_CTX_ORIG];
    p.window     = op[GGML_ROPE_DPE_P_WINDOW];
    p.kind       = op[GGML_ROPE_DPE_P_KIND];
    memcpy(&p.freq_base,  op + GGML_ROPE_DPE_P_FREQ_BASE,  sizeof(float));
    memcpy(&p.freq_scale, op + GGML_ROPE_DPE_P_FREQ_SCALE, sizeof(float));
    memcpy(&p.ext_factor, op + GGML_ROPE_DPE_P_EXT_FACTOR, sizeof(float));
    memcpy(&p.beta_fast,  op + GGML_ROPE_DPE_P_BETA_FAST,  sizeof(float));
    memcpy(&p.beta_slow,  op + GGML_ROPE_DPE_P_BETA_SLOW,  sizeof(float));
    memcpy(&p.attn_factor, op + GGML_ROPE_DPE_P_ATTN_FACTOR, sizeof(float));
    return p;
}
