// dpe-gguf: DPE inside llama.cpp (docs/design.md section 3). Compiled into libllama; called from the hooks
// in patches/0004-llama-dpe-engine.patch (declarations: llama-dpe-impl.h).
//
// Design (docs/design.md section 6):
//
// - The KV cache stores far keys. A far key depends on its own cell only,
//   k_far(j) = rotate(k(j), (P_k(j, sigma) - j) * theta_f), so llama_dpe_build_qk rotates the ubatch's new keys
//   once, before they are written, and computes the far queries the same way. Where q and k are the model's
//   own rope nodes, GGML_OP_ROPE_DPE kinds QUERY_PAIR and KEY_FULL replace them (one node each, as stock);
//   otherwise kinds QUERY and KEY turn the rope's output. KV memory is stock's.
// - Near scores exist only for cells within w of some query of the ubatch: the window set. Its cells are found
//   on the host from the cells' positions and sequences (at most w - 1 per sequence plus the ubatch's own
//   tokens), read from the cache and rotated back to ordinary keys (kind KEY_INVERSE with a row index; get_rows
//   first for quantized caches and Hadamard-rotated ones), or, in decode, read from the store of ordinary keys
//   that decode graphs keep (llama_dpe_store below).
// - Without flash attention the score matrix keeps stock's width n_kv: far scores of the far queries against
//   the cache (stock's matmul), near scores of the ordinary queries against the window cells, merged in place
//   where 0 <= i - j < w (GGML_OP_DPE_NEAR_SCORES), then stock's masked softmax and V product.
// - With flash attention: DPE's own kernel (GGML_OP_DPE_FLASH_ATTN: ggml-cpu-dpe-fattn.cpp, ggml-cuda-dpe-fattn.cu),
//   one online softmax, each pair scored once. Where a GPU backend lacks it (not NVIDIA Ampere or newer, other
//   head dims or K/V types): one stock flash-attention call over n_win + n_kv cells with doubled head dim,
//   q' = [q ; q_far], window cells [k ; 0], cache cells [0 ; k_far], and a mask that keeps each (query, cell)
//   pair in exactly one of the two copies: one softmax, exact.
//
// With a quantized K cache llama.cpp may rotate q and k by a Hadamard matrix H before the cache; DPE's
// rotations act on the model's own pairs, so they run before H, and the window's keys are taken out of H
// (H is symmetric and orthogonal) before they are rotated back.
//
// Position shifts (seq_add, seq_div, context shift) are refused (patches/0004, llama-kv-cache.cpp):
// DPE's positions floor(j/s) are not shift-invariant, so the values of shifted cells, computed by
// earlier layers at the old positions, would no longer be what the shifted prompt computes.

#include "llama-dpe-impl.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "ggml-dpe.h"
#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
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

    // the shape is checked against the file by create_tensor: [n_rot/2, n_head_kv, n_layer]. The type first:
    // create_tensor probes where the table can live with a GGML_OP_ROPE node, which asserts an F32 table.
    const auto tn = LLM_TN(model.arch);
    const ggml_tensor * meta = ml.get_tensor_meta(tn(LLM_TENSOR_ROPE_DPE, "weight").str().c_str());
    if (meta != nullptr && meta->type != GGML_TYPE_F32) {
        throw std::runtime_error(format("DPE: rope_dpe.weight must be F32, not %s; re-convert the model",
                                        ggml_type_name(meta->type)));
    }
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

// The window's ordinary keys, kept between ubatches (docs/design.md section 6). Per layer, S slots per (KV head,
// stream) and one more (slot S) for writes that must land nowhere; a cell's key is kept in slot cell % S, and the
// host knows which cell each slot holds (cell[stream][slot]). Decode-sized graphs (at most DPE_STORE_MAX_TOKENS
// tokens per stream) write their new keys to their slots beside the far keys they write to the cache (one
// ggml_rope_dpe_key_write node), computed as rotating back computes them, and read the window's keys from the
// store when it holds them all (flash attention: the kernel reads row idx % S; otherwise one get_rows);
// otherwise they rotate the window back from the cache, as prefill graphs always do, and keep what they
// rotated in the store. Writes to cells outside a graph (a state load, a stream copy) and prefill graphs (which
// have no store nodes) make the host forget the slots of the cells they write.
struct llama_dpe_store {
    int64_t S = 0;
    std::vector<ggml_tensor *> layer;       // by model layer: [d, S + 1 padded to 16, n_head_kv, n_stream]
    std::vector<ggml_tensor *> written;     // by model layer: the store as the graph being built writes it
    std::vector<std::vector<int32_t>> cell; // [stream][slot]: the cell whose ordinary key the slot holds, -1: none
    // (stream, slot, cell): window keys the last graph rotated back into the store, trusted once the next ubatch
    // is planned (the last graph then ran to its end) unless a seq_rm came first
    std::vector<std::array<int32_t, 3>> pending;
    std::vector<ggml_context_ptr> ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;
};

// One ubatch's window and store slots, planned when its graph is built or reused (the choice between reading the
// store and rotating back is part of the graph) and applied by llama_dpe_set_inputs.
struct llama_dpe_plan {
    bool    real      = false; // planned for a real ubatch (graph reservation builds from a placeholder)
    bool    use_store = false; // every window cell's ordinary key is in the store once this ubatch's keys are
    int32_t s0        = 0;     // the cache stream of the graph's first stream
    std::vector<int32_t> idx, wpos; // [n_stream][n_win]: the window's cells, ascending, then padding (cell 0,
                                    // position INT32_MAX)
    std::vector<int32_t> rows;      // [n_stream][n_win]: the slot of each window cell (use_store; padding: 0)
    std::vector<int64_t> slot;      // [n_stream][n_tps]: the slot each new key is written to (S: none)
    std::vector<int64_t> repair;    // [n_stream][n_win]: the slot a rotated-back window key is written to (S: none)
    std::vector<std::vector<std::pair<int32_t, int32_t>>> updates; // [n_stream]: (slot, cell) once the graph runs
    std::vector<std::array<int32_t, 3>> repairs;                   // (stream, slot, cell) of the repair writes
    // the cells [0, far_cells) hold every far pair of a decode ubatch: past them each visible pair is near
    // (attention without flash attention computes far scores only there). A multiple of DPE_FAR_CELLS_STEP (at
    // least one), so that graphs are reused between decode steps; INT64_MAX: the whole cache (prefill, a
    // placeholder ubatch)
    int64_t far_cells = INT64_MAX;
};

static constexpr int64_t DPE_FAR_CELLS_STEP = 64;

static constexpr int64_t DPE_STORE_MAX_TOKENS = 32;

void llama_dpe_store_discard_pending(llama_dpe_store * store) {
    if (store != nullptr) {
        store->pending.clear();
    }
}

void llama_dpe_store_invalidate(llama_dpe_store * store, int s) {
    if (store == nullptr) {
        return;
    }
    store->pending.clear();
    for (size_t i = 0; i < store->cell.size(); ++i) {
        if (s < 0 || (size_t) s == i) {
            std::fill(store->cell[i].begin(), store->cell[i].end(), -1);
        }
    }
}

// The cache's store, created with its first DPE graph: one window of keys plus a decode ubatch per layer and
// stream, in the buffer type of the layer's K cache. F32: it holds the keys exactly as rotating back computes them.
static llama_dpe_store * dpe_store_get(const llama_kv_cache * kv, const llama_cparams & cparams,
                                       const llama_hparams & hp, uint32_t window) {
    if (kv->dpe_store) {
        return kv->dpe_store.get();
    }
    auto st = std::make_shared<llama_dpe_store>();
    const int64_t n_stream = kv->get_n_stream();
    st->S = (int64_t) window + std::min<int64_t>(DPE_STORE_MAX_TOKENS, cparams.n_ubatch);
    st->layer.assign(hp.n_layer_all, nullptr);
    st->written.assign(hp.n_layer_all, nullptr);
    st->cell.assign(n_stream, std::vector<int32_t>(st->S, -1));

    const std::vector<uint32_t> ids = kv->get_layer_ids();
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_of;
    for (uint32_t il : ids) {
        const ggml_tensor * k = kv->get_k_storage(il);
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(k->buffer);
        auto it = ctx_of.find(buft);
        if (it == ctx_of.end()) {
            ggml_init_params params = { ids.size()*ggml_tensor_overhead(), nullptr, true };
            st->ctxs.emplace_back(ggml_init(params));
            it = ctx_of.emplace(buft, st->ctxs.back().get()).first;
        }
        // S slots and one for writes that land nowhere, padded to 16 rows (zeros, never written): decode without
        // flash attention multiplies the store itself, and the tiled CPU product wants a multiple of 4 rows
        ggml_tensor * t = ggml_new_tensor_4d(it->second, GGML_TYPE_F32, hp.n_embd_head_k(il), GGML_PAD(st->S + 1, 16),
                                             hp.n_head_kv(il), n_stream);
        ggml_format_name(t, "dpe_store_l%u", il);
        st->layer[il] = t;
    }
    size_t bytes = 0;
    for (auto & [buft, ctx] : ctx_of) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        if (buf == nullptr) {
            throw std::runtime_error("DPE: failed to allocate the window's key store");
        }
        ggml_backend_buffer_clear(buf, 0);
        bytes += ggml_backend_buffer_get_size(buf);
        st->bufs.emplace_back(buf);
    }
    LLAMA_LOG_INFO("%s: DPE window key store: %7.2f MiB (F32, %lld slots = window %u + %lld decode tokens, %zu layers, "
                   "%lld streams)\n", __func__, bytes/(1024.0*1024.0), (long long) st->S, window,
                   (long long) (st->S - window), ids.size(), (long long) n_stream);
    kv->dpe_store = st;
    return st.get();
}

// The plan of a ubatch (see llama_dpe_plan): the window set of each stream, the cells of the new keys and their
// slots, and whether the store then holds every window cell's key. Returns null when the window does not fit
// n_win (a graph built for another shape; a graph built for this one always fits).
static std::shared_ptr<llama_dpe_plan> dpe_plan(const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                                                int64_t n_win, int64_t n_stream, int32_t w, llama_dpe_store * st) {
    auto plan = std::make_shared<llama_dpe_plan>();
    if (ubatch.n_tokens == 0 || !mctx->has_ubatch()) {
        return plan; // graph reservation: a placeholder ubatch, no cells
    }
    const int64_t n_tokens = ubatch.n_tokens;
    const int64_t n_tps    = n_tokens/n_stream;
    GGML_ASSERT(n_tps*n_stream == n_tokens);
    const llama_kv_cache * kv = mctx->get_kv();
    const int64_t n_kv = mctx->get_n_kv();
    plan->real = true;
    plan->s0   = (int32_t) kv->get_stream(ubatch.seq_id[0][0]);

    // the window cells of each stream; unused slots point at cell 0 with a position no query is near to
    plan->idx.assign(n_win*n_stream, 0);
    plan->wpos.assign(n_win*n_stream, INT32_MAX);
    for (int64_t s = 0; s < n_stream; ++s) {
        GGML_ASSERT(kv->get_stream(ubatch.seq_id[s*n_tps][0]) == (uint32_t) (plan->s0 + s));
        struct seq_range { llama_seq_id id; llama_pos lo, hi; };
        std::vector<seq_range> seqs;
        for (int64_t t = s*n_tps; t < (s + 1)*n_tps; ++t) {
            for (int32_t k = 0; k < ubatch.n_seq_id[t]; ++k) {
                const llama_seq_id id = ubatch.seq_id[t][k];
                auto it = std::find_if(seqs.begin(), seqs.end(), [id](const seq_range & r) { return r.id == id; });
                if (it == seqs.end()) {
                    seqs.push_back({id, ubatch.pos[t], ubatch.pos[t]});
                } else {
                    it->lo = std::min(it->lo, ubatch.pos[t]);
                    it->hi = std::max(it->hi, ubatch.pos[t]);
                }
            }
        }
        const auto & cells = kv->get_cells(ubatch.seq_id[s*n_tps][0]);
        int64_t n = 0;
        int64_t far_last = -1; // the last cell that a query of the stream may see as far
        for (int64_t j = 0; j < n_kv && j < (int64_t) cells.size(); ++j) {
            if (cells.is_empty(j)) {
                continue;
            }
            const llama_pos p = cells.pos_get(j);
            bool in_window = false, far = false;
            for (const auto & r : seqs) {
                const bool seen = cells.seq_has(j, r.id);
                in_window = in_window || (p > r.lo - w && p <= r.hi && seen);
                // at distance w or more from the last query; or past it (masked for causal attention, far for
                // attention that is not causal)
                far       = far || (((int64_t) p <= (int64_t) r.hi - w || p > r.hi) && seen);
            }
            if (far) {
                far_last = j;
            }
            if (!in_window) {
                continue;
            }
            if (n == n_win) {
                return nullptr;
            }
            plan->idx [s*n_win + n] = (int32_t) j;
            plan->wpos[s*n_win + n] = p;
            ++n;
        }
        // decode graphs only: a prefill graph's narrower product would be padded by a copy of its whole score
        // matrix, which costs about what it saves
        const int64_t far_cells = n_tps > DPE_STORE_MAX_TOKENS ? INT64_MAX :
                                  std::min<int64_t>(n_kv, std::max<int64_t>(DPE_FAR_CELLS_STEP,
                                                                            GGML_PAD(far_last + 1, DPE_FAR_CELLS_STEP)));
        plan->far_cells = s == 0 ? far_cells : std::max(plan->far_cells, far_cells);
    }
    if (st == nullptr) {
        return plan;
    }
    // the last graph ran to its end: its repair writes are in the store
    for (const auto & [s, sl, c] : st->pending) {
        st->cell[s][sl] = c;
    }
    st->pending.clear();

    // the cells the ubatch's keys go to (the cache's own index input, computed into host memory)
    std::vector<int64_t> dst_mem(n_tokens + 8);
    int64_t * dst = (int64_t *) GGML_PAD((uintptr_t) dst_mem.data(), 64);
    {
        ggml_tensor t = {};
        t.type  = GGML_TYPE_I64;
        t.ne[0] = n_tokens; t.ne[1] = t.ne[2] = t.ne[3] = 1;
        t.nb[0] = sizeof(int64_t); t.nb[1] = t.nb[2] = t.nb[3] = n_tokens*sizeof(int64_t);
        t.data   = dst;
        t.buffer = ggml_backend_cpu_buffer_from_ptr(dst, n_tokens*sizeof(int64_t));
        mctx->set_input_k_idxs(&t, &ubatch);
        ggml_backend_buffer_free(t.buffer);
    }
    const int64_t S       = st->S;
    const int64_t kv_size = kv->get_size();
    plan->updates.resize(n_stream);
    if (n_tps > DPE_STORE_MAX_TOKENS) {
        // a prefill graph has no store nodes: the store no longer holds the keys of the cells it rewrites
        for (int64_t t = 0; t < n_tokens; ++t) {
            const int64_t s  = dst[t]/kv_size - plan->s0;
            const int32_t c  = (int32_t) (dst[t] % kv_size);
            if (st->cell[plan->s0 + s][c % S] == c) {
                plan->updates[s].emplace_back((int32_t) (c % S), -1);
            }
        }
        return plan;
    }
    plan->slot.assign(n_tokens, S);
    plan->rows.assign(n_win*n_stream, 0);
    plan->repair.assign(n_win*n_stream, S);
    bool covered = true;
    std::vector<int32_t> owner(S);
    for (int64_t s = 0; s < n_stream; ++s) {
        const std::vector<int32_t> & held = st->cell[plan->s0 + s];
        std::fill(owner.begin(), owner.end(), -1); // the new cell a slot is written with, -2: more than one
        for (int64_t t = s*n_tps; t < (s + 1)*n_tps; ++t) {
            GGML_ASSERT(dst[t]/kv_size == plan->s0 + s);
            const int32_t c  = (int32_t) (dst[t] % kv_size);
            const int64_t sl = c % S;
            owner[sl] = owner[sl] == -1 ? c : -2;
        }
        for (int64_t t = s*n_tps; t < (s + 1)*n_tps; ++t) {
            const int32_t c  = (int32_t) (dst[t] % kv_size);
            const int64_t sl = c % S;
            if (owner[sl] == c) {
                plan->slot[t] = sl;
                plan->updates[s].emplace_back((int32_t) sl, c);
            } else if (owner[sl] == -2) {
                plan->updates[s].emplace_back((int32_t) sl, -1); // keys that share a slot go nowhere (slot S)
            }
        }
        for (int64_t n = 0; n < n_win; ++n) {
            if (plan->wpos[s*n_win + n] == INT32_MAX) {
                break; // padding follows the real slots
            }
            const int32_t j  = plan->idx[s*n_win + n];
            const int64_t sl = j % S;
            covered = covered && (owner[sl] == j || (owner[sl] == -1 && held[sl] == j));
            plan->rows[s*n_win + n] = (int32_t) sl;
            if (owner[sl] == -1 && held[sl] != j) {
                // a rotation-back ubatch keeps the key (the first window cell of a slot claims it)
                owner[sl] = j;
                plan->repair[s*n_win + n] = sl;
                plan->repairs.push_back({(int32_t) (plan->s0 + s), (int32_t) sl, j});
            }
        }
    }
    // DPE_WINDOW_STORE=0: always rotate the window's keys back (the store is still written), to compare the two
    static const bool store_off = getenv("DPE_WINDOW_STORE") != nullptr && atoi(getenv("DPE_WINDOW_STORE")) == 0;
    plan->use_store = covered && !store_off;
    return plan;
}

void llama_dpe_build_inputs(ggml_context * ctx, const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                            const llama_cparams & cparams, const llama_dpe_hparams & dpe, llm_graph_input_attn_kv * inp) {
    if (!dpe.active() || cparams.training || inp->self_kq_mask == nullptr) {
        return;
    }
    const int64_t n_kv     = mctx->get_n_kv();
    const int64_t n_tokens = ubatch.n_tokens;
    const int64_t n_stream = inp->self_kq_mask->ne[3];
    const int64_t n_tps    = n_tokens/n_stream;
    const auto &  hp       = dpe.model->hparams;

    // The window set of a stream: cells within w of some query of one of its sequences. A ubatch holds
    // consecutive positions of each sequence, so a sequence adds at most w - 1 cells before its first token
    // plus its own tokens. The size depends only on what graph reuse compares (n_kv, the ubatch's shape and
    // its number of sequences), so a reused graph fits the next ubatch.
    const int64_t seqs  = (ubatch.n_seqs_unq + n_stream - 1)/n_stream;
    // Padded to a multiple of 16 (padding slots are cheap): the CPU's tiled F32 product of the near scores
    // (llamafile's tinyBLAS) takes only row counts that are a multiple of 4, and falls back to one dot product
    // per score otherwise.
    const int64_t n_win = std::min<int64_t>(n_kv, GGML_PAD(seqs*((int64_t) dpe.window - 1) + n_tps, 16));

    inp->dpe_pos_q = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tokens);
    ggml_set_input(inp->dpe_pos_q);
    ggml_set_name(inp->dpe_pos_q, "dpe_pos_q");

    inp->dpe_win_idx = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_win, n_stream);
    ggml_set_input(inp->dpe_win_idx);
    ggml_set_name(inp->dpe_win_idx, "dpe_win_idx");

    inp->dpe_win_pos = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_win, n_stream);
    ggml_set_input(inp->dpe_win_pos);
    ggml_set_name(inp->dpe_win_pos, "dpe_win_pos");

    if (cparams.flash_attn) {
        inp->dpe_kq_mask = ggml_new_tensor_4d(ctx, inp->self_kq_mask->type, n_win + n_kv, n_tps, 1, n_stream);
        ggml_set_input(inp->dpe_kq_mask);
        ggml_set_name(inp->dpe_kq_mask, "dpe_kq_mask");
    }

    // the store, for F16 and F32 caches (a quantized cache's keys are rotated back through a Hadamard rotation
    // and a dequantisation, which a store write would have to repeat bit for bit)
    const bool store_ok  = mctx->type_k() == GGML_TYPE_F16 || mctx->type_k() == GGML_TYPE_F32;
    llama_dpe_store * st = store_ok ? dpe_store_get(mctx->get_kv(), cparams, hp, dpe.window) : nullptr;
    if (st != nullptr && n_tps <= DPE_STORE_MAX_TOKENS) {
        inp->dpe_store_slot = ggml_new_tensor_3d(ctx, GGML_TYPE_I64, n_tps, 1, n_stream);
        ggml_set_input(inp->dpe_store_slot);
        ggml_set_name(inp->dpe_store_slot, "dpe_store_slot");

        inp->dpe_store_rows = ggml_new_tensor_3d(ctx, GGML_TYPE_I32, n_win, hp.n_head_kv(), n_stream);
        ggml_set_input(inp->dpe_store_rows);
        ggml_set_name(inp->dpe_store_rows, "dpe_store_rows");
    }

    inp->dpe_window = dpe.window;
    inp->dpe_plan   = dpe_plan(mctx, ubatch, n_win, n_stream, (int32_t) dpe.window, st);
    if (inp->dpe_plan == nullptr) {
        GGML_ABORT("DPE: the ubatch's tokens of a sequence are not at consecutive positions; "
                   "DPE's window set needs them to be (or run with --dpe off)");
    }
    inp->dpe_use_store = inp->dpe_plan->use_store;
}

bool llama_dpe_can_reuse(llm_graph_input_attn_kv * inp, const llama_ubatch & ubatch) {
    if (inp->dpe_win_idx == nullptr) {
        return true;
    }
    const llama_kv_cache * kv = inp->mctx->get_kv();
    auto plan = dpe_plan(inp->mctx, ubatch, inp->dpe_win_idx->ne[0], inp->dpe_win_idx->ne[1],
                         (int32_t) inp->dpe_window, kv->dpe_store.get());
    // the far cells shape the graph only without flash attention
    if (plan == nullptr || plan->use_store != inp->dpe_use_store ||
        (!inp->cparams.flash_attn && inp->dpe_plan != nullptr && plan->far_cells != inp->dpe_plan->far_cells)) {
        return false;
    }
    inp->dpe_plan = plan;
    return true;
}

// The flash-attention mask over [window copies | cache cells]: a window copy keeps the stock mask where the
// query is near its cell (0 <= i - j < w), a cache cell keeps it everywhere else.
template <typename T>
static void dpe_fill_fa_mask(const T * stock, T * out, T drop, const int32_t * pos_q, const int32_t * idx,
                             const int32_t * wpos, int64_t n_kv, int64_t n_win, int64_t n_tps, int64_t n_stream,
                             int32_t window) {
    for (int64_t s = 0; s < n_stream; ++s) {
        for (int64_t ii = 0; ii < n_tps; ++ii) {
            const int64_t i   = s*n_tps + ii;
            const T * src     = stock + n_kv*i;
            T       * near    = out + (n_win + n_kv)*i;
            T       * far     = near + n_win;
            std::copy(src, src + n_kv, far);
            for (int64_t j = 0; j < n_win; ++j) {
                const int64_t r = (int64_t) pos_q[i] - wpos[s*n_win + j];
                const bool is_near = r >= 0 && r < window;
                near[j] = is_near ? src[idx[s*n_win + j]] : drop;
                if (is_near) {
                    far[idx[s*n_win + j]] = drop;
                }
            }
        }
    }
}

void llama_dpe_set_inputs(const llm_graph_input_attn_kv * inp, const llama_ubatch * ubatch) {
    if (inp->dpe_win_idx == nullptr || inp->dpe_win_idx->buffer == nullptr) {
        return;
    }
    const int64_t n_tokens = ubatch->n_tokens;
    const int64_t n_win    = inp->dpe_win_idx->ne[0];
    const int64_t n_stream = inp->dpe_win_idx->ne[1];
    const int64_t n_tps    = n_tokens/n_stream;
    const int32_t w        = (int32_t) inp->dpe_window;
    GGML_ASSERT(n_tps*n_stream == n_tokens);

    std::vector<int32_t> pos_q(ubatch->pos, ubatch->pos + n_tokens);

    // the plan made for this ubatch when its graph was built or reused
    const llama_dpe_plan * plan = inp->dpe_plan.get();
    GGML_ASSERT(plan != nullptr && plan->real && plan->use_store == inp->dpe_use_store);
    GGML_ASSERT((int64_t) plan->idx.size() == n_win*n_stream);
    const std::vector<int32_t> & idx  = plan->idx;
    const std::vector<int32_t> & wpos = plan->wpos;
    const int64_t n_kv = inp->mctx->get_n_kv();

    // the store: where the new keys go, where the window's keys are, and what the slots hold once this runs
    llama_dpe_store * st = inp->mctx->get_kv()->dpe_store.get();
    GGML_ASSERT(inp->dpe_store_slot == nullptr || (st != nullptr && !plan->slot.empty()));
    if (st != nullptr) {
        for (int64_t s = 0; s < (int64_t) plan->updates.size(); ++s) {
            for (const auto & [sl, c] : plan->updates[s]) {
                st->cell[plan->s0 + s][sl] = c;
            }
        }
    }
    if (inp->dpe_store_slot != nullptr) {
        if (inp->dpe_store_slot->buffer != nullptr) {
            ggml_backend_tensor_set(inp->dpe_store_slot, plan->slot.data(), 0, ggml_nbytes(inp->dpe_store_slot));
        }
        if (inp->dpe_store_rows != nullptr && inp->dpe_store_rows->buffer != nullptr) {
            // the slots the window's keys are read from, or (rotating back) the slots they are kept in
            const int64_t n_h = inp->dpe_store_rows->ne[1];
            std::vector<int32_t> rows(n_win*n_h*n_stream);
            for (int64_t s = 0; s < n_stream; ++s) {
                for (int64_t h = 0; h < n_h; ++h) {
                    for (int64_t n = 0; n < n_win; ++n) {
                        rows[(s*n_h + h)*n_win + n] = plan->use_store ? plan->rows[s*n_win + n]
                                                                      : (int32_t) plan->repair[s*n_win + n];
                    }
                }
            }
            ggml_backend_tensor_set(inp->dpe_store_rows, rows.data(), 0, ggml_nbytes(inp->dpe_store_rows));
            if (!plan->use_store) {
                st->pending = plan->repairs;
            }
        }
    }

    if (inp->dpe_kq_mask != nullptr && inp->dpe_kq_mask->buffer != nullptr) {
        // stock's mask (causal, sequences, empty cells), computed by the cache itself into host memory:
        // the graph reads the DPE mask instead, so the stock one has no buffer of its own
        const ggml_tensor * dst = inp->dpe_kq_mask;
        GGML_ASSERT(dst->ne[0] == n_win + n_kv && dst->ne[1] == n_tps && dst->ne[3] == n_stream);
        const size_t esize = ggml_type_size(dst->type);
        const size_t stock_size = n_kv*n_tokens*esize;
        std::vector<uint8_t> stock_mem(stock_size + 64);
        uint8_t * stock_data = (uint8_t *) GGML_PAD((uintptr_t) stock_mem.data(), 64);
        ggml_tensor stock = *inp->self_kq_mask;
        stock.data   = stock_data;
        stock.buffer = ggml_backend_cpu_buffer_from_ptr(stock_data, stock_size);
        inp->mctx->set_input_kq_mask(&stock, ubatch, inp->cparams.causal_attn);
        ggml_backend_buffer_free(stock.buffer);

        std::vector<uint8_t> mask(ggml_nbytes(dst));
        if (dst->type == GGML_TYPE_F16) {
            dpe_fill_fa_mask((const ggml_fp16_t *) stock_data, (ggml_fp16_t *) mask.data(), ggml_fp32_to_fp16(-INFINITY),
                             pos_q.data(), idx.data(), wpos.data(), n_kv, n_win, n_tps, n_stream, w);
        } else {
            GGML_ASSERT(dst->type == GGML_TYPE_F32);
            dpe_fill_fa_mask((const float *) stock_data, (float *) mask.data(), -INFINITY,
                             pos_q.data(), idx.data(), wpos.data(), n_kv, n_win, n_tps, n_stream, w);
        }
        ggml_backend_tensor_set(inp->dpe_kq_mask, mask.data(), 0, mask.size());
    }
    // the query positions feed DPE's attention kernel and the near-score merge; the doubled-head stock call of a
    // graph whose rotations read the model's own positions uses neither, and an input no node reads has no buffer
    if (inp->dpe_pos_q->buffer != nullptr) {
        ggml_backend_tensor_set(inp->dpe_pos_q, pos_q.data(), 0, ggml_nbytes(inp->dpe_pos_q));
    }
    // (the window's positions have no reader in a graph that takes the window's keys from the store and runs the
    // doubled-head stock call)
    for (const auto & [t, v] : { std::make_pair(inp->dpe_win_idx, &idx), std::make_pair(inp->dpe_win_pos, &wpos) }) {
        if (t->buffer != nullptr) {
            ggml_backend_tensor_set(t, v->data(), 0, ggml_nbytes(t));
        }
    }
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

// Whether every GPU backend of the context's scheduler runs op (the CPU backend runs every DPE op): an op
// that a GPU backend lacks would be scheduled on the CPU, with the cache copied to the host every layer.
static bool dpe_accelerators_support(const llm_graph_context & g, const ggml_tensor * op) {
    for (int i = 0; i < ggml_backend_sched_get_n_backends(g.sched); ++i) {
        ggml_backend_t b = ggml_backend_sched_get_backend(g.sched, i);
        const auto type = ggml_backend_dev_type(ggml_backend_get_device(b));
        if ((type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) &&
            !ggml_backend_supports_op(b, op)) {
            return false;
        }
    }
    return true;
}

// the divisor table of layer il: [n_rot/2, n_head_kv]
static ggml_tensor * dpe_table(const llm_graph_context & g, int il) {
    const auto & dpe = g.hparams.dpe;
    return ggml_view_2d(g.ctx0, dpe.table, dpe.table->ne[0], dpe.table->ne[1], dpe.table->nb[1],
                        (size_t) il*dpe.table->nb[2]);
}

// GGML_OP_ROPE_DPE of layer il with the model's own rope parameters (rows: see ggml_rope_dpe_ext)
static ggml_tensor * dpe_rope(const llm_graph_context & g, int il, ggml_tensor * x, ggml_tensor * pos, int kind,
                              ggml_tensor * rows = nullptr, float attn_factor = 1.0f) {
    const auto & dpe = g.hparams.dpe;
    ggml_tensor * factors = dpe.model->get_rope_factors(g.cparams, il);
    // LLAMA_ROPE_TYPE_NORM/NEOX are GGML's mode values
    return ggml_rope_dpe_ext(g.ctx0, x, pos, dpe_table(g, il), factors, rows, (int) g.n_rot, g.rope_type, g.n_ctx_orig,
                             g.freq_base, g.freq_scale, g.ext_factor, attn_factor, g.beta_fast, g.beta_slow,
                             (int) dpe.window, kind);
}

// Whether t is the model's own rotation of its input (ggml_rope_ext with the graph's rope parameters and the
// layer's rope factors, no position offset): DPE's full kinds can then rotate the input in its place.
static bool dpe_is_model_rope(const llm_graph_context & g, int il, const ggml_tensor * t, int64_t n_tokens) {
    if (t->op != GGML_OP_ROPE || t->src[0]->type != GGML_TYPE_F32 || t->src[0]->nb[0] != sizeof(float) ||
        t->src[1]->ne[0] != n_tokens) {
        return false;
    }
    const int32_t * op = t->op_params;
    float fp[6]; // freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow
    memcpy(fp, op + 5, sizeof(fp));
    return op[1] == (int32_t) g.n_rot && op[2] == (int32_t) g.rope_type && op[4] == (int32_t) g.n_ctx_orig &&
           op[15] == 0 && fp[0] == g.freq_base && fp[1] == g.freq_scale && fp[2] == g.ext_factor &&
           fp[4] == g.beta_fast && fp[5] == g.beta_slow &&
           t->src[2] == g.hparams.dpe.model->get_rope_factors(g.cparams, il);
}

static float dpe_rope_attn_factor(const ggml_tensor * rope) {
    float f;
    memcpy(&f, rope->op_params + 8, sizeof(f));
    return f;
}

// DPE_KEY_WRITE=0: the separate nodes that ggml_rope_dpe_key_write replaces, and flash attention reading the
// window's keys through get_rows (to compare)
static bool key_write_off() {
    static const bool off = getenv("DPE_KEY_WRITE") != nullptr && atoi(getenv("DPE_KEY_WRITE")) == 0;
    return off;
}

ggml_tensor * llama_dpe_build_qk(const llm_graph_context & g, const llm_graph_input_attn_kv * inp, int il,
                                 ggml_tensor *& q_cur, ggml_tensor *& k_cur) {
    if (!g.hparams.dpe.active() || inp->dpe_win_idx == nullptr) {
        return nullptr;
    }
    const int64_t n_tokens = inp->dpe_pos_q->ne[0];
    ggml_tensor * q_far;
    if (dpe_is_model_rope(g, il, q_cur, n_tokens) && q_cur->ne[3] == 1) {
        // one node for the model's rotation and DPE's: [q ; q_far] from the unrotated queries (at the model's
        // positions input, which the graph's inputs then still include)
        ggml_tensor * qq = dpe_rope(g, il, q_cur->src[0], q_cur->src[1], GGML_ROPE_DPE_QUERY_PAIR, nullptr,
                                    dpe_rope_attn_factor(q_cur));
        ggml_format_name(qq, "dpe_q_pair-%d", il);
        q_cur = ggml_view_3d(g.ctx0, qq, qq->ne[0], qq->ne[1], qq->ne[2], qq->nb[1], qq->nb[2], 0);
        q_far = ggml_view_3d(g.ctx0, qq, qq->ne[0], qq->ne[1], qq->ne[2], qq->nb[1], qq->nb[2], qq->nb[3]);
    } else {
        q_far = dpe_rope(g, il, q_cur, inp->dpe_pos_q, GGML_ROPE_DPE_QUERY);
    }
    ggml_format_name(q_far, "dpe_q_far-%d", il);

    // decode: the new keys' ordinary rotation goes to the store (the view of the graph's streams), computed as
    // rotating back from the cache computes it (from the far key as the cache holds it), so that reading the
    // store and rotating back give the same bits
    llama_dpe_store * st = inp->mctx->get_kv()->dpe_store.get();
    if (st != nullptr) {
        st->written.at(il) = nullptr; // (a node of an earlier graph)
    }
    const bool to_store = st != nullptr && inp->dpe_store_slot != nullptr;
    ggml_tensor * store_dst = nullptr; // the store of the graph's streams
    int64_t ns = 1, n_tps = n_tokens;
    if (to_store) {
        GGML_ASSERT(!inp->self_k_rot && "the store is for F16 and F32 caches");
        ggml_tensor * store = st->layer.at(il);
        ns    = inp->dpe_store_slot->ne[2];
        n_tps = n_tokens/ns;
        store_dst = ggml_view_4d(g.ctx0, store, store->ne[0], store->ne[1], store->ne[2], ns, store->nb[1],
                                 store->nb[2], store->nb[3], (size_t) inp->dpe_plan->s0*store->nb[3]);
    }

    // where k_cur is the model's rope node of an F16/F32 cache: one node writes the far keys to the cache (and the
    // ordinary keys to the store), in place of the rotation, cpy_k's set_rows and the store's nodes below
    const ggml_type type_k = inp->mctx->type_k();
    if (dpe_is_model_rope(g, il, k_cur, n_tokens) && !key_write_off() && !inp->self_k_rot &&
        (type_k == GGML_TYPE_F16 || type_k == GGML_TYPE_F32) && k_cur->src[0]->type == GGML_TYPE_F32 &&
        k_cur->src[0]->ne[3] == 1 && k_cur->src[0]->nb[0] == sizeof(float) && inp->get_k_idxs() != nullptr) {
        ggml_tensor * kc = inp->mctx->get_kv()->get_k_storage(il); // [n_embd_k_gqa, kv_size, n_stream]
        kc = ggml_view_2d(g.ctx0, kc, kc->ne[0], kc->ne[1]*kc->ne[2], kc->nb[1], 0);
        const auto & dpe = g.hparams.dpe;
        ggml_tensor * kw = ggml_rope_dpe_key_write(g.ctx0, kc, k_cur->src[0], inp->get_k_idxs(), k_cur->src[1],
                                                   dpe_table(g, il), dpe.model->get_rope_factors(g.cparams, il),
                                                   store_dst, to_store ? inp->dpe_store_slot : nullptr, (int) g.n_rot,
                                                   g.rope_type, g.n_ctx_orig, g.freq_base, g.freq_scale, g.ext_factor,
                                                   dpe_rope_attn_factor(k_cur), g.beta_fast, g.beta_slow,
                                                   (int) dpe.window);
        ggml_format_name(kw, "dpe_k_write-%d", il);
        ggml_build_forward_expand(g.gf, kw); // before every reader of the store
        if (to_store) {
            st->written[il] = store_dst;
        }
        k_cur = kw;
        return q_far;
    }

    if (dpe_is_model_rope(g, il, k_cur, n_tokens)) {
        k_cur = dpe_rope(g, il, k_cur->src[0], k_cur->src[1], GGML_ROPE_DPE_KEY_FULL, nullptr,
                         dpe_rope_attn_factor(k_cur));
    } else {
        k_cur = dpe_rope(g, il, k_cur, inp->dpe_pos_q, GGML_ROPE_DPE_KEY);
    }
    ggml_format_name(k_cur, "dpe_k_far-%d", il);

    if (to_store) {
        ggml_tensor * kf = k_cur;
        if (type_k == GGML_TYPE_F16) {
            kf = ggml_cast(g.ctx0, ggml_cast(g.ctx0, kf, GGML_TYPE_F16), GGML_TYPE_F32);
        }
        ggml_tensor * ko = dpe_rope(g, il, kf, inp->dpe_pos_q, GGML_ROPE_DPE_KEY_INVERSE);
        // [d, n_head_kv, n_tokens] -> [d, n_tps, n_head_kv, n_stream]
        ggml_tensor * src = ggml_view_4d(g.ctx0, ko, ko->ne[0], ko->ne[1], n_tps, ns, ko->nb[1], ko->nb[2],
                                         ko->nb[2]*n_tps, 0);
        src = ggml_permute(g.ctx0, src, 0, 2, 1, 3);
        ggml_tensor * w = ggml_set_rows(g.ctx0, store_dst, src, inp->dpe_store_slot);
        ggml_format_name(w, "dpe_store_write-%d", il);
        ggml_build_forward_expand(g.gf, w);
        st->written[il] = w;
    }
    return q_far;
}

bool llama_dpe_wrote_k(const ggml_tensor * k_cur) {
    return k_cur->op == GGML_OP_ROPE_DPE &&
           ((const int32_t *) k_cur->op_params)[GGML_ROPE_DPE_P_KIND] == GGML_ROPE_DPE_KEY_WRITE;
}

ggml_tensor * llama_dpe_build_attn(const llm_graph_context & g, const llm_graph_input_attn_kv * inp, int il,
                                   ggml_tensor * q, ggml_tensor * q_far, ggml_tensor * k, ggml_tensor * v,
                                   ggml_tensor * kq_b, ggml_tensor * kq_mask, ggml_tensor * sinks, float kq_scale) {
    GGML_ASSERT(kq_b == nullptr && "DPE does not support a KQ bias");
    ggml_context * ctx = g.ctx0;
    const auto & hparams = g.hparams;
    const int64_t d        = k->ne[0]; // head dim of K
    const int64_t n_h_kv   = k->ne[1];
    const int64_t n_kv     = k->ne[2];
    const int64_t n_stream = k->ne[3];
    const int64_t n_win    = inp->dpe_win_idx->ne[0];
    const bool    v_trans  = v->nb[1] > v->nb[2];

    // the window's ordinary keys, [d, n_win, n_head_kv, n_stream] (k_win_h) or [d, n_head_kv, n_win, n_stream]
    // (k_win): read from the store where it holds them all; otherwise its cells' far keys from the cache, rotated
    // back (one node that reads the cells where it can; through get_rows for other cache types and when the
    // cache holds Hadamard-rotated keys)
    ggml_tensor * k_win   = nullptr;
    ggml_tensor * k_win_h = nullptr;
    ggml_tensor * k_ord   = nullptr; // rotated back from an F16/F32 cache: what the store keeps
    ggml_tensor * win_pos = ggml_reshape_1d(ctx, inp->dpe_win_pos, n_win*n_stream);
    llama_dpe_store * st  = inp->mctx->get_kv()->dpe_store.get();
    int kw_slots = 0; // the store itself is read (flash attention) or multiplied: slot j's key in row idx[j] % S
    if (inp->dpe_use_store) {
        GGML_ASSERT(st != nullptr && st->written.at(il) != nullptr);
        // without flash attention the product runs over every store row: only where the window fills half of
        // them (a short cache's few window cells are gathered instead)
        if (!key_write_off() && (g.cparams.flash_attn || 2*n_win >= st->written[il]->ne[1])) {
            k_win_h  = st->written[il];
            kw_slots = (int) st->S;
        } else {
            k_win_h = ggml_get_rows(ctx, st->written[il], inp->dpe_store_rows); // F32, contiguous
            ggml_format_name(k_win_h, "dpe_k_win-%d", il);
        }
    } else if (!inp->self_k_rot && (k->type == GGML_TYPE_F16 || k->type == GGML_TYPE_F32)) {
        k_win = dpe_rope(g, il, k, win_pos, GGML_ROPE_DPE_KEY_INVERSE, inp->dpe_win_idx);
        k_ord = k_win;
    } else {
        k_win = ggml_get_rows(ctx, ggml_view_3d(ctx, k, d*n_h_kv, n_kv, n_stream, k->nb[2], k->nb[3], 0),
                              inp->dpe_win_idx); // F32 [d*n_h_kv, n_win, n_stream]
        if (inp->self_k_rot) {
            k_win = llama_mul_mat_hadamard(ctx, k_win, inp->self_k_rot);
        }
        k_win = dpe_rope(g, il, ggml_reshape_3d(ctx, k_win, d, n_h_kv, n_win*n_stream), win_pos,
                         GGML_ROPE_DPE_KEY_INVERSE);
        if (inp->self_k_rot) {
            k_win = llama_mul_mat_hadamard(ctx, k_win, inp->self_k_rot);
        }
        k_win = ggml_reshape_4d(ctx, k_win, d, n_h_kv, n_win, n_stream);
    }
    if (k_ord != nullptr && inp->dpe_store_rows != nullptr && st != nullptr && st->written.at(il) != nullptr) {
        // the rotated-back keys to their slots (dpe_store_rows holds the slots here), for the next ubatches
        ggml_tensor * keep = ggml_set_rows(ctx, st->written[il], ggml_permute(ctx, k_ord, 0, 2, 1, 3),
                                           inp->dpe_store_rows);
        ggml_format_name(keep, "dpe_store_keep-%d", il);
        ggml_build_forward_expand(g.gf, keep);
    }
    if (k_win != nullptr) {
        ggml_format_name(k_win, "dpe_k_win-%d", il);
        k_win_h = ggml_permute(ctx, k_win, 0, 2, 1, 3);
    }

    // [d, n_head, n_tokens] -> [d, n_tokens/n_stream, n_head, n_stream], as build_attn_mha splits streams
    auto by_stream = [&](ggml_tensor * x) {
        x = ggml_view_4d(ctx, x, x->ne[0], x->ne[1], x->ne[2]/n_stream, n_stream, x->nb[1], x->nb[2],
                         x->nb[2]*(x->ne[2]/n_stream), 0);
        return ggml_permute(ctx, x, 0, 2, 1, 3);
    };

    ggml_tensor * cur;
    if (!g.cparams.flash_attn) {
        // far scores: over the whole cache, or in a decode graph only over the cells before those where every
        // visible pair is near (far_cells of the plan); the merge then writes a matrix of the cache's width, zeros
        // past the far scores, and puts the near scores there (the softmax's mask gives the masked pairs -inf).
        // Each far score is the same dot product as over the whole cache. DPE_FAR_CELLS=0: always over the whole
        // cache, to compare
        static const bool far_all = getenv("DPE_FAR_CELLS") != nullptr && atoi(getenv("DPE_FAR_CELLS")) == 0;
        const int64_t far_cells = std::min<int64_t>(n_kv, inp->dpe_plan ? inp->dpe_plan->far_cells : n_kv);
        ggml_tensor * kp = ggml_permute(ctx, k, 0, 2, 1, 3);
        ggml_tensor * kq;
        if (far_cells < n_kv && !far_all) {
            kq = ggml_mul_mat(ctx, ggml_view_4d(ctx, kp, d, far_cells, n_h_kv, n_stream, kp->nb[1], kp->nb[2],
                                                kp->nb[3], 0), by_stream(q_far));
            ggml_prec_set_acc(kq, GGML_PREC_F32);
            ggml_format_name(kq, "dpe_kq_far-%d", il);
        } else {
            kq = ggml_mul_mat(ctx, kp, by_stream(q_far));
            ggml_prec_set_acc(kq, GGML_PREC_F32);
        }
        // the window's keys as a contiguous [d, n_win, n_head_kv, n_stream] F32 matrix (the fast matmul paths want
        // contiguous rows), or the store itself, [d, S rows padded to 16, ...]: its near scores are against every
        // store row, and the merge takes slot j's from row idx[j] % S. Either row count is a multiple of 16, so the
        // CPU's tiled product (a multiple of 4 rows) computes both, and each score is the same dot product in the
        // same order. Not F16: on AVX-512 CPUs without AMX (seen on an AMD EPYC) the F16 GEMM that a contiguous
        // F16 operand selects rounds differently for different ubatch sizes, and the logits then depend on
        // n_ubatch, which stock's do not
        ggml_tensor * k_win_t = ggml_is_contiguous(k_win_h) ? k_win_h : ggml_cast(ctx, k_win_h, GGML_TYPE_F32);
        // contiguous queries where there are several per stream: the CPU's tiled product (llamafile's tinyBLAS)
        // wants a contiguous right operand (and at least 2 columns); without it every score is one dot product
        ggml_tensor * q_near  = q->ne[2]/n_stream > 1 ? ggml_cont(ctx, by_stream(q)) : by_stream(q);
        ggml_tensor * kq_near = ggml_mul_mat(ctx, k_win_t, q_near);
        ggml_prec_set_acc(kq_near, GGML_PREC_F32);
        if (hparams.attn_soft_cap) {
            for (ggml_tensor ** x : {&kq, &kq_near}) {
                *x = ggml_scale(ctx, *x, 1.0f/hparams.f_attn_logit_softcapping);
                *x = ggml_tanh(ctx, *x);
                *x = ggml_scale(ctx, *x, hparams.f_attn_logit_softcapping);
            }
        }
        kq = ggml_dpe_near_scores(ctx, kq, kq_near, inp->dpe_win_idx, inp->dpe_win_pos, inp->dpe_pos_q,
                                  (int) hparams.dpe.window, kw_slots, n_kv);
        ggml_format_name(kq, "dpe_kq-%d", il);

        kq = ggml_soft_max_ext(ctx, kq, kq_mask, kq_scale, hparams.f_max_alibi_bias);
        ggml_soft_max_add_sinks(kq, sinks);

        v = ggml_permute(ctx, v, 0, 2, 1, 3);
        if (!v_trans) {
            v = ggml_cont(ctx, ggml_transpose(ctx, v));
        }
        ggml_tensor * kqv = ggml_mul_mat(ctx, v, kq);
        cur = ggml_permute(ctx, kqv, 0, 2, 1, 3);
        cur = ggml_cont_2d(ctx, cur, cur->ne[0]*cur->ne[1], cur->ne[2]*cur->ne[3]);
        if (!g.cparams.offload_kqv) {
            ggml_backend_sched_set_tensor_backend(g.sched, cur, g.backend_cpu);
        }
        ggml_build_forward_expand(g.gf, cur);
        return cur;
    }

    // flash attention: DPE's own kernel (GGML_OP_DPE_FLASH_ATTN) wherever every accelerator of the context
    // runs it; otherwise one stock call over [window copies | cache cells] with q' = [q ; q_far] (see the top)
    {
        GGML_ASSERT(!v_trans && "flash attention keeps V untransposed");
        ggml_tensor * fa = ggml_dpe_flash_attn(ctx, by_stream(q), by_stream(q_far), ggml_permute(ctx, k, 0, 2, 1, 3),
                                               ggml_permute(ctx, v, 0, 2, 1, 3), kq_mask,
                                               k_win_h, inp->dpe_win_idx,
                                               inp->dpe_win_pos, inp->dpe_pos_q, sinks, kq_scale,
                                               hparams.f_max_alibi_bias,
                                               hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f,
                                               (int) hparams.dpe.window, kw_slots);
        if (dpe_accelerators_support(g, fa)) {
            ggml_format_name(fa, "dpe_fattn-%d", il);
            cur = ggml_reshape_2d(ctx, fa, fa->ne[0]*fa->ne[1], fa->ne[2]*fa->ne[3]);
            return cur;
        }
    }
    if (kw_slots > 0) {
        k_win_h = ggml_get_rows(ctx, k_win_h, inp->dpe_store_rows);
    }
    if (k_win == nullptr) {
        k_win = ggml_cont(ctx, ggml_permute(ctx, k_win_h, 0, 2, 1, 3));
    }
    ggml_tensor * qq = ggml_concat(ctx, q, q_far, 0);
    ggml_tensor * kk = ggml_concat(ctx, dpe_pad_rows(ctx, k_win, 0, (int) d),
                                   dpe_pad_rows(ctx, ggml_cast(ctx, k, GGML_TYPE_F32), (int) d, 0), 2);
    ggml_format_name(kk, "dpe_k-%d", il);

    // values of the same cells, in the non-transposed layout [d_v, n_head_kv, cells, n_stream], zero-padded
    // to the head dim of q'/k' (flash-attention kernels want equal K and V head dims)
    ggml_tensor * v32 = ggml_cast(ctx, v_trans ? ggml_permute(ctx, v, 2, 1, 0, 3) : v, GGML_TYPE_F32);
    const int64_t d_v = v32->ne[0];
    ggml_tensor * v_win = ggml_get_rows(ctx, ggml_reshape_3d(ctx, v32, d_v*n_h_kv, n_kv, n_stream), inp->dpe_win_idx);
    v_win = ggml_reshape_4d(ctx, v_win, d_v, n_h_kv, n_win, n_stream);
    ggml_tensor * vv = dpe_pad_rows(ctx, ggml_concat(ctx, v_win, v32, 2), 0, (int) (2*d - d_v));
    ggml_format_name(vv, "dpe_v-%d", il);

    cur = g.build_attn_mha(qq, kk, vv, nullptr, inp->dpe_kq_mask, sinks, nullptr, 0, kq_scale, il);

    // cur: [2*d*n_head, n_tokens], each head's first d_v values are the attention output
    const int64_t n_head = hparams.n_head(il);
    const int64_t d_pad  = cur->ne[0]/n_head;
    GGML_ASSERT(d_pad*n_head == cur->ne[0] && d_pad >= d_v);
    const int64_t n_tokens = cur->ne[1];
    cur = ggml_view_3d(ctx, cur, d_v, n_head, n_tokens, d_pad*ggml_element_size(cur), cur->nb[1], 0);
    cur = ggml_cont_2d(ctx, cur, d_v*n_head, n_tokens);
    ggml_format_name(cur, "dpe_kqv_out-%d", il);
    return cur;
}
