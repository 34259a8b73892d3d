// GGML_OP_DPE_FLASH_ATTN on CUDA (compiled into ggml-cuda). Semantics: ggml-dpe.h (ggml_dpe_flash_attn); the CPU
// kernel (ggml-cpu-dpe-fattn.cpp) computes the same thing and the float64 test (tests/test_dpe_attention.py) checks both.
//
// One online softmax per query row over every cell of the cache, each (query, cell) pair scored once: near
// (q . k_win[slot]) where the cell is a window slot with 0 <= pos_q - pos_win < window, far (q_far . k[cell]) elsewhere.
//
// Two kernels:
// - dpe_fattn_vec, decode (at most 16 rows per KV head; 8 at head dim 256): F32 arithmetic, each warp scores 32
//   cells at a time (one per lane, the K row read whole), then adds their values with the lanes over the head dim;
//   the cells are split over 4 warps and, across blocks, into n_split ranges so that a few rows fill the GPU.
// - dpe_fattn, tensor-core tiles of mma.sync.m16n8k16 (F16 inputs, F32 accumulators; Ampere and newer), laid out
//   as stock's tensor-core kernel (fattn-mma-f16.cuh) lays them out:
//   - a block owns up to 16*NWQ query rows of one KV head: the rows are (token, head of the KV head's group)
//     pairs, so GQA heads share every K and V tile they read;
//   - its cells are split into NWK contiguous ranges (one per group of NWQ warps) and, across blocks, into n_split
//     ranges when the rows alone do not fill the GPU; the last tiles in which the mask hides every pair of the
//     block's rows (a causal mask) are neither loaded nor scored;
//   - per KV tile of KT cells a group loads the far keys, the values (F16 by cp.async, double-buffered so the
//     next tile arrives while this one computes; F32 and Q8_0 converted through registers) and the mask tile,
//     and, only for window cells that some row of the block can be near, their window keys. A warp whose 16 rows
//     see the tile wholly far or wholly near computes one Q.K^T product (q_far or q); a warp on the window's edge
//     computes both and chooses per pair. Masked pairs are -inf whatever their score. Q is scaled and rounded to
//     F16 and P is rounded to F16 before the V product, as in stock's kernels.
// Partial results (max, sum, unnormalised output) merge exactly, inside a block through shared memory, across
// blocks by dpe_fattn_combine.
//
// The window slots of a stream list their cells in ascending order, padding slots (position INT32_MAX) after them
// (csrc/llama-dpe-engine.cpp builds them so; the CPU kernel asserts it): a group walks them with a cursor.
#include "ggml-cuda-dpe.cuh"
#include "ggml-dpe.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstdint>

namespace {

struct dpe_fa_args {
    const float * q;  int64_t q_s1, q_s2, q_s3;     // strides in floats
    const float * qf; int64_t qf_s1, qf_s2, qf_s3;
    const char  * k;  int64_t k_nb1, k_nb2, k_nb3;  // strides in bytes
    const char  * v;  int64_t v_nb1, v_nb2, v_nb3;
    const half  * mask; int64_t m_s1, m_s2, m_s3; int m_ne2, m_ne3; // strides in halves
    const float * kw; int64_t kw_s1, kw_s2, kw_s3;  // strides in floats
    const int32_t * idx, * pos_win, * pos_q;
    const float * sinks;
    float  * dst;
    float  * part;   // [n_split][n_rows_all][D] when n_split > 1
    float2 * meta;   // [n_split][n_rows_all]: (max, sum)
    int n_tps, n_head, n_head_kv, n_stream, n_kv, n_win, G, rows; // rows = n_tps*G per (KV head, stream)
    float scale, softcap, m0, m1; int n_head_log2; bool alibi;
    bool mask_async; // mask rows 16-byte aligned and n_kv % 8 == 0: mask tiles by cp.async beside K and V
    int D, window, n_split, tiles_per_split;
    int kw_slots; // 0: slot j's window key is row j of kw; S > 0: row idx[j] % S (a store of keys by cell)
};

__device__ __forceinline__ float dpe_slope(const dpe_fa_args & a, int h) {
    if (!a.alibi) {
        return 1.0f;
    }
    return h < a.n_head_log2 ? powf(a.m0, h + 1) : powf(a.m1, 2*(h - a.n_head_log2) + 1);
}

// 8 consecutive elements e .. e+7 (e a multiple of 8) of a row of the cache, as F16
template <ggml_type T>
__device__ __forceinline__ uint4 dpe_load8(const char * row, int e) {
    if constexpr (T == GGML_TYPE_F16) {
        return *(const uint4 *) (row + 2*e);
    } else if constexpr (T == GGML_TYPE_F32) {
        const float4 x = ((const float4 *) row)[e/4 + 0];
        const float4 y = ((const float4 *) row)[e/4 + 1];
        half2 h[4] = { __floats2half2_rn(x.x, x.y), __floats2half2_rn(x.z, x.w),
                       __floats2half2_rn(y.x, y.y), __floats2half2_rn(y.z, y.w) };
        return *(const uint4 *) h;
    } else {
        static_assert(T == GGML_TYPE_Q8_0, "dpe_load8: F16, F32 or Q8_0");
        const block_q8_0 * b = (const block_q8_0 *) row + e/QK8_0;
        const float d = __half2float(b->d);
        const int16_t * qs = (const int16_t *) (b->qs + e % QK8_0); // 2-byte aligned: blocks are 34 bytes
        half2 h[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int16_t p = qs[i];
            h[i] = __floats2half2_rn(d*(float) (int8_t) (p & 0xff), d*(float) (int8_t) (p >> 8));
        }
        return *(const uint4 *) h;
    }
}

// the first i in [0, n) with !pred(i), for a predicate that holds on a prefix; a whole warp probes 32 places a
// round (log32 n rounds of dependent loads instead of log2 n)
template <typename F>
__device__ __forceinline__ int dpe_warp_partition(int n, F pred) {
    const int lane = threadIdx.x % 32;
    int lo = 0, hi = n;
    while (lo < hi) {
        const int step = (hi - lo + 31)/32;
        const int i = lo + lane*step;
        const unsigned b = __ballot_sync(0xffffffff, i < hi && pred(i));
        const int k = __popc(b);
        if (k == 0) {
            hi = lo;
        } else {
            const int nlo = lo + (k - 1)*step + 1;
            hi = min(hi, lo + k*step);
            lo = nlo;
        }
    }
    return lo;
}

// a row's sink joins its softmax (max m, sum l; sk: the head's sink logit): returns the factor the row's
// unnormalised output is scaled by, and l becomes the sum with the sink
__device__ __forceinline__ float dpe_add_sink(const float m, float & l, const float sk) {
    const float Mn = fmaxf(m, sk);
    const float f  = m == -INFINITY ? 0.0f : expf(m - Mn);
    l = l*f + expf(sk - Mn);
    return f;
}

__device__ __forceinline__ uint32_t dpe_pack(float x, float y) {
    const half2 h = __floats2half2_rn(x, y);
    return *(const uint32_t *) &h;
}

// c += a . b, m16n8k16, row-major A (16x16), column-major B (16x8), F32 C (16x8)
__device__ __forceinline__ void dpe_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    GGML_UNUSED(c); GGML_UNUSED(a); GGML_UNUSED(b0); GGML_UNUSED(b1);
#endif
}

__device__ __forceinline__ void dpe_cp_async16(void * dst, const void * src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned) __cvta_generic_to_shared(dst);
    const int n = ok ? 16 : 0; // 0: zero-fill
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(d), "l"(src), "r"(n));
#else
    GGML_UNUSED(dst); GGML_UNUSED(src); GGML_UNUSED(ok);
#endif
}

__device__ __forceinline__ void dpe_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

__device__ __forceinline__ void dpe_cp_async_wait_1() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void dpe_cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// four 8x8 F16 matrices from shared memory (lanes 8i .. 8i+7 give the rows of matrix i), one register each:
// B fragments of mma.m16n8k16 from a tile stored [n][k] (K: cells by dims), or, transposed, from a tile stored
// [k][n] (V: cells by dims)
__device__ __forceinline__ void dpe_ldmatrix_x4(uint32_t (&b)[4], const half * row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned) __cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(a));
#else
    GGML_UNUSED(row); b[0] = b[1] = b[2] = b[3] = 0;
#endif
}

__device__ __forceinline__ void dpe_ldmatrix_x4_trans(uint32_t (&b)[4], const half * row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned) __cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(a));
#else
    GGML_UNUSED(row); b[0] = b[1] = b[2] = b[3] = 0;
#endif
}

// shared memory: Q tiles of the block, then per group: far K, window K, V^T tiles, and the cells' window info
template <int D, int KT, int NWQ, int NWK>
struct dpe_fa_smem {
    static constexpr int RT = 16*NWQ;
    static constexpr int DS = D + 8;   // row stride (halves) of the Q, K and V tiles: conflict-free fragment loads
    static constexpr size_t q_bytes     = 2*sizeof(half)*RT*DS;
    // two buffers of far K and V (the next tile loads while this one computes), one of window keys, cell info
    static constexpr int MS = KT + 8;  // row stride (halves) of the mask tile
    static constexpr size_t group_bytes = sizeof(half)*(5*KT*DS + 2*RT*MS) + sizeof(int2)*KT;
    static constexpr size_t merge_bytes = sizeof(float)*NWK*RT*(D + 2);
    static constexpr size_t bytes = q_bytes + (NWK*group_bytes > merge_bytes ? NWK*group_bytes : merge_bytes);
};

template <int D, int KT, int NWQ, int NWK, ggml_type KV_T>
__global__ void __launch_bounds__(32*NWQ*NWK) dpe_fattn(const dpe_fa_args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using SM = dpe_fa_smem<D, KT, NWQ, NWK>;
    constexpr int RT = SM::RT, DS = SM::DS;
    constexpr int NT = 32*NWQ;  // threads of a group
    constexpr int NJ = KT/8;    // n-tiles of a score tile
    constexpr int NO = D/8;     // n-tiles of the output
    constexpr int D8 = D/8;     // 8-element chunks of a row

    extern __shared__ __align__(16) char dpe_smem[];
    half * Qn = (half *) dpe_smem;
    half * Qf = Qn + RT*DS;

    const int tid  = threadIdx.x;
    const int warp = tid/32;
    const int lane = tid % 32;
    const int wq   = warp % NWQ;     // row slice of the warp
    const int kg   = warp / NWQ;     // cell range (group) of the warp
    const int gt   = tid - kg*NT;    // thread within the group
    const int g    = lane/4;
    const int t4   = lane % 4;

    char * gbase = dpe_smem + SM::q_bytes + kg*SM::group_bytes;
    half * Ks = (half *) gbase;      // [2][KT][DS] far keys
    half * Vs = Ks + 2*KT*DS;        // [2][KT][DS] values
    half * Kn = Vs + 2*KT*DS;        // [KT][DS] window keys of the tile's window cells
    half * Ms = Kn + KT*DS;          // [2][RT][MS] mask tiles (when mask_async)
    int2 * info = (int2 *) (Ms + 2*RT*SM::MS); // (tile, position) of each cell that is a window slot

    const int hk   = blockIdx.y % a.n_head_kv;
    const int s    = blockIdx.y / a.n_head_kv;
    const int row0 = blockIdx.x*RT;

    // Q tiles, scaled, as F16
    for (int e = tid; e < RT*(D/2); e += blockDim.x) {
        const int r  = e/(D/2);
        const int d2 = e % (D/2);
        const int cr = row0 + r;
        half2 vn = __floats2half2_rn(0.0f, 0.0f);
        half2 vf = vn;
        if (cr < a.rows) {
            const int i = cr/a.G;
            const int h = hk*a.G + cr % a.G;
            const float * qn = a.q  + i*a.q_s1  + h*a.q_s2  + s*a.q_s3  + 2*d2;
            const float * qf = a.qf + i*a.qf_s1 + h*a.qf_s2 + s*a.qf_s3 + 2*d2;
            vn = __floats2half2_rn(a.scale*qn[0], a.scale*qn[1]);
            vf = __floats2half2_rn(a.scale*qf[0], a.scale*qf[1]);
        }
        *(half2 *) (Qn + r*DS + 2*d2) = vn;
        *(half2 *) (Qf + r*DS + 2*d2) = vf;
    }
    for (int c = gt; c < KT; c += NT) {
        info[c] = make_int2(-1, 0);
    }

    // the thread's two rows: g and g + 8 of the warp's slice
    int pq[2];
    float slope[2];
    const half * mrow[2];
    bool valid[2];
    int hrow[2], irow[2];
    long long pq_min = LLONG_MAX, pq_max = LLONG_MIN;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int cr = row0 + wq*16 + g + 8*rr;
        valid[rr] = cr < a.rows;
        const int i = valid[rr] ? cr/a.G : 0;
        const int h = hk*a.G + (valid[rr] ? cr % a.G : 0);
        irow[rr] = i;
        hrow[rr] = h;
        pq[rr]    = a.pos_q[s*a.n_tps + i];
        slope[rr] = dpe_slope(a, h);
        mrow[rr]  = a.mask ? a.mask + i*a.m_s1 + (h % a.m_ne2)*a.m_s2 + (s % a.m_ne3)*a.m_s3 : nullptr;
        if (valid[rr]) {
            pq_min = min(pq_min, (long long) pq[rr]);
            pq_max = max(pq_max, (long long) pq[rr]);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        pq_min = min(pq_min, __shfl_xor_sync(0xffffffff, pq_min, o));
        pq_max = max(pq_max, __shfl_xor_sync(0xffffffff, pq_max, o));
    }
    const bool warp_rows = pq_min != LLONG_MAX;

    // the block's rows' positions, for the window keys a tile must load
    __shared__ long long blk_pq[2][NWQ*NWK];
    if (lane == 0) {
        blk_pq[0][warp] = pq_min;
        blk_pq[1][warp] = pq_max;
    }

    // the block's rows of the mask: one per token where every head has the same mask (m_ne2 == 1: the rows of a
    // token's G heads share it), else one per row; their offsets (-1: none)
    const bool mask_tok = a.m_ne2 == 1;
    const int  i_first  = row0/a.G;
    const int  n_mrows  = mask_tok ? (min(a.rows, row0 + RT) - 1)/a.G - i_first + 1 : RT;
    auto mask_row = [&](const int m) -> int64_t {
        if (m >= n_mrows) {
            return -1;
        }
        if (mask_tok) {
            return (int64_t) (i_first + m)*a.m_s1 + (s % a.m_ne3)*a.m_s3;
        }
        const int cr = row0 + m;
        if (cr >= a.rows) {
            return -1;
        }
        const int h = hk*a.G + cr % a.G;
        return (int64_t) (cr/a.G)*a.m_s1 + (h % a.m_ne2)*a.m_s2 + (s % a.m_ne3)*a.m_s3;
    };
    // the rows of the mask tile the thread's two rows read
    int mrow_s[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        mrow_s[rr] = mask_tok ? (valid[rr] ? irow[rr] - i_first : 0) : wq*16 + g + 8*rr;
    }

    // this block's tiles, less the last ones in which the mask hides every pair of the block's rows (a causal
    // mask past the rows' positions): they are neither loaded nor scored. TP tiles are probed per barrier (the
    // loads of a round are independent), from the last tile back.
    const int n_tiles = (a.n_kv + KT - 1)/KT;
    const int t_begin = blockIdx.z*a.tiles_per_split;
    int       t_end   = min(n_tiles, t_begin + a.tiles_per_split);
    if (a.mask_async) {
        constexpr int TP  = 8;
        constexpr int NTB = 32*NWQ*NWK;
        constexpr int SC  = (RT*(KT/8) + NTB - 1)/NTB;
        int64_t so[SC]; // the thread's chunks of 8 mask values in a tile (offsets from its first cell; -1: none)
#pragma unroll
        for (int k = 0; k < SC; ++k) {
            const int e = tid + k*NTB;
            const int64_t mo = e < RT*(KT/8) ? mask_row(e/(KT/8)) : -1;
            so[k] = mo < 0 ? -1 : mo + 8*(e % (KT/8));
        }
        __shared__ unsigned tail_seen;
        while (t_end > t_begin) {
            unsigned bits = 0; // bit u: tile t_end - 1 - u has a visible pair
#pragma unroll
            for (int u = 0; u < TP; ++u) {
                const int c0 = (t_end - 1 - u)*KT;
#pragma unroll
                for (int k = 0; k < SC; ++k) {
                    const int ch = (tid + k*NTB) % (KT/8);
                    if (t_end - 1 - u >= t_begin && so[k] >= 0 && c0 + 8*ch < a.n_kv) {
                        const uint4 w4 = *(const uint4 *) (a.mask + so[k] + c0);
                        const uint32_t wd[4] = { w4.x, w4.y, w4.z, w4.w };
                        bool seen = false;
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            seen = seen || (wd[i] & 0xffffu) != 0xfc00u || (wd[i] >> 16) != 0xfc00u; // F16 -inf
                        }
                        bits |= seen ? 1u << u : 0u;
                    }
                }
            }
            if (tid == 0) {
                tail_seen = 0;
            }
            __syncthreads();
            if (bits != 0) {
                atomicOr(&tail_seen, bits);
            }
            __syncthreads();
            const unsigned b = tail_seen;
            if (b != 0) {
                t_end -= __ffs(b) - 1;
                break;
            }
            t_end = max(t_begin, t_end - TP);
            __syncthreads(); // every thread has read tail_seen before it is reset
        }
    }
    const int per_grp = t_end > t_begin ? (t_end - t_begin + NWK - 1)/NWK : 0;
    const int g_begin = t_begin + kg*per_grp;
    const int g_end   = min(t_end, g_begin + per_grp);

    // the first real window slot at or after the group's first cell (real slots ascend, padding follows them)
    const int32_t * ids = a.idx + (int64_t) s*a.n_win;
    const int32_t * pws = a.pos_win + (int64_t) s*a.n_win;
    const int c_first = g_begin*KT;
    int cursor = dpe_warp_partition(a.n_win, [&](int i) { return pws[i] != INT32_MAX && ids[i] < c_first; });

    const char * kbase = a.k + hk*a.k_nb2 + s*a.k_nb3;
    const char * vbase = a.v + hk*a.v_nb2 + s*a.v_nb3;
    const float * kwbase = a.kw + hk*a.kw_s2 + s*a.kw_s3;

    // the thread's chunks of 8 mask values in every mask tile (offsets from the tile's first cell; -1: a row
    // past the block's rows, not loaded)
    constexpr int MC = (RT*(KT/8) + NT - 1)/NT;
    int64_t moffs[MC];
#pragma unroll
    for (int k = 0; k < MC; ++k) {
        const int e  = gt + k*NT;
        const int64_t mo = e < RT*(KT/8) && a.mask_async ? mask_row(e/(KT/8)) : -1;
        moffs[k] = mo < 0 ? -1 : mo + 8*(e % (KT/8));
    }

    float O[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        O[n][0] = O[n][1] = O[n][2] = O[n][3] = 0.0f;
    }
    float M[2] = { -INFINITY, -INFINITY };
    float L[2] = { 0.0f, 0.0f };

    // far keys and values of a tile into buffer b: F16 by cp.async (no registers, overlaps the previous
    // tile's compute), other types converted through registers
    auto load_kv = [&](const int tile, const int b) {
        const int c0 = tile*KT;
        half * Kb = Ks + b*KT*DS;
        half * Vb = Vs + b*KT*DS;
        if (a.mask_async) {
            half * Mb = Ms + b*RT*SM::MS;
#pragma unroll
            for (int k = 0; k < MC; ++k) {
                const int e = gt + k*NT;
                if (e < RT*(KT/8) && moffs[k] >= 0) { // rows no thread reads are not loaded
                    const int  r  = e/(KT/8);
                    const int  ch = e % (KT/8);
                    const bool ok = c0 + 8*ch < a.n_kv;
                    dpe_cp_async16(Mb + r*SM::MS + 8*ch, ok ? a.mask + moffs[k] + c0 : a.mask, ok);
                }
            }
        }
        const char * kt = kbase + (int64_t) c0*a.k_nb1;
        const char * vt = vbase + (int64_t) c0*a.v_nb1;
        if constexpr (KV_T == GGML_TYPE_F16) {
            for (int e = gt; e < KT*D8; e += NT) {
                const int  t  = e/D8;
                const int  ch = e % D8;
                const bool ok = c0 + t < a.n_kv;
                dpe_cp_async16(Kb + t*DS + 8*ch, ok ? kt + t*a.k_nb1 + 16*ch : kbase, ok);
                dpe_cp_async16(Vb + t*DS + 8*ch, ok ? vt + t*a.v_nb1 + 16*ch : vbase, ok);
            }
        } else {
            constexpr int NB = 4; // loads in flight per thread
            for (int e0 = 0; e0 < KT*D8; e0 += NB*NT) {
                uint4 kr[NB], vr[NB];
#pragma unroll
                for (int u = 0; u < NB; ++u) {
                    const int e = e0 + u*NT + gt;
                    const int t = e/D8;
                    kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
                    if (e < KT*D8 && c0 + t < a.n_kv) {
                        kr[u] = dpe_load8<KV_T>(kt + t*a.k_nb1, 8*(e % D8));
                        vr[u] = dpe_load8<KV_T>(vt + t*a.v_nb1, 8*(e % D8));
                    }
                }
#pragma unroll
                for (int u = 0; u < NB; ++u) {
                    const int e = e0 + u*NT + gt;
                    if (e < KT*D8) {
                        *(uint4 *) (Kb + (e/D8)*DS + 8*(e % D8)) = kr[u];
                        *(uint4 *) (Vb + (e/D8)*DS + 8*(e % D8)) = vr[u];
                    }
                }
            }
        }
    };

    __syncthreads(); // info[] is reset and blk_pq is written
    long long bq_min = LLONG_MAX, bq_max = LLONG_MIN;
#pragma unroll
    for (int w = 0; w < NWQ*NWK; ++w) {
        bq_min = min(bq_min, blk_pq[0][w]);
        bq_max = max(bq_max, blk_pq[1][w]);
    }
    if (g_begin < g_end) {
        load_kv(g_begin, 0);
    }
    dpe_cp_async_commit();

    for (int it = 0; it < per_grp; ++it) {
        const int  tile   = g_begin + it;
        const bool active = tile < g_end;
        const int  c0     = tile*KT;
        const half * Kb = Ks + (it & 1)*KT*DS;
        const half * Vb = Vs + (it & 1)*KT*DS;
        const half * Mb = Ms + (it & 1)*RT*SM::MS;

        if (tile + 1 < g_end) {
            load_kv(tile + 1, (it + 1) & 1);
        }
        dpe_cp_async_commit();
        if (active && cursor < a.n_win && pws[cursor] != INT32_MAX && ids[cursor] < c0 + KT) {
            // the tile's window cells (slots cursor, cursor + 1, ...: their cells ascend): their positions, and
            // the window keys of those that some row of the block can be near
            for (int e = gt; e < KT*D8; e += NT) {
                const int j  = e/D8;
                const int ch = e % D8;
                const int sl = cursor + j;
                if (sl < a.n_win) {
                    const int c  = ids[sl];
                    const int pw = pws[sl];
                    if (pw != INT32_MAX && c < c0 + KT) {
                        if (bq_max - pw >= 0 && bq_min - pw < a.window) {
                            *(uint4 *) (Kn + (c - c0)*DS + 8*ch) =
                                dpe_load8<GGML_TYPE_F32>(
                                    (const char *) (kwbase + (int64_t) (a.kw_slots ? c % a.kw_slots : sl)*a.kw_s1), 8*ch);
                        }
                        if (ch == 0) {
                            info[c - c0] = make_int2(tile, pw);
                        }
                    }
                }
            }
        }
        dpe_cp_async_wait_1(); // this tile's K and V have arrived
        __syncthreads();

        do {
        if (!active) {
            break;
        }
        // the tile's window cells: how many, and the range of their positions
        int cnt = 0;
        int pw_min = INT_MAX, pw_max = INT_MIN;
        for (int c = lane; c < KT; c += 32) {
            const int2 in = info[c];
            if (in.x == tile) {
                ++cnt;
                pw_min = min(pw_min, in.y);
                pw_max = max(pw_max, in.y);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            cnt   += __shfl_xor_sync(0xffffffff, cnt, o);
            pw_min = min(pw_min, __shfl_xor_sync(0xffffffff, pw_min, o));
            pw_max = max(pw_max, __shfl_xor_sync(0xffffffff, pw_max, o));
        }
        cursor += cnt;
        if (!warp_rows) {
            break;
        }

        const int  nc       = min(KT, a.n_kv - c0);
        const bool all_far  = cnt == 0 || pq_min - pw_max >= a.window || pq_max - pw_min < 0;
        const bool all_near = !all_far && cnt == nc && pq_min - pw_max >= 0 && pq_max - pw_min < a.window;

        // S = Q . K^T of the warp's 16 rows over the tile (Q and K tiles in shared memory, [row][DS]); the K
        // fragments of two k-steps at a time by ldmatrix.x4
        auto qk = [&](const half * Qt, const half * Kt, float (&S)[NJ][4]) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.0f;
            }
            const half * qa = Qt + (wq*16 + g)*DS + 2*t4;
#pragma unroll
            for (int kk = 0; kk < D/16; kk += 2) {
                uint32_t A[2][4];
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    A[u][0] = *(const uint32_t *) (qa + 16*(kk + u));
                    A[u][1] = *(const uint32_t *) (qa + 8*DS + 16*(kk + u));
                    A[u][2] = *(const uint32_t *) (qa + 16*(kk + u) + 8);
                    A[u][3] = *(const uint32_t *) (qa + 8*DS + 16*(kk + u) + 8);
                }
                const half * kb = Kt + (lane % 8)*DS + 16*kk + 8*(lane/8);
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    uint32_t b[4];
                    dpe_ldmatrix_x4(b, kb + 8*j*DS);
                    dpe_mma(S[j], A[0], b[0], b[1]);
                    dpe_mma(S[j], A[1], b[2], b[3]);
                }
            }
        };

        float S[NJ][4];
        qk(all_near ? Qn : Qf, all_near ? Kn : Kb, S);
        if (!all_far && !all_near) {
            float Sn[NJ][4];
            qk(Qn, Kn, Sn);
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int2 in = info[8*j + 2*t4 + (e & 1)];
                    const long long r = (long long) pq[e/2] - in.y;
                    if (in.x == tile && r >= 0 && r < a.window) {
                        S[j][e] = Sn[j][e];
                    }
                }
            }
        }

        // softcap, mask (slope times stock's mask; -inf for cells past the cache), online softmax
        if (a.softcap != 0.0f) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    S[j][e] = a.softcap*tanhf(S[j][e]);
                }
            }
        }
        if (a.mask_async) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    const float2 m = __half22float2(*(const half2 *) (Mb + mrow_s[rr]*SM::MS + 8*j + 2*t4));
                    S[j][2*rr]     += slope[rr]*m.x;
                    S[j][2*rr + 1] += slope[rr]*m.y;
                }
            }
        } else if (a.mask) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = c0 + 8*j + 2*t4 + (e & 1);
                    S[j][e] += c < a.n_kv ? slope[e/2]*__half2float(mrow[e/2][c]) : 0.0f;
                }
            }
        }
        if (nc < KT) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (8*j + 2*t4 + (e & 1) >= nc) {
                        S[j][e] = -INFINITY;
                    }
                }
            }
        }
        float mx[2] = { -INFINITY, -INFINITY };
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                mx[e/2] = fmaxf(mx[e/2], S[j][e]);
            }
        }
        float alpha[2], Mz[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 1));
            mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffff, mx[rr], 2));
            const float Mn = fmaxf(M[rr], mx[rr]);
            alpha[rr] = Mn == -INFINITY ? 1.0f : expf(M[rr] - Mn);
            M[rr]  = Mn;
            Mz[rr] = Mn == -INFINITY ? 0.0f : Mn; // every score of a row with no visible cell yet is -inf: p = 0
            L[rr] *= alpha[rr];
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = expf(S[j][e] - Mz[e/2]);
                S[j][e] = p;
                L[e/2] += p;
            }
        }
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            O[n][0] *= alpha[0];
            O[n][1] *= alpha[0];
            O[n][2] *= alpha[1];
            O[n][3] *= alpha[1];
        }

        // O += P . V; the V fragments of two n-tiles at a time by ldmatrix.x4.trans
#pragma unroll
        for (int kk = 0; kk < KT/16; ++kk) {
            const uint32_t A[4] = {
                dpe_pack(S[2*kk][0], S[2*kk][1]),         dpe_pack(S[2*kk][2], S[2*kk][3]),
                dpe_pack(S[2*kk + 1][0], S[2*kk + 1][1]), dpe_pack(S[2*kk + 1][2], S[2*kk + 1][3]) };
            const half * vb = Vb + (16*kk + (lane & 15))*DS + 8*(lane/16);
#pragma unroll
            for (int n = 0; n < NO; n += 2) {
                uint32_t b[4];
                dpe_ldmatrix_x4_trans(b, vb + 8*n);
                dpe_mma(O[n], A, b[0], b[1]);
                dpe_mma(O[n + 1], A, b[2], b[3]);
            }
        }
        } while (0);
        __syncthreads(); // this tile's buffers are free for the load two tiles on
    }

#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        L[rr] += __shfl_xor_sync(0xffffffff, L[rr], 1);
        L[rr] += __shfl_xor_sync(0xffffffff, L[rr], 2);
    }

    if constexpr (NWK > 1) {
        // merge the groups' partials into group 0's registers
        __syncthreads();
        float * Ob = (float *) (dpe_smem + SM::q_bytes);    // [NWK][RT][D]
        float * Mb = Ob + NWK*RT*D;                          // [NWK][RT]
        float * Lb = Mb + NWK*RT;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int r = wq*16 + g + 8*rr;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                *(float2 *) (Ob + (kg*RT + r)*D + 8*n + 2*t4) = make_float2(O[n][2*rr], O[n][2*rr + 1]);
            }
            if (t4 == 0) {
                Mb[kg*RT + r] = M[rr];
                Lb[kg*RT + r] = L[rr];
            }
        }
        __syncthreads();
        if (kg != 0) {
            return;
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int r = wq*16 + g + 8*rr;
            float Mt = -INFINITY;
            for (int k = 0; k < NWK; ++k) {
                Mt = fmaxf(Mt, Mb[k*RT + r]);
            }
            float Lt = 0.0f;
            float f[NWK];
            for (int k = 0; k < NWK; ++k) {
                f[k] = Mb[k*RT + r] == -INFINITY ? 0.0f : expf(Mb[k*RT + r] - Mt);
                Lt += f[k]*Lb[k*RT + r];
            }
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                float x = 0.0f, y = 0.0f;
                for (int k = 0; k < NWK; ++k) {
                    const float2 o = *(const float2 *) (Ob + (k*RT + r)*D + 8*n + 2*t4);
                    x += f[k]*o.x;
                    y += f[k]*o.y;
                }
                O[n][2*rr]     = x;
                O[n][2*rr + 1] = y;
            }
            M[rr] = Mt;
            L[rr] = Lt;
        }
    }

    // results: [D, n_head, n_tps, n_stream], or this split's partials
    const int n_rows_all = a.n_stream*a.n_tps*a.n_head;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        if (!valid[rr]) {
            continue;
        }
        const int64_t row_id = ((int64_t) s*a.n_tps + irow[rr])*a.n_head + hrow[rr];
        if (a.n_split == 1) {
            float l = L[rr];
            const float f = a.sinks ? dpe_add_sink(M[rr], l, a.sinks[hrow[rr]]) : 1.0f;
            const float inv = l == 0.0f ? 0.0f : f/l;
            float * y = a.dst + row_id*D + 2*t4;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                *(float2 *) (y + 8*n) = make_float2(O[n][2*rr]*inv, O[n][2*rr + 1]*inv);
            }
        } else {
            const int64_t p = (int64_t) blockIdx.z*n_rows_all + row_id;
            float * y = a.part + p*D + 2*t4;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                *(float2 *) (y + 8*n) = make_float2(O[n][2*rr], O[n][2*rr + 1]);
            }
            if (t4 == 0) {
                a.meta[p] = make_float2(M[rr], L[rr]);
            }
        }
    }
#else
    GGML_UNUSED(a);
    NO_DEVICE_CODE;
#endif
}

// N consecutive elements e .. e+N-1 (N = 2, 4 or 8; e a multiple of N) of a row of the cache, as floats
template <ggml_type T, int N>
__device__ __forceinline__ void dpe_loadf(const char * row, const int e, float (&x)[N]) {
    static_assert(N == 2 || N == 4 || N == 8, "dpe_loadf: 2, 4 or 8 elements");
    if constexpr (T == GGML_TYPE_F16) {
        half2 h[N/2];
        if constexpr (N == 8) {
            *(uint4 *) h = *(const uint4 *) (row + 2*e);
        } else if constexpr (N == 4) {
            *(uint2 *) h = *(const uint2 *) (row + 2*e);
        } else {
            h[0] = *(const half2 *) (row + 2*e);
        }
#pragma unroll
        for (int i = 0; i < N/2; ++i) {
            const float2 f = __half22float2(h[i]);
            x[2*i] = f.x;
            x[2*i + 1] = f.y;
        }
    } else if constexpr (T == GGML_TYPE_F32) {
#pragma unroll
        for (int i = 0; i < N; i += 2) {
            const float2 f = *(const float2 *) (row + 4*(e + i));
            x[i] = f.x;
            x[i + 1] = f.y;
        }
    } else {
        static_assert(T == GGML_TYPE_Q8_0, "dpe_loadf: F16, F32 or Q8_0");
        const block_q8_0 * b = (const block_q8_0 *) row + e/QK8_0;
        const float d = __half2float(b->d);
        const int16_t * qs = (const int16_t *) (b->qs + e % QK8_0); // 2-byte aligned: blocks are 34 bytes
#pragma unroll
        for (int i = 0; i < N/2; ++i) {
            const int16_t p = qs[i];
            x[2*i] = d*(float) (int8_t) (p & 0xff);
            x[2*i + 1] = d*(float) (int8_t) (p >> 8);
        }
    }
}

// shared memory of the vector kernel: the warps' V chunks (F16 caches: copied by cp.async while the chunk's keys
// are scored), per-row facts, then Q tiles and the warps' softmax weights, which the warps' partial outputs
// replace once every cell is scored
template <int D, int R, int NW, bool VS>
struct dpe_fa_vec_smem {
    static constexpr int    U      = 2*R*D + NW*32*R > (NW - 1)*R*D ? 2*R*D + NW*32*R : (NW - 1)*R*D; // floats
    static constexpr size_t vbytes = VS ? sizeof(half)*NW*32*D : 0;
    static constexpr size_t bytes  = vbytes + sizeof(int64_t)*R + (sizeof(int) + sizeof(float))*R +
                                     sizeof(float)*U + sizeof(float2)*NW*R;
};

// Decode: at most R rows (token, head of the KV head's group) of one KV head. Each warp scores 32 cells at a time,
// one cell per lane, in F32 (K rows read whole per lane; Q broadcast from shared memory), then adds their values
// with the lanes over the head dim. A cell that is a window slot near some row is scored with q . k_win as well,
// and each row takes the product its distance selects. The block's warps own contiguous ranges of the block's
// split of the cells; partials merge exactly, in shared memory and across splits by dpe_fattn_combine.
// Latency: a chunk's loads (its values by cp.async for F16 caches, its mask, its keys) are issued together, and
// the window slots of the next chunk are read while this one is scored.
template <int D, int R, ggml_type KV_T>
__global__ void __launch_bounds__(128) dpe_fattn_vec(const dpe_fa_args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int  NW = 4;
    constexpr int  VN = D/32; // values per lane in the V product
    constexpr bool VS = KV_T == GGML_TYPE_F16;
    using SM = dpe_fa_vec_smem<D, R, NW, VS>;

    extern __shared__ __align__(16) char dpe_smem[];
    half    * Vs   = (half *) dpe_smem;                    // [NW][32][D] the warps' V chunks (VS)
    int64_t * moff = (int64_t *) (dpe_smem + SM::vbytes); // [R] the rows' mask offsets
    int     * rpq  = (int *) (moff + R);       // [R] their positions
    float   * rsl  = (float *) (rpq + R);      // [R] their ALiBi slopes
    float   * Qn   = rsl + R;                  // [R][D] q, scaled
    float   * Qf   = Qn + R*D;                 // [R][D] q_far, scaled
    float   * P    = Qf + R*D;                 // [NW][32][R] softmax weights of the warp's chunk
    float   * Ob   = Qn;                       // [NW - 1][R][D] partial outputs of warps 1.. (after the cells)
    float2  * ML   = (float2 *) (Qn + SM::U);  // [NW][R] their (max, sum)
    static_assert(SM::vbytes % 16 == 0 && (sizeof(int64_t)*R + (sizeof(int) + sizeof(float))*R) % 16 == 0,
                  "Q tiles 16-byte aligned");

    const int tid  = threadIdx.x;
    const int warp = tid/32;
    const int lane = tid % 32;
    const int hk   = blockIdx.y % a.n_head_kv;
    const int s    = blockIdx.y / a.n_head_kv;

    for (int e = tid; e < R*D; e += blockDim.x) {
        const int r = e/D;
        const int d = e % D;
        float vn = 0.0f, vf = 0.0f;
        if (r < a.rows) {
            const int i = r/a.G;
            const int h = hk*a.G + r % a.G;
            vn = a.scale*a.q [i*a.q_s1  + h*a.q_s2  + s*a.q_s3  + d];
            vf = a.scale*a.qf[i*a.qf_s1 + h*a.qf_s2 + s*a.qf_s3 + d];
        }
        Qn[e] = vn;
        Qf[e] = vf;
    }
    if (tid < R) {
        const int  r  = tid;
        const bool ok = r < a.rows;
        const int  i  = ok ? r/a.G : 0;
        const int  h  = hk*a.G + (ok ? r % a.G : 0);
        moff[r] = a.mask ? i*a.m_s1 + (h % a.m_ne2)*a.m_s2 + (s % a.m_ne3)*a.m_s3 : 0;
        rpq[r]  = a.pos_q[s*a.n_tps + i];
        rsl[r]  = dpe_slope(a, h);
    }
    __syncthreads();

    long long pq_min = LLONG_MAX, pq_max = LLONG_MIN;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r < a.rows) {
            pq_min = min(pq_min, (long long) rpq[r]);
            pq_max = max(pq_max, (long long) rpq[r]);
        }
    }

    // the warp's chunks of 32 cells
    const int n_chunks = (a.n_kv + 31)/32;
    const int b_begin  = blockIdx.z*a.tiles_per_split;
    const int b_end    = min(n_chunks, b_begin + a.tiles_per_split);
    const int per_warp = b_end > b_begin ? (b_end - b_begin + NW - 1)/NW : 0;
    const int w_begin  = b_begin + warp*per_warp;
    const int w_end    = min(b_end, w_begin + per_warp);

    // the first real window slot at or after the warp's first cell (real slots ascend, padding follows them)
    const int32_t * ids = a.idx + (int64_t) s*a.n_win;
    const int32_t * pws = a.pos_win + (int64_t) s*a.n_win;
    const int c_first = w_begin*32;
    int cursor = dpe_warp_partition(a.n_win, [&](int i) { return pws[i] != INT32_MAX && ids[i] < c_first; });

    // lane l holds slot cursor + l: its cell (INT_MAX past the real slots) and position
    int cell_l = INT_MAX, pw_l = INT32_MAX;
    auto read_slots = [&]() {
        const int sl = cursor + lane;
        cell_l = INT_MAX;
        pw_l   = INT32_MAX;
        if (sl < a.n_win) {
            const int32_t p = pws[sl];
            const int32_t j = ids[sl];
            pw_l   = p;
            cell_l = p != INT32_MAX ? j : INT_MAX;
        }
    };
    read_slots();

    const char  * kbase  = a.k + hk*a.k_nb2 + s*a.k_nb3;
    const char  * vbase  = a.v + hk*a.v_nb2 + s*a.v_nb3;
    const float * kwbase = a.kw + hk*a.kw_s2 + s*a.kw_s3;
    float * Pw = P + warp*32*R;
    half  * Vw = Vs + warp*32*D;

    float M[R], L[R], O[R][VN];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        M[r] = -INFINITY;
        L[r] = 0.0f;
#pragma unroll
        for (int n = 0; n < VN; ++n) {
            O[r][n] = 0.0f;
        }
    }

    for (int ck = w_begin; ck < w_end; ++ck) {
        const int  c0 = ck*32;
        const int  c  = c0 + lane;
        const bool ok = c < a.n_kv;
        const int  nc = min(32, a.n_kv - c0);

        if constexpr (VS) {
            // the chunk's values, arriving while its keys are scored (cells past the cache: zeros)
            constexpr int CH = D/8; // 16-byte pieces per row
#pragma unroll 2
            for (int e = lane; e < 32*CH; e += 32) {
                const int  t   = e/CH;
                const int  ch  = e % CH;
                const bool okv = t < nc;
                dpe_cp_async16(Vw + t*D + 8*ch, okv ? vbase + (int64_t) (c0 + t)*a.v_nb1 + 16*ch : vbase, okv);
            }
            dpe_cp_async_commit();
        }

        // slope * mask of each row's pair with the lane's cell (-inf: masked)
        float mv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            mv[r] = -INFINITY;
            if (ok && r < a.rows) {
                mv[r] = a.mask ? rsl[r]*__half2float(a.mask[moff[r] + c]) : 0.0f;
            }
        }

        // the chunk's window slots: the first popc(present) of lanes' slots (their cells ascend from c0)
        const bool     in_chunk = cell_l >= c0 && cell_l < c0 + 32;
        const unsigned present  = __reduce_or_sync(0xffffffff, in_chunk ? 1u << (cell_l - c0) : 0u);
        const bool has  = (present >> lane) & 1;
        const int  rank = __popc(present & ((1u << lane) - 1)); // the lane's cell is slot cursor + rank
        const int  sl   = cursor + rank;
        const int  pw_r = __shfl_sync(0xffffffff, pw_l, rank);
        cursor += __popc(present);
        read_slots(); // the next chunk's

        long long pw = 0;
        bool any_near = false, all_near = false;
        if (has) {
            pw = pw_r;
            any_near = pq_max - pw >= 0 && pq_min - pw < a.window;
            all_near = pq_min - pw >= 0 && pq_max - pw < a.window;
        }

        float sc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            sc[r] = 0.0f;
        }
        if (ok && !all_near) {
            const char * krow = kbase + (int64_t) c*a.k_nb1;
#pragma unroll
            for (int e = 0; e < D; e += 8) {
                float x[8];
                dpe_loadf<KV_T, 8>(krow, e, x);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float4 q0 = *(const float4 *) (Qf + r*D + e);
                    const float4 q1 = *(const float4 *) (Qf + r*D + e + 4);
                    sc[r] += q0.x*x[0] + q0.y*x[1] + q0.z*x[2] + q0.w*x[3] + q1.x*x[4] + q1.y*x[5] + q1.z*x[6] + q1.w*x[7];
                }
            }
        }
        if (ok && any_near) {
            const char * kwrow = (const char *) (kwbase + (int64_t) (a.kw_slots ? c % a.kw_slots : sl)*a.kw_s1);
            float sn[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                sn[r] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < D; e += 8) {
                float x[8];
                dpe_loadf<GGML_TYPE_F32, 8>(kwrow, e, x);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float4 q0 = *(const float4 *) (Qn + r*D + e);
                    const float4 q1 = *(const float4 *) (Qn + r*D + e + 4);
                    sn[r] += q0.x*x[0] + q0.y*x[1] + q0.z*x[2] + q0.w*x[3] + q1.x*x[4] + q1.y*x[5] + q1.z*x[6] + q1.w*x[7];
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const long long d = (long long) rpq[r] - pw;
                if (d >= 0 && d < a.window) {
                    sc[r] = sn[r];
                }
            }
        }

        // softcap, mask, online softmax of the chunk
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float x = sc[r];
            if (a.softcap != 0.0f) {
                x = a.softcap*tanhf(x);
            }
            x = mv[r] == -INFINITY ? -INFINITY : x + mv[r];
            float mx = x;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
            }
            const float Mn    = fmaxf(M[r], mx);
            const float alpha = Mn == -INFINITY ? 1.0f : expf(M[r] - Mn);
            const float p     = Mn == -INFINITY ? 0.0f : expf(x - Mn);
            M[r] = Mn;
            L[r] = L[r]*alpha + p;
#pragma unroll
            for (int n = 0; n < VN; ++n) {
                O[r][n] *= alpha;
            }
            Pw[lane*R + r] = p;
        }
        if constexpr (VS) {
            dpe_cp_async_wait_all(); // this lane's pieces of the chunk's values
        }
        __syncwarp();                // every lane's weights and values

        // O += P . V, the lanes over the head dim
        auto add_cell = [&](const int j) {
            float v[VN];
            if constexpr (VS) {
                dpe_loadf<GGML_TYPE_F16, VN>((const char *) (Vw + j*D), lane*VN, v);
            } else {
                dpe_loadf<KV_T, VN>(vbase + (int64_t) (c0 + j)*a.v_nb1, lane*VN, v);
            }
#pragma unroll
            for (int r = 0; r < R; r += 4) {
                const float4 p = *(const float4 *) (Pw + j*R + r);
#pragma unroll
                for (int n = 0; n < VN; ++n) {
                    O[r + 0][n] += p.x*v[n];
                    O[r + 1][n] += p.y*v[n];
                    O[r + 2][n] += p.z*v[n];
                    O[r + 3][n] += p.w*v[n];
                }
            }
        };
        // values in shared memory: a few rows at a time; from the cache: 8 loads in flight
        constexpr int UNROLL = VS ? 4 : 8;
        if (nc == 32) {
#pragma unroll UNROLL
            for (int j = 0; j < 32; ++j) {
                add_cell(j);
            }
        } else {
            for (int j = 0; j < nc; ++j) {
                add_cell(j);
            }
        }
        __syncwarp(); // P and the warp's V chunk are rewritten by the next chunk
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            L[r] += __shfl_xor_sync(0xffffffff, L[r], o);
        }
    }

    // merge the warps' partials into warp 0
    __syncthreads(); // every warp is done with Q and P, which Ob overwrites
    if (warp > 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int n = 0; n < VN; ++n) {
                Ob[((warp - 1)*R + r)*D + lane*VN + n] = O[r][n];
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            ML[warp*R + r] = make_float2(M[r], L[r]);
        }
    }
    __syncthreads();
    if (warp > 0) {
        return;
    }

    const int n_rows_all = a.n_stream*a.n_tps*a.n_head;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r >= a.rows) {
            continue;
        }
        float Mt = -INFINITY;
#pragma unroll
        for (int k = 0; k < NW; ++k) {
            Mt = fmaxf(Mt, ML[k*R + r].x);
        }
        float f[NW];
        float Lt = 0.0f;
#pragma unroll
        for (int k = 0; k < NW; ++k) {
            const float2 ml = ML[k*R + r];
            f[k] = ml.x == -INFINITY ? 0.0f : expf(ml.x - Mt);
            Lt += f[k]*ml.y;
        }
        float y[VN];
#pragma unroll
        for (int n = 0; n < VN; ++n) {
            y[n] = f[0]*O[r][n];
#pragma unroll
            for (int k = 1; k < NW; ++k) {
                y[n] += f[k]*Ob[((k - 1)*R + r)*D + lane*VN + n];
            }
        }
        const int i = r/a.G;
        const int h = hk*a.G + r % a.G;
        const int64_t row_id = ((int64_t) s*a.n_tps + i)*a.n_head + h;
        if (a.n_split == 1) {
            const float fs  = a.sinks ? dpe_add_sink(Mt, Lt, a.sinks[h]) : 1.0f;
            const float inv = Lt == 0.0f ? 0.0f : fs/Lt;
#pragma unroll
            for (int n = 0; n < VN; ++n) {
                a.dst[row_id*D + lane*VN + n] = y[n]*inv;
            }
        } else {
            const int64_t p = (int64_t) blockIdx.z*n_rows_all + row_id;
#pragma unroll
            for (int n = 0; n < VN; ++n) {
                a.part[p*D + lane*VN + n] = y[n];
            }
            if (lane == 0) {
                a.meta[p] = make_float2(Mt, Lt);
            }
        }
    }
#else
    GGML_UNUSED(a);
    NO_DEVICE_CODE;
#endif
}

// max or sum of x over the block (blockDim.x a multiple of 32, at most 1024); red: 32 floats of shared memory
template <bool MAX>
__device__ __forceinline__ float dpe_block_reduce(float x, float * red) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x/32, n_warps = blockDim.x/32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(0xffffffff, x, o);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    if (lane == 0) {
        red[warp] = x;
    }
    __syncthreads();
    x = lane < n_warps ? red[lane] : (MAX ? -INFINITY : 0.0f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(0xffffffff, x, o);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    __syncthreads(); // red is reused
    return x;
}

// the splits' partials of one row merged exactly, then the sink and the normalisation. The block's threads find
// the splits' weights together (dynamic shared memory: n_split floats), then thread (d, y) of the block's
// (blockDim.x/ny) x ny adds dims d, d + blockDim.x/ny, ... over splits y, y + ny, ... (so that ny times more
// loads are in flight than with one thread per dim: at depth 32768 decode has hundreds of splits), and the ny
// sums of a dim are added in a fixed order.
static __global__ void dpe_fattn_combine(const float * part, const float2 * meta, const float * sinks, float * dst,
                                         const int D, const int n_rows_all, const int n_split, const int n_head,
                                         const int ny) {
    extern __shared__ float dpe_combine_smem[];
    float * split_w = dpe_combine_smem;           // [n_split]
    float * sums    = dpe_combine_smem + n_split;  // [ny][D]
    __shared__ float red[32];
    const int64_t row = blockIdx.x;
    const int dx = blockDim.x/ny;
    const int tx = threadIdx.x % dx;
    const int ty = threadIdx.x / dx;

    float m = -INFINITY;
    for (int k = threadIdx.x; k < n_split; k += blockDim.x) {
        const float2 ml = meta[(int64_t) k*n_rows_all + row];
        if (ml.y > 0.0f) {
            m = fmaxf(m, ml.x);
        }
    }
    const float Mt = dpe_block_reduce<true>(m, red);
    float l = 0.0f;
    for (int k = threadIdx.x; k < n_split; k += blockDim.x) {
        const float2 ml = meta[(int64_t) k*n_rows_all + row];
        const float  w  = ml.y > 0.0f ? expf(ml.x - Mt) : 0.0f;
        split_w[k] = w;
        l += ml.y*w; // w = 0 where the split saw no cell of the row
    }
    float Lt = dpe_block_reduce<false>(l, red); // its barriers also publish split_w
    const float f = sinks ? dpe_add_sink(Mt, Lt, sinks[row % n_head]) : 1.0f;
    const float inv = Lt == 0.0f ? 0.0f : f/Lt;
    for (int d = tx; d < D; d += dx) {
        float acc = 0.0f;
#pragma unroll 4
        for (int k = ty; k < n_split; k += ny) {
            const float w = split_w[k];
            const float x = part[((int64_t) k*n_rows_all + row)*D + d];
            acc += w != 0.0f ? x*w : 0.0f; // a split that saw no cell of the row adds nothing
        }
        sums[ty*D + d] = acc;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int y = 0; y < ny; ++y) {
            acc += sums[y*D + d];
        }
        dst[row*D + d] = acc*inv;
    }
}

// a diagnostic knob of the launch (an environment variable read once; dflt when unset)
static int dpe_fa_knob(const char * name, const int dflt) {
    const char * v = getenv(name);
    return v && *v ? atoi(v) : dflt;
}

// Runs one of the kernels over grid_x row blocks of every (KV head, stream), its n_units units of cells (tiles or
// chunks) split across blocks when the row blocks alone leave SMs idle, each split at least min_units units; then
// merges the splits (dpe_fattn_combine).
// occ: the kernel's own cache of its blocks per SM, per device (set on its first launch there).
template <typename K>
static void dpe_fattn_run(ggml_backend_cuda_context & ctx, dpe_fa_args a, K kernel, int (&occ)[GGML_CUDA_MAX_DEVICES],
                          const int nthreads, const size_t smem, const int grid_x, const int n_units,
                          const int min_units) {
    const int id = ggml_cuda_get_device();
    if (occ[id] == 0) {
        int n = 0;
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem));
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, nthreads, smem));
        occ[id] = n < 1 ? 1 : n;
    }
    const int occupancy = occ[id];

    const int64_t blocks_xy = (int64_t) grid_x*a.n_head_kv*a.n_stream;
    const int64_t target    = (int64_t) ggml_cuda_info().devices[id].nsm*occupancy;
    // splits: as many as fit one wave of blocks beside the row blocks (DPE_FA_SPLIT_CEIL=1: enough to fill it,
    // which can start a second, almost empty wave)
    static const bool split_ceil = dpe_fa_knob("DPE_FA_SPLIT_CEIL", 0) != 0;
    int n_split = 1;
    if (blocks_xy < target) {
        const int64_t most = std::max<int64_t>(1, n_units/min_units);
        const int64_t fit  = split_ceil ? (target + blocks_xy - 1)/blocks_xy : target/blocks_xy;
        n_split = (int) std::min<int64_t>(most, fit);
    }
    a.tiles_per_split = (n_units + n_split - 1)/n_split;
    n_split = (n_units + a.tiles_per_split - 1)/a.tiles_per_split;
    n_split = n_split < 1 ? 1 : n_split;
    a.n_split = n_split;

    const int n_rows_all = a.n_stream*a.n_tps*a.n_head;
    ggml_cuda_pool_alloc<float>  part(ctx.pool());
    ggml_cuda_pool_alloc<float2> meta(ctx.pool());
    if (n_split > 1) {
        a.part = part.alloc((size_t) n_split*n_rows_all*a.D);
        a.meta = meta.alloc((size_t) n_split*n_rows_all);
    }
    cudaStream_t stream = ctx.stream();
    kernel<<<dim3(grid_x, a.n_head_kv*a.n_stream, n_split), nthreads, smem, stream>>>(a);
    CUDA_CHECK(cudaGetLastError());
    if (n_split > 1) {
        static const int combine_y = dpe_fa_knob("DPE_FA_COMBINE_Y", 4);
        const int dx = a.D < 128 ? a.D : 128;
        const int ny = std::max(1, std::min(combine_y, 1024/dx));
        dpe_fattn_combine<<<n_rows_all, ny*dx, (n_split + ny*a.D)*sizeof(float), stream>>>(
            a.part, a.meta, a.sinks, a.dst, a.D, n_rows_all, n_split, a.n_head, ny);
        CUDA_CHECK(cudaGetLastError());
    }
}

template <int D, int KT, int NWQ, int NWK, ggml_type KV_T>
static void dpe_fattn_launch(ggml_backend_cuda_context & ctx, const dpe_fa_args & a) {
    using SM = dpe_fa_smem<D, KT, NWQ, NWK>;
    // each split at least 2 tiles per group of warps
    static int occ[GGML_CUDA_MAX_DEVICES] = {};
    dpe_fattn_run(ctx, a, dpe_fattn<D, KT, NWQ, NWK, KV_T>, occ, 32*NWQ*NWK, SM::bytes, (a.rows + SM::RT - 1)/SM::RT,
                  (a.n_kv + KT - 1)/KT, 2*NWK);
}

template <int D, int R, ggml_type KV_T>
static void dpe_fattn_vec_launch(ggml_backend_cuda_context & ctx, const dpe_fa_args & a) {
    GGML_ASSERT(a.rows <= R);
    // 4 warps, each split at least 2 chunks of 32 cells per warp (16 chunks per split measured no better on the
    // H200: tg64 0.46-0.56 of stock against 0.54-0.59 with 8). A short cache is split into up to 8 ranges of
    // fewer chunks: the kernel is latency-bound there (ncu, depth 0: 3 blocks on the whole GPU, 13.6 us
    // against stock's 4.7 us), so the splits' blocks run side by side and the combine merges them.
    // DPE_FA_VEC_MIN_CHUNKS=n: each split at least n chunks instead
    static int occ[GGML_CUDA_MAX_DEVICES] = {};
    static const int min_chunks = dpe_fa_knob("DPE_FA_VEC_MIN_CHUNKS", 0);
    const int n_chunks = (a.n_kv + 31)/32;
    dpe_fattn_run(ctx, a, dpe_fattn_vec<D, R, KV_T>, occ, 128,
                  dpe_fa_vec_smem<D, R, 4, KV_T == GGML_TYPE_F16>::bytes, 1, n_chunks,
                  min_chunks > 0 ? min_chunks : std::max(1, std::min(8, n_chunks/8)));
}

// decode (a few rows per KV head: the vector kernel; up to 16 rows at head dim 256: one 16-row tensor-core slice,
// the cells split over several warps) or prefill (tensor-core tiles)
template <int D, ggml_type KV_T>
static void dpe_fattn_dispatch(ggml_backend_cuda_context & ctx, const dpe_fa_args & a) {
    // KV tiles of 32 cells at head dim 64 (H200: pp4096 0.80 against 0.68 of stock with 64 at depth 8192, one
    // llama-bench run each, docs/RESULTS.md) and 256 (registers); 64 at head dim 128
    constexpr int KT_PREFILL = D == 128 ? 64 : 32;
    constexpr int R_VEC      = D <= 128 ? 16 : 8;
    if (a.rows <= 4) {
        dpe_fattn_vec_launch<D, 4, KV_T>(ctx, a);
    } else if (a.rows <= R_VEC) {
        dpe_fattn_vec_launch<D, R_VEC, KV_T>(ctx, a);
    } else {
        if constexpr (R_VEC < 16) {
            if (a.rows <= 16) {
                dpe_fattn_launch<D, 32, 1, 2, KV_T>(ctx, a);
                return;
            }
        }
        dpe_fattn_launch<D, KT_PREFILL, 4, 1, KV_T>(ctx, a);
    }
}

template <int D>
static void dpe_fattn_dispatch_type(ggml_backend_cuda_context & ctx, const dpe_fa_args & a, ggml_type t) {
    switch (t) {
        case GGML_TYPE_F16:  dpe_fattn_dispatch<D, GGML_TYPE_F16>(ctx, a);  break;
        case GGML_TYPE_F32:  dpe_fattn_dispatch<D, GGML_TYPE_F32>(ctx, a);  break;
        case GGML_TYPE_Q8_0: dpe_fattn_dispatch<D, GGML_TYPE_Q8_0>(ctx, a); break;
        default: GGML_ABORT("dpe_flash_attn: K/V type %s is not supported on CUDA", ggml_type_name(t));
    }
}

static bool dpe_f32_rows(const ggml_tensor * t) {
    return t->type == GGML_TYPE_F32 && t->nb[0] == sizeof(float) &&
           t->nb[1] % sizeof(float) == 0 && t->nb[2] % sizeof(float) == 0 && t->nb[3] % sizeof(float) == 0;
}

} // namespace

bool ggml_cuda_supports_dpe_flash_attn(int device, const ggml_tensor * op) {
#if defined(GGML_USE_HIP) || defined(GGML_USE_MUSA)
    GGML_UNUSED(device); GGML_UNUSED(op);
    return false; // the kernel is written with NVIDIA's mma.sync
#else
    const int cc = ggml_cuda_info().devices[device].cc;
    if (!ampere_mma_available(cc)) { // built for Ampere or newer and running there
        return false;
    }
    const ggml_tensor * q = op->src[0], * qf = op->src[1], * k = op->src[2], * v = op->src[3];
    const ggml_tensor * mask = op->src[4], * kw = op->src[5], * sinks = op->src[9];
    const int64_t D = k->ne[0];
    if (D != 64 && D != 128 && D != 256) {
        return false;
    }
    if (v->ne[0] != D || k->type != v->type ||
        (k->type != GGML_TYPE_F16 && k->type != GGML_TYPE_F32 && k->type != GGML_TYPE_Q8_0)) {
        return false;
    }
    // F16 and F32 rows are read 16 bytes at a time, Q8_0 blocks 2 bytes at a time; window keys 16 bytes at a time
    const size_t align = k->type == GGML_TYPE_Q8_0 ? 2 : 16;
    for (const ggml_tensor * t : { k, v }) {
        if (t->nb[1] % align != 0 || t->nb[2] % align != 0 || t->nb[3] % align != 0) {
            return false;
        }
    }
    if (!dpe_f32_rows(q) || !dpe_f32_rows(qf) || !dpe_f32_rows(kw) ||
        kw->nb[1] % 16 != 0 || kw->nb[2] % 16 != 0 || kw->nb[3] % 16 != 0) {
        return false;
    }
    if (mask && (mask->type != GGML_TYPE_F16 || !ggml_is_contiguous(mask))) {
        return false;
    }
    if (sinks && (sinks->type != GGML_TYPE_F32 || !ggml_is_contiguous(sinks))) {
        return false;
    }
    return op->type == GGML_TYPE_F32 && ggml_is_contiguous(op) &&
           k->ne[1] <= INT_MAX/2 && q->ne[1]*(q->ne[2]/k->ne[2]) <= INT_MAX/2 && kw->ne[1] <= INT_MAX/2;
#endif
}

void ggml_cuda_op_dpe_flash_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0], * qf = dst->src[1], * k = dst->src[2], * v = dst->src[3];
    const ggml_tensor * mask = dst->src[4], * kw = dst->src[5], * sinks = dst->src[9];

    dpe_fa_args a = {};
    a.q  = (const float *) q->data;  a.q_s1  = q->nb[1]/4;  a.q_s2  = q->nb[2]/4;  a.q_s3  = q->nb[3]/4;
    a.qf = (const float *) qf->data; a.qf_s1 = qf->nb[1]/4; a.qf_s2 = qf->nb[2]/4; a.qf_s3 = qf->nb[3]/4;
    a.k  = (const char *) k->data;   a.k_nb1 = k->nb[1];    a.k_nb2 = k->nb[2];    a.k_nb3 = k->nb[3];
    a.v  = (const char *) v->data;   a.v_nb1 = v->nb[1];    a.v_nb2 = v->nb[2];    a.v_nb3 = v->nb[3];
    a.kw = (const float *) kw->data; a.kw_s1 = kw->nb[1]/4; a.kw_s2 = kw->nb[2]/4; a.kw_s3 = kw->nb[3]/4;
    if (mask) {
        a.mask = (const half *) mask->data;
        a.m_s1 = mask->nb[1]/2; a.m_s2 = mask->nb[2]/2; a.m_s3 = mask->nb[3]/2;
        a.m_ne2 = (int) mask->ne[2]; a.m_ne3 = (int) mask->ne[3];
        a.mask_async = (uintptr_t) mask->data % 16 == 0 && a.m_s1 % 8 == 0 && a.m_s2 % 8 == 0 && a.m_s3 % 8 == 0 &&
                       k->ne[1] % 8 == 0;
    }
    a.idx     = (const int32_t *) dst->src[6]->data;
    a.pos_win = (const int32_t *) dst->src[7]->data;
    a.pos_q   = (const int32_t *) dst->src[8]->data;
    a.sinks   = sinks ? (const float *) sinks->data : nullptr;
    a.dst     = (float *) dst->data;

    a.n_tps     = (int) q->ne[1];
    a.n_head    = (int) q->ne[2];
    a.n_stream  = (int) q->ne[3];
    a.n_head_kv = (int) k->ne[2];
    a.n_kv      = (int) k->ne[1];
    a.n_win     = (int) dst->src[6]->ne[0];
    a.kw_slots  = ((const int32_t *) dst->op_params)[GGML_DPE_FATTN_P_KW_SLOTS];
    a.G         = a.n_head/a.n_head_kv;
    a.rows      = a.n_tps*a.G;
    a.D         = (int) k->ne[0];

    const float * op = (const float *) dst->op_params;
    const float max_bias = op[GGML_DPE_FATTN_P_MAX_BIAS];
    a.scale   = op[GGML_DPE_FATTN_P_SCALE];
    a.softcap = op[GGML_DPE_FATTN_P_SOFTCAP];
    a.window  = ((const int32_t *) dst->op_params)[GGML_DPE_FATTN_P_WINDOW];
    if (a.softcap != 0.0f) {
        a.scale /= a.softcap;
    }
    a.alibi       = max_bias > 0.0f;
    a.n_head_log2 = 1 << (int) floorf(log2f((float) a.n_head));
    a.m0 = powf(2.0f, -(max_bias       )/a.n_head_log2);
    a.m1 = powf(2.0f, -(max_bias / 2.0f)/a.n_head_log2);

    GGML_ASSERT((uintptr_t) kw->data % 16 == 0);
    if (k->type != GGML_TYPE_Q8_0) {
        GGML_ASSERT((uintptr_t) k->data % 16 == 0 && (uintptr_t) v->data % 16 == 0);
    }
    if (a.n_tps == 0 || a.n_kv == 0) {
        return;
    }
    switch (k->ne[0]) {
        case 64:  dpe_fattn_dispatch_type<64>(ctx, a, k->type);  break;
        case 128: dpe_fattn_dispatch_type<128>(ctx, a, k->type); break;
        case 256: dpe_fattn_dispatch_type<256>(ctx, a, k->type); break;
        default: GGML_ABORT("dpe_flash_attn: head dim %d is not supported on CUDA", (int) k->ne[0]);
    }
}
