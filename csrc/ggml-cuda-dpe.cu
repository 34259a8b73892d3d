// GGML_OP_ROPE_DPE on CUDA. Semantics: ggml-dpe.h; arithmetic shared with the CPU kernel: ggml-dpe-impl.h.
#include "ggml-cuda-dpe.cuh"
#include "ggml-dpe.h"
#include "ggml-dpe-impl.h"

// Pair (x0, x1) of frequency f rotated for shift kind `shift_kind` at position p with divisor s: the arithmetic of
// every ROPE_DPE kernel here (explicit roundings, so that the kernels that share it give the same bits).
template <bool has_ff>
static __device__ __forceinline__ void rope_dpe_pair(
        const float x0, const float x1, float & y0, float & y1, const int f, const int32_t p, const int32_t s,
        const int window, const int shift_kind, const float theta_scale, const float freq_scale, const float ext_factor,
        const float corr_low, const float corr_high, const float * freq_factors, const float mscale) {
    const int64_t delta = ggml_dpe_delta_kind(p, s, window, shift_kind);
    const bool    full  = ggml_dpe_shift_is_full(shift_kind);
    if (delta == 0 && !full) {
        y0 = x0;
        y1 = x1;
        return;
    }

    const float  ff    = has_ff ? freq_factors[f] : 1.0f;
    const double rate  = ggml_dpe_rate(f, theta_scale, ff, freq_scale, ext_factor, corr_low, corr_high);
    const float  theta = ggml_dpe_angle(delta, rate);

    float sin_theta;
    float cos_theta;
    sincosf(theta, &sin_theta, &cos_theta);
    if (full) {
        sin_theta = __fmul_rn(sin_theta, mscale);
        cos_theta = __fmul_rn(cos_theta, mscale);
    }
    y0 = __fmaf_rn(x0, cos_theta, -__fmul_rn(x1, sin_theta));
    y1 = __fmaf_rn(x0, sin_theta,  __fmul_rn(x1, cos_theta));
}

// One thread per pair (i0 = 2*pair): NORMAL pair (i0, i0+1); NEOX pair (i0/2, i0/2 + n_dims/2) for
// i0 < n_dims; threads with i0 >= n_dims copy (i0, i0+1). One block row per output row (dst is contiguous):
// (i1 head, i2 token or slot, i3). Its source row is (i1, i2, i3) of x, or with rows (a cache) (i1, cell, i3)
// with cell = rows[i3*ne2 + i2]; QUERY_PAIR's two halves (i3 = 0, 1) read the same row (i3 = 0).
template <typename T, bool neox, bool has_ff>
static __global__ void rope_dpe_f32(
        const char * x, float * dst, const int ne00, const int ne1, const int ne2,
        const int64_t nb01, const int64_t nb02, const int64_t nb03, // strides of x in bytes
        const int32_t * rows,
        const int n_dims, const int32_t * pos, const float * table, const int64_t s_table, const int n_group,
        const float theta_scale, const float freq_scale, const float ext_factor, const float corr_low, const float corr_high,
        const float * freq_factors, const int window, const int kind, const float mscale) {
    const int i0 = 2*(blockDim.y*blockIdx.y + threadIdx.y);
    if (i0 >= ne00) {
        return;
    }

    const int64_t row = blockIdx.x;
    const int64_t i3  = row/((int64_t) ne1*ne2);
    const int64_t i2  = (row - i3*ne1*ne2)/ne1;
    const int64_t i1  = row - i3*ne1*ne2 - i2*ne1;

    const int     shift_kind = ggml_dpe_shift_kind(kind, i3);
    const int64_t src_i3     = kind == GGML_ROPE_DPE_QUERY_PAIR ? 0 : i3;
    const int64_t src_i2     = rows ? rows[i3*ne2 + i2] : i2;
    const int32_t p          = pos[rows ? i3*ne2 + i2 : i2];

    const T * xr = (const T *) (x + i1*nb01 + src_i2*nb02 + src_i3*nb03);
    float   * yr = dst + row*ne00;

    if (i0 >= n_dims) {
        yr[i0 + 0] = (float) xr[i0 + 0];
        yr[i0 + 1] = (float) xr[i0 + 1];
        return;
    }

    const int f    = i0/2;
    const int ia   = neox ? f            : i0;
    const int ib   = neox ? f + n_dims/2 : i0 + 1;

    const float x0 = (float) xr[ia];
    const float x1 = (float) xr[ib];

    int32_t s = (int32_t) table[(i1/n_group)*s_table + f];
    s = s < 1 ? 1 : s; // the CPU kernel asserts instead; the loader validates the table

    rope_dpe_pair<has_ff>(x0, x1, yr[ia], yr[ib], f, p, s, window, shift_kind, theta_scale, freq_scale, ext_factor,
                          corr_low, corr_high, freq_factors, mscale);
}

template <typename T, bool neox>
static void rope_dpe_f32_cuda(
        const char * x, float * dst, const int ne00, const int ne1, const int ne2, const int64_t nr,
        const int64_t nb01, const int64_t nb02, const int64_t nb03, const int32_t * rows,
        const int n_dims, const int32_t * pos, const float * table, const int64_t s_table, const int n_group,
        const float theta_scale, const float freq_scale, const float ext_factor, const float corr_dims[2],
        const float * freq_factors, const int window, const int kind, const float mscale, cudaStream_t stream) {
    GGML_ASSERT(ne00 % 2 == 0);
    GGML_ASSERT(nr <= INT_MAX);
    const dim3 block_dims(1, CUDA_ROPE_DPE_BLOCK_SIZE, 1);
    const int  n_blocks_y = (ne00 + 2*CUDA_ROPE_DPE_BLOCK_SIZE - 1)/(2*CUDA_ROPE_DPE_BLOCK_SIZE);
    const dim3 block_nums((unsigned) nr, n_blocks_y, 1);

    if (freq_factors == nullptr) {
        rope_dpe_f32<T, neox, false><<<block_nums, block_dims, 0, stream>>>(
            x, dst, ne00, ne1, ne2, nb01, nb02, nb03, rows, n_dims, pos, table, s_table, n_group,
            theta_scale, freq_scale, ext_factor, corr_dims[0], corr_dims[1], freq_factors, window, kind, mscale);
    } else {
        rope_dpe_f32<T, neox, true><<<block_nums, block_dims, 0, stream>>>(
            x, dst, ne00, ne1, ne2, nb01, nb02, nb03, rows, n_dims, pos, table, s_table, n_group,
            theta_scale, freq_scale, ext_factor, corr_dims[0], corr_dims[1], freq_factors, window, kind, mscale);
    }
}

// GGML_ROPE_DPE_KEY_WRITE (ggml_rope_dpe_key_write): one block row per (token, KV head), one thread per pair as
// rope_dpe_f32. The far key goes to the token's cache row in the cache's type (as set_rows converts it); with a
// store, the key as the cache now holds it is rotated back (as rope_dpe_f32 rotates a cache row back) into the
// token's store slot.
template <typename TC, bool neox, bool has_ff>
static __global__ void rope_dpe_key_write(
        const float * x, const int64_t nb01, const int64_t nb02, const int ne00, const int n_head_kv,
        char * cache, const int64_t c_nb1, const int64_t * idx,
        char * store, const int64_t s_nb1, const int64_t s_nb2, const int64_t s_nb3, const int64_t * slot, const int n_tps,
        const int n_dims, const int32_t * pos, const float * table, const int64_t s_table,
        const float theta_scale, const float freq_scale, const float ext_factor, const float corr_low, const float corr_high,
        const float * freq_factors, const int window, const float mscale) {
    const int i0 = 2*(blockDim.y*blockIdx.y + threadIdx.y);
    if (i0 >= ne00) {
        return;
    }
    const int64_t row = blockIdx.x;
    const int64_t t   = row/n_head_kv;
    const int64_t h   = row - t*n_head_kv;
    const int32_t p   = pos[t];

    const float * xr = (const float *) ((const char *) x + h*nb01 + t*nb02);
    TC * cr = (TC *) (cache + idx[t]*c_nb1) + h*ne00;
    float * sr = store ? (float *) (store + slot[t]*s_nb1 + h*s_nb2 + (t/n_tps)*s_nb3) : nullptr;

    int ia = i0, ib = i0 + 1, f = 0;
    if (i0 < n_dims) {
        f  = i0/2;
        ia = neox ? f            : i0;
        ib = neox ? f + n_dims/2 : i0 + 1;
    }
    float y0 = xr[ia];
    float y1 = xr[ib];
    int32_t s = 1;
    if (i0 < n_dims) {
        s = (int32_t) table[h*s_table + f];
        s = s < 1 ? 1 : s;
        rope_dpe_pair<has_ff>(xr[ia], xr[ib], y0, y1, f, p, s, window, GGML_ROPE_DPE_KEY_FULL, theta_scale, freq_scale,
                              ext_factor, corr_low, corr_high, freq_factors, mscale);
    }
    const TC c0 = (TC) y0;
    const TC c1 = (TC) y1;
    cr[ia] = c0;
    cr[ib] = c1;
    if (sr == nullptr) {
        return;
    }
    float z0 = (float) c0;
    float z1 = (float) c1;
    if (i0 < n_dims) {
        rope_dpe_pair<has_ff>((float) c0, (float) c1, z0, z1, f, p, s, window, GGML_ROPE_DPE_KEY_INVERSE, theta_scale,
                              freq_scale, ext_factor, corr_low, corr_high, freq_factors, mscale);
    }
    sr[ia] = z0;
    sr[ib] = z1;
}

template <typename TC, bool neox>
static void rope_dpe_key_write_cuda(ggml_backend_cuda_context & ctx, const ggml_tensor * dst, const float theta_scale,
                                    const float corr_dims[2], const float mscale) {
    const ggml_tensor * a     = dst->src[0];
    const ggml_tensor * table = dst->src[2];
    const ggml_tensor * ff    = dst->src[3];
    const ggml_tensor * cache = dst->src[5];
    const ggml_tensor * store = dst->src[7];
    const ggml_rope_dpe_op_params p = ggml_rope_dpe_get_op_params(dst);
    const int     ne00 = (int) a->ne[0];
    const int     nh   = (int) a->ne[1];
    const int64_t nr   = a->ne[1]*a->ne[2];
    GGML_ASSERT(ne00 % 2 == 0 && nr <= INT_MAX);
    const dim3 block_dims(1, CUDA_ROPE_DPE_BLOCK_SIZE, 1);
    const dim3 block_nums((unsigned) nr, (ne00 + 2*CUDA_ROPE_DPE_BLOCK_SIZE - 1)/(2*CUDA_ROPE_DPE_BLOCK_SIZE), 1);
    const int n_tps = store ? (int) dst->src[8]->ne[0] : 1;
    auto launch = [&](auto kernel) {
        kernel<<<block_nums, block_dims, 0, ctx.stream()>>>(
            (const float *) a->data, a->nb[1], a->nb[2], ne00, nh, (char *) cache->data, cache->nb[1],
            (const int64_t *) dst->src[6]->data, store ? (char *) store->data : nullptr,
            store ? store->nb[1] : 0, store ? store->nb[2] : 0, store ? store->nb[3] : 0,
            store ? (const int64_t *) dst->src[8]->data : nullptr, n_tps, p.n_dims, (const int32_t *) dst->src[1]->data,
            (const float *) table->data, table->nb[1]/sizeof(float), theta_scale, p.freq_scale, p.ext_factor,
            corr_dims[0], corr_dims[1], ff ? (const float *) ff->data : nullptr, p.window, mscale);
    };
    if (ff) {
        launch(rope_dpe_key_write<TC, neox, true>);
    } else {
        launch(rope_dpe_key_write<TC, neox, false>);
    }
    CUDA_CHECK(cudaGetLastError());
}

bool ggml_cuda_supports_rope_dpe(const ggml_tensor * op) {
    const ggml_tensor * a     = op->src[0];
    const ggml_tensor * pos   = op->src[1];
    const ggml_tensor * table = op->src[2];
    const ggml_tensor * ff    = op->src[3];
    const ggml_tensor * rows  = op->src[4];
    const int mode = ((const int32_t *) op->op_params)[GGML_ROPE_DPE_P_MODE];
    if (((const int32_t *) op->op_params)[GGML_ROPE_DPE_P_KIND] == GGML_ROPE_DPE_KEY_WRITE) {
        const ggml_tensor * cache = op->src[5], * store = op->src[7];
        return (cache->type == GGML_TYPE_F16 || cache->type == GGML_TYPE_F32) &&
               cache->nb[0] == ggml_type_size(cache->type) && cache->nb[1] % ggml_type_size(cache->type) == 0 &&
               a->type == GGML_TYPE_F32 && a->nb[0] == sizeof(float) && a->ne[0] % 2 == 0 &&
               (store == nullptr || (store->nb[1] % sizeof(float) == 0 && store->nb[2] % sizeof(float) == 0 &&
                                     store->nb[3] % sizeof(float) == 0)) &&
               table->nb[1] % sizeof(float) == 0 && (ff == nullptr || ggml_is_contiguous(ff)) &&
               (mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX) && a->ne[1]*a->ne[2] <= INT_MAX;
    }
    return op->type == GGML_TYPE_F32 && ggml_is_contiguous(op) &&
           (a->type == GGML_TYPE_F32 || (a->type == GGML_TYPE_F16 && rows != nullptr)) &&
           a->nb[0] == ggml_type_size(a->type) && a->ne[0] % 2 == 0 &&
           pos->type == GGML_TYPE_I32 && ggml_is_contiguous(pos) &&
           (rows == nullptr || (rows->type == GGML_TYPE_I32 && ggml_is_contiguous(rows))) &&
           table->type == GGML_TYPE_F32 && table->nb[0] == sizeof(float) && table->nb[1] % sizeof(float) == 0 &&
           (ff == nullptr || (ff->type == GGML_TYPE_F32 && ggml_is_contiguous(ff))) &&
           (mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX) &&
           ggml_nrows(op) <= INT_MAX;
}

template <typename T>
static void rope_dpe_dispatch(bool neox, const char * x, float * dst, const int ne00, const int ne1, const int ne2,
        const int64_t nr, const int64_t nb01, const int64_t nb02, const int64_t nb03, const int32_t * rows,
        const int n_dims, const int32_t * pos, const float * table, const int64_t s_table, const int n_group,
        const float theta_scale, const float freq_scale, const float ext_factor, const float corr_dims[2],
        const float * ff, const int window, const int kind, const float mscale, cudaStream_t stream) {
    if (neox) {
        rope_dpe_f32_cuda<T, true>(x, dst, ne00, ne1, ne2, nr, nb01, nb02, nb03, rows, n_dims, pos, table, s_table,
            n_group, theta_scale, freq_scale, ext_factor, corr_dims, ff, window, kind, mscale, stream);
    } else {
        rope_dpe_f32_cuda<T, false>(x, dst, ne00, ne1, ne2, nr, nb01, nb02, nb03, rows, n_dims, pos, table, s_table,
            n_group, theta_scale, freq_scale, ext_factor, corr_dims, ff, window, kind, mscale, stream);
    }
}

void ggml_cuda_op_rope_dpe(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * src0 = dst->src[0];
    const ggml_tensor * src1 = dst->src[1];
    const ggml_tensor * src2 = dst->src[2];
    const ggml_tensor * src3 = dst->src[3];
    const ggml_tensor * src4 = dst->src[4];

    const ggml_rope_dpe_op_params p = ggml_rope_dpe_get_op_params(dst);

    // host-side, exactly as the CPU kernel and ggml's rope compute them
    const float theta_scale = powf(p.freq_base, -2.0f/p.n_dims);
    float corr_dims[2];
    ggml_rope_yarn_corr_dims(p.n_dims, p.n_ctx_orig, p.freq_base, p.beta_fast, p.beta_slow, corr_dims);
    const float mscale = ggml_dpe_mscale(p.attn_factor, p.freq_scale, p.ext_factor);

    if (p.kind == GGML_ROPE_DPE_KEY_WRITE) {
        if (src0->ne[1]*src0->ne[2] == 0) {
            return;
        }
        const bool neox = p.mode == GGML_ROPE_TYPE_NEOX;
        if (dst->src[5]->type == GGML_TYPE_F16) {
            neox ? rope_dpe_key_write_cuda<half, true>(ctx, dst, theta_scale, corr_dims, mscale)
                 : rope_dpe_key_write_cuda<half, false>(ctx, dst, theta_scale, corr_dims, mscale);
        } else {
            neox ? rope_dpe_key_write_cuda<float, true>(ctx, dst, theta_scale, corr_dims, mscale)
                 : rope_dpe_key_write_cuda<float, false>(ctx, dst, theta_scale, corr_dims, mscale);
        }
        return;
    }

    GGML_ASSERT((src0->type == GGML_TYPE_F32 || src0->type == GGML_TYPE_F16) && dst->type == GGML_TYPE_F32);
    GGML_ASSERT(src1->type == GGML_TYPE_I32 && src2->type == GGML_TYPE_F32);
    GGML_ASSERT(ggml_is_contiguous(dst));

    const int   n_dims     = p.n_dims;
    const int   mode       = p.mode;

    GGML_ASSERT(mode == GGML_ROPE_TYPE_NORMAL || mode == GGML_ROPE_TYPE_NEOX);
    GGML_ASSERT(n_dims % 2 == 0 && n_dims <= src0->ne[0]);

    const int64_t ne00 = dst->ne[0];
    const int64_t ne1  = dst->ne[1];
    const int64_t ne2  = dst->ne[2];
    const int64_t nr   = ggml_nrows(dst);
    const int n_group  = (int) (ne1/src2->ne[1]);

    const char    * x     = (const char *) src0->data;
    float         * y     = (float *) dst->data;
    const int32_t * pos   = (const int32_t *) src1->data;
    const float   * table = (const float *) src2->data;
    const float   * ff    = src3 ? (const float *) src3->data : nullptr;
    const int32_t * rows  = src4 ? (const int32_t *) src4->data : nullptr;
    const int64_t s_table = src2->nb[1]/sizeof(float);

    const bool neox = mode == GGML_ROPE_TYPE_NEOX;
    cudaStream_t stream = ctx.stream();
    if (src0->type == GGML_TYPE_F16) {
        rope_dpe_dispatch<half>(neox, x, y, ne00, ne1, ne2, nr, src0->nb[1], src0->nb[2], src0->nb[3], rows, n_dims,
            pos, table, s_table, n_group, theta_scale, p.freq_scale, p.ext_factor, corr_dims, ff, p.window, p.kind,
            mscale, stream);
    } else {
        rope_dpe_dispatch<float>(neox, x, y, ne00, ne1, ne2, nr, src0->nb[1], src0->nb[2], src0->nb[3], rows, n_dims,
            pos, table, s_table, n_group, theta_scale, p.freq_scale, p.ext_factor, corr_dims, ff, p.window, p.kind,
            mscale, stream);
    }
}

// GGML_OP_DPE_NEAR_SCORES (ggml-dpe.h): one block per (query, head, stream) row, threads over the window slots.
static __global__ void dpe_near_scores_f32(
        float * dst, const float * kq_near, const int32_t * idx, const int32_t * pos_win, const int32_t * pos_q,
        const int n_win, const int n_tps, const int n_h,
        const int64_t s1, const int64_t s2, const int64_t s3,     // strides of dst in floats
        const int64_t t1, const int64_t t2, const int64_t t3,     // strides of kq_near in floats
        const int window, const int S,
        const float * kq, const int n_far, const int n_kv,        // kq: a narrower source of the far scores, or null
        const int64_t f1, const int64_t f2, const int64_t f3) {    // its strides in floats
    const int64_t row = blockIdx.x;
    const int64_t s   = row/((int64_t) n_tps*n_h);
    const int64_t h   = (row - s*n_tps*n_h)/n_tps;
    const int64_t i   = row - s*n_tps*n_h - h*n_tps;
    const int64_t pq  = pos_q[s*n_tps + i];

    float       * y = dst     + i*s1 + h*s2 + s*s3;
    const float * x = kq_near + i*t1 + h*t2 + s*t3;
    if (kq != nullptr) {
        const float * f = kq + i*f1 + h*f2 + s*f3;
        for (int c = threadIdx.x; c < n_kv; c += blockDim.x) {
            y[c] = c < n_far ? f[c] : 0.0f;
        }
        __syncthreads(); // the far scores and zeros before the near scores that overwrite some of them
    }
    for (int j = threadIdx.x; j < n_win; j += blockDim.x) {
        const int64_t r = pq - pos_win[s*n_win + j];
        if (r >= 0 && r < window) {
            const int c = idx[s*n_win + j];
            y[c] = x[S > 0 ? c % S : j];
        }
    }
}

bool ggml_cuda_supports_dpe_near_scores(const ggml_tensor * op) {
    const ggml_tensor * kq      = op->src[0];
    const ggml_tensor * kq_near = op->src[1];
    return kq->type == GGML_TYPE_F32 && kq_near->type == GGML_TYPE_F32 &&
           kq->nb[0] == sizeof(float) && kq_near->nb[0] == sizeof(float) &&
           kq->nb[1] % sizeof(float) == 0 && kq->nb[2] % sizeof(float) == 0 && kq->nb[3] % sizeof(float) == 0 &&
           kq_near->nb[1] % sizeof(float) == 0 && kq_near->nb[2] % sizeof(float) == 0 && kq_near->nb[3] % sizeof(float) == 0 &&
           op->src[2]->type == GGML_TYPE_I32 && op->src[3]->type == GGML_TYPE_I32 && op->src[4]->type == GGML_TYPE_I32 &&
           kq_near->ne[0] <= INT_MAX && op->src[2]->ne[0] <= INT_MAX && op->ne[0] <= INT_MAX && ggml_nrows(kq) <= INT_MAX;
}

void ggml_cuda_op_dpe_near_scores(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * kq      = dst->src[0];
    const ggml_tensor * kq_near = dst->src[1];
    const int window = ((const int32_t *) dst->op_params)[0];
    const int S      = ((const int32_t *) dst->op_params)[1]; // 0, or the slots of a store of keys by cell
    const int64_t n_win = dst->src[2]->ne[0];
    const int64_t nr = dst->ne[1]*dst->ne[2]*dst->ne[3];
    if (nr == 0 || n_win == 0) {
        return;
    }
    dpe_near_scores_f32<<<(unsigned) nr, 256, 0, ctx.stream()>>>(
        (float *) dst->data, (const float *) kq_near->data, (const int32_t *) dst->src[2]->data,
        (const int32_t *) dst->src[3]->data, (const int32_t *) dst->src[4]->data,
        (int) n_win, (int) dst->ne[1], (int) dst->ne[2],
        dst->nb[1]/sizeof(float), dst->nb[2]/sizeof(float), dst->nb[3]/sizeof(float),
        kq_near->nb[1]/sizeof(float), kq_near->nb[2]/sizeof(float), kq_near->nb[3]/sizeof(float), window, S,
        dst->ne[0] > kq->ne[0] ? (const float *) kq->data : nullptr, (int) kq->ne[0], (int) dst->ne[0],
        kq->nb[1]/sizeof(float), kq->nb[2]/sizeof(float), kq->nb[3]/sizeof(float));
}
