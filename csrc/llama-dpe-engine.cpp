// dpe-gguf: DPE inside llama.cpp (dpe-spec.md section 3). Compiled into libllama; called from the hooks
// in patches/0004-llama-dpe-engine.patch (declarations: llama-dpe-impl.h).
//
// Design (docs/engine-design.md section 1, with one change): the KV cache stores what stock stores
// (K rotated by ordinary RoPE at the cell's position). For layers with DPE, the far keys are derived
// per graph from the cached keys and the cells' positions by GGML_OP_ROPE_DPE, and the far queries
// from the ordinary queries. Near and far scores then go through ONE stock attention call:
//
//   q' = [q ; q_far]          (head dim 2*d)
//   k' = [[k ; 0] | [0 ; k_far]]   (head dim 2*d, 2*n_kv keys: near copies, then far copies)
//   v' = [v | v]
//   mask' = [mask_near | mask_far], mask_near = stock mask where i - j < w, mask_far where i - j >= w
//
// so q'.k'_j = q.k_j for the near copy of cell j and q_far.k_far_j for the far copy, and the softmax
// normalises both sets together: exactly the merged attention of the spec, with flash attention on or
// off, any KV cache type (keys/values are read as F32), CPU or CUDA. KV memory is stock's. Cost: 4x
// the QK and PV work of stock attention; the fast path (a fused kernel over the window and the far
// cache) replaces this without touching the cache or the inputs.
//
// Position shifts (seq_add, seq_div, context shift) are refused (patches/0004, llama-kv-cache.cpp):
// DPE's positions floor(j/s) are not shift-invariant, so the values of shifted cells, computed by
// earlier layers at the old positions, would no longer be what the shifted prompt computes.

#include "llama-dpe-impl.h"

#include "ggml-backend.h"
#include "ggml-dpe.h"
#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include <cmath>
#include <stdexcept>
#include <vector>

static const char * dpe_rope_type_name(llama_rope_type t) {
    switch (t) {
        case LLAMA_ROPE_TYPE_NONE:   return "none";
        case LLAMA_ROPE_TYPE_NORM:   return "normal";
        case LLAMA_ROPE_TYPE_NEOX:   return "neox";
        case LLAMA_ROPE_TYPE_MROPE:  return "mrope";
        case LLAMA_ROPE_TYPE_IMROPE: return "imrope";
        case LLAMA_ROPE_TYPE_VISION: return "vision";
    }
    return "unknown";
}

void llama_dpe_load_hparams(llama_model_loader & ml, llama_model_base & model) {
    auto & hp  = model.hparams;
    auto & dpe = hp.dpe;

    uint32_t version = 0;
    if (!ml.get_key("dpe.version", version, false)) {
        return; // not a DPE model
    }
    if (version != 1) {
        throw std::runtime_error(format("DPE: unknown dpe.version %u; this build of dpe-gguf reads version 1 "
                                        "(update dpe-gguf, or re-convert the model with this version)", version));
    }
    uint32_t window = 0;
    ml.get_key("dpe.window", window, true);

    dpe.version = version;
    dpe.window  = window;
    dpe.model   = &model;

    if (window == 0) {
        LLAMA_LOG_INFO("%s: DPE parameters present, DPE off (dpe.window = 0)\n", __func__);
        return;
    }
    if (window >= hp.n_ctx_train) {
        throw std::runtime_error(format("DPE: window %u is not below the trained context %u; "
                                        "choose a smaller window (--dpe-window)", window, hp.n_ctx_train));
    }
    if (hp.rope_type != LLAMA_ROPE_TYPE_NORM && hp.rope_type != LLAMA_ROPE_TYPE_NEOX) {
        throw std::runtime_error(format("DPE: rope type '%s' is not supported (NORMAL and NEOX are); "
                                        "run the model without DPE (--dpe off)", dpe_rope_type_name(hp.rope_type)));
    }
    if (hp.swa_type != LLAMA_SWA_TYPE_NONE) {
        throw std::runtime_error("DPE: models with sliding-window attention layers are not supported yet; "
                                 "run the model without DPE (--dpe off)");
    }
    for (uint32_t il = 0; il < hp.n_layer_all; ++il) {
        if (hp.n_head_kv(il) != hp.n_head_kv(0) || hp.n_rot(il) != hp.n_rot(0)) {
            throw std::runtime_error("DPE: models whose layers differ in KV heads or rotary dims are not supported; "
                                     "run the model without DPE (--dpe off)");
        }
    }
    // A DPE model serves its target context: programs that default to or cap at the trained context
    // (llama-cli -c 0, llama-server's per-slot cap) see the target. RoPE itself never reads n_ctx_train
    // past this point (YaRN's original context was taken from it before), so nothing else changes.
    uint32_t target = 0;
    ml.get_key("dpe.target_context_length", target, false);
    if (target > hp.n_ctx_train) {
        LLAMA_LOG_INFO("%s: DPE on, window = %u, context %u (trained %u)\n", __func__, window, target, hp.n_ctx_train);
        hp.n_ctx_train = target;
    } else {
        LLAMA_LOG_INFO("%s: DPE on, window = %u\n", __func__, window);
    }
}

void llama_dpe_create_tensors(llama_model_loader & ml, llama_model_base & model) {
    auto & hp = model.hparams;
    if (hp.dpe.version == 0) {
        return;
    }
    const int64_t n_freq = hp.n_rot() / 2;
    const int64_t n_h_kv = hp.n_head_kv();
    const int64_t n_lay  = hp.n_layer_all;

    // the shape is checked against the file by create_tensor: [n_rot/2, n_head_kv, n_layer]
    const auto tn = LLM_TN(model.arch);
    ggml_tensor * table = model.create_tensor(tn(LLM_TENSOR_ROPE_DPE, "weight"), {n_freq, n_h_kv, n_lay}, 0);
    if (table == nullptr) {
        throw std::runtime_error("DPE: rope_dpe.weight was not loaded");
    }
    if (table->type != GGML_TYPE_F32) {
        throw std::runtime_error(format("DPE: rope_dpe.weight must be F32, not %s; re-convert the model",
                                        ggml_type_name(table->type)));
    }
    if (hp.dpe.window == 0) {
        return;
    }

    // read the table now (a few KB) to validate it and to recognise the identity table
    const auto * weight = ml.get_weight(ggml_get_name(table));
    GGML_ASSERT(weight != nullptr);
    std::vector<float> sigma(n_freq*n_h_kv*n_lay);
    ml.files.at(weight->idx)->seek(weight->offs, SEEK_SET);
    ml.files.at(weight->idx)->read_raw(sigma.data(), sigma.size()*sizeof(float));
    bool identity = true;
    for (size_t i = 0; i < sigma.size(); ++i) {
        const float s = sigma[i];
        if (!(s >= 1.0f) || s != std::floor(s) || s > 1e6f) {
            throw std::runtime_error(format("DPE: rope_dpe.weight holds %g at layer %lld, KV head %lld, frequency %lld; "
                                            "divisors must be integers >= 1 (re-convert the model)", s,
                                            (long long) (i/(n_freq*n_h_kv)), (long long) (i/n_freq % n_h_kv),
                                            (long long) (i % n_freq)));
        }
        identity = identity && s == 1.0f;
    }
    if (identity) {
        // every divisor 1: DPE is plain RoPE at every distance (spec section 3), so run stock attention
        LLAMA_LOG_INFO("%s: DPE table is all ones (identical to plain RoPE): running stock attention\n", __func__);
        return;
    }
    hp.dpe.table = table;
}

void llama_dpe_build_inputs(ggml_context * ctx, const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                            const llama_cparams & cparams, const llama_dpe_hparams & dpe, llm_graph_input_attn_kv * inp) {
    if (!dpe.active() || cparams.training || inp->self_kq_mask == nullptr) {
        return;
    }
    const int64_t n_kv     = mctx->get_n_kv();
    const int64_t n_tokens = ubatch.n_tokens;
    const int64_t n_stream = inp->self_kq_mask->ne[3];

    inp->dpe_pos_q = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tokens);
    ggml_set_input(inp->dpe_pos_q);
    ggml_set_name(inp->dpe_pos_q, "dpe_pos_q");

    inp->dpe_pos_kv = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_kv*n_stream);
    ggml_set_input(inp->dpe_pos_kv);
    ggml_set_name(inp->dpe_pos_kv, "dpe_pos_kv");

    inp->dpe_kq_mask = ggml_new_tensor_4d(ctx, inp->self_kq_mask->type, 2*n_kv, n_tokens/n_stream, 1, n_stream);
    ggml_set_input(inp->dpe_kq_mask);
    ggml_set_name(inp->dpe_kq_mask, "dpe_kq_mask");

    inp->dpe_window = dpe.window;
}

template <typename T>
static void dpe_fill_mask(const T * stock, T * out, T drop, const int32_t * pos_q, const int32_t * pos_kv,
                          int64_t n_kv, int64_t n_tps, int64_t n_stream, int32_t window) {
    for (int64_t s = 0; s < n_stream; ++s) {
        for (int64_t ii = 0; ii < n_tps; ++ii) {
            const int64_t i   = s*n_tps + ii;
            const T * src     = stock + n_kv*i;
            T       * near    = out + 2*n_kv*i;
            T       * far     = near + n_kv;
            const int32_t * p = pos_kv + s*n_kv;
            for (int64_t j = 0; j < n_kv; ++j) {
                const bool is_near = pos_q[i] - p[j] < window;
                near[j] = is_near ? src[j] : drop;
                far[j]  = is_near ? drop   : src[j];
            }
        }
    }
}

void llama_dpe_set_inputs(const llm_graph_input_attn_kv * inp, const llama_ubatch * ubatch) {
    if (inp->dpe_kq_mask == nullptr || inp->dpe_kq_mask->buffer == nullptr) {
        return;
    }
    const ggml_tensor * dst = inp->dpe_kq_mask;

    const int64_t n_tokens = ubatch->n_tokens;
    const int64_t n_kv     = dst->ne[0] / 2;
    const int64_t n_tps    = dst->ne[1];
    const int64_t n_stream = dst->ne[3];
    GGML_ASSERT(n_tps*n_stream == n_tokens);

    // stock's mask (causal, sequences, empty cells), computed by the cache itself into host memory:
    // the graph no longer reads inp->self_kq_mask, so it has no buffer of its own
    const size_t esize = ggml_type_size(dst->type);
    const size_t stock_size = n_kv*n_tokens*esize;
    std::vector<uint8_t> stock_mem(stock_size + 64);
    uint8_t * stock_data = (uint8_t *) GGML_PAD((uintptr_t) stock_mem.data(), 64);
    ggml_tensor stock = *inp->self_kq_mask;
    stock.data   = stock_data;
    stock.buffer = ggml_backend_cpu_buffer_from_ptr(stock_data, stock_size);
    inp->mctx->set_input_kq_mask(&stock, ubatch, inp->cparams.causal_attn);
    ggml_backend_buffer_free(stock.buffer);

    std::vector<int32_t> pos_q(ubatch->pos, ubatch->pos + n_tokens);

    // positions of the cells each stream's tokens attend to (empty cells are masked; their position is unused)
    const llama_kv_cache * kv = inp->mctx->get_kv();
    std::vector<int32_t> pos_kv(n_kv*n_stream, 0);
    for (int64_t s = 0; s < n_stream; ++s) {
        const auto & cells = kv->get_cells(ubatch->seq_id[s*n_tps][0]);
        for (int64_t j = 0; j < n_kv && j < (int64_t) cells.size(); ++j) {
            pos_kv[s*n_kv + j] = cells.is_empty(j) ? 0 : cells.pos_get(j);
        }
    }

    const int32_t w = (int32_t) inp->dpe_window;
    std::vector<uint8_t> mask(ggml_nbytes(dst));
    if (dst->type == GGML_TYPE_F16) {
        dpe_fill_mask((const ggml_fp16_t *) stock_data, (ggml_fp16_t *) mask.data(),
                      ggml_fp32_to_fp16(-INFINITY), pos_q.data(), pos_kv.data(), n_kv, n_tps, n_stream, w);
    } else {
        GGML_ASSERT(dst->type == GGML_TYPE_F32);
        dpe_fill_mask((const float *) stock_data, (float *) mask.data(),
                      -INFINITY, pos_q.data(), pos_kv.data(), n_kv, n_tps, n_stream, w);
    }
    ggml_backend_tensor_set(inp->dpe_kq_mask, mask.data(), 0, mask.size());
    ggml_backend_tensor_set(inp->dpe_pos_q,   pos_q.data(),  0, ggml_nbytes(inp->dpe_pos_q));
    ggml_backend_tensor_set(inp->dpe_pos_kv,  pos_kv.data(), 0, ggml_nbytes(inp->dpe_pos_kv));
}

// Zero-pads every row (dim 0) of the contiguous tensor x by `before` and `after` elements.
// CUDA's pad kernel puts dims 1 and 2*3 on grid axes limited to 65535, which a cache of 64k cells
// exceeds; the rows are regrouped as [ne0, a, b] with a, b <= 65535 around the pad (same bytes).
static ggml_tensor * dpe_pad_rows(ggml_context * ctx, ggml_tensor * x, int before, int after) {
    const int64_t limit = 65535;
    const int64_t rows  = ggml_nrows(x);
    int64_t a = 0;
    if (ggml_is_contiguous(x) && (x->ne[1] > limit || x->ne[2]*x->ne[3] > limit)) {
        for (int64_t c = std::max<int64_t>(1, (rows + limit - 1)/limit); c <= limit; ++c) {
            if (rows % c == 0 && rows/c <= limit) {
                a = c;
                break;
            }
        }
    }
    if (a == 0) {
        return ggml_pad_ext(ctx, x, before, after, 0, 0, 0, 0, 0, 0);
    }
    ggml_tensor * y = ggml_reshape_3d(ctx, x, x->ne[0], a, rows/a);
    y = ggml_pad_ext(ctx, y, before, after, 0, 0, 0, 0, 0, 0);
    return ggml_reshape_4d(ctx, y, y->ne[0], x->ne[1], x->ne[2], x->ne[3]);
}

void llama_dpe_build_attn(const llm_graph_context & g, const llm_graph_input_attn_kv * inp, int il,
                          ggml_tensor *& q, ggml_tensor *& k, ggml_tensor *& v, ggml_tensor *& kq_mask) {
    const auto & dpe = g.hparams.dpe;
    if (!dpe.active() || inp->dpe_kq_mask == nullptr) {
        return;
    }
    ggml_context * ctx = g.ctx0;

    const int64_t d      = k->ne[0]; // head dim of K
    const int64_t n_h_kv = k->ne[1];
    const int64_t n_kv   = k->ne[2];
    const int64_t n_strm = k->ne[3];
    const int     w      = (int) dpe.window;
    const int     mode   = g.rope_type; // LLAMA_ROPE_TYPE_NORM/NEOX are GGML's mode values

    ggml_tensor * table = ggml_view_2d(ctx, dpe.table, dpe.table->ne[0], dpe.table->ne[1], dpe.table->nb[1],
                                       (size_t) il*dpe.table->nb[2]);
    ggml_tensor * factors = dpe.model->get_rope_factors(g.cparams, il);

    auto rope_dpe = [&](ggml_tensor * x, ggml_tensor * pos, bool is_query) {
        return ggml_rope_dpe(ctx, x, pos, table, factors, (int) g.n_rot, mode, g.n_ctx_orig, g.freq_base,
                             g.freq_scale, g.ext_factor, g.beta_fast, g.beta_slow, w, is_query);
    };

    // queries: [q ; q_far]
    ggml_tensor * q_far = rope_dpe(q, inp->dpe_pos_q, true);
    q = ggml_concat(ctx, q, q_far, 0);
    ggml_format_name(q, "dpe_q-%d", il);

    // keys: near copy [k ; 0] and far copy [0 ; k_far], along the KV axis
    ggml_tensor * k32   = ggml_cast(ctx, k, GGML_TYPE_F32);
    ggml_tensor * k_far = rope_dpe(ggml_reshape_3d(ctx, k32, d, n_h_kv, n_kv*n_strm), inp->dpe_pos_kv, false);
    k_far = ggml_reshape_4d(ctx, k_far, d, n_h_kv, n_kv, n_strm);
    k = ggml_concat(ctx, dpe_pad_rows(ctx, k32, 0, (int) d), dpe_pad_rows(ctx, k_far, (int) d, 0), 2);
    ggml_format_name(k, "dpe_k-%d", il);

    // values: the same V for both copies, in the non-transposed layout [d_v, n_head_kv, n_kv, n_stream],
    // zero-padded to the head dim of q'/k' (flash-attention kernels want equal K and V head dims);
    // llama_dpe_attn_output drops the padding from the result
    const bool v_trans = v->nb[1] > v->nb[2];
    ggml_tensor * v32 = ggml_cast(ctx, v_trans ? ggml_permute(ctx, v, 2, 1, 0, 3) : v, GGML_TYPE_F32);
    v32 = dpe_pad_rows(ctx, v32, 0, (int) (2*d - v32->ne[0]));
    v = ggml_concat(ctx, v32, v32, 2);
    ggml_format_name(v, "dpe_v-%d", il);

    kq_mask = inp->dpe_kq_mask;
}

ggml_tensor * llama_dpe_attn_output(const llm_graph_context & g, const llm_graph_input_attn_kv * inp,
                                    ggml_tensor * cur, int il) {
    if (!g.hparams.dpe.active() || inp->dpe_kq_mask == nullptr) {
        return cur;
    }
    // cur: [2*d_k*n_head, n_tokens], each head's first d_v values are the attention output
    const int64_t d_v    = g.hparams.n_embd_head_v(il);
    const int64_t n_head = g.hparams.n_head(il);
    const int64_t d_pad  = cur->ne[0] / n_head;
    GGML_ASSERT(d_pad*n_head == cur->ne[0] && d_pad >= d_v);
    ggml_tensor * out = ggml_view_3d(g.ctx0, cur, d_v, n_head, cur->ne[1], d_pad*ggml_element_size(cur), cur->nb[1], 0);
    out = ggml_cont_2d(g.ctx0, out, d_v*n_head, cur->ne[1]);
    ggml_format_name(out, "dpe_kqv_out-%d", il);
    return out;
}
