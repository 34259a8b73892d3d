// dpe_gguf._native: what the Python package needs to know about its native build.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include "dpe-build-info.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "ggml-dpe.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace py = pybind11;

// -- rope_dpe: one GGML_OP_ROPE_DPE node on a named ggml backend (for tests and benchmarks) ----

static ggml_backend_ptr dpe_backend_init(const std::string & name, int n_threads) {
    ggml_backend_t backend = nullptr;
    if (name == "cpu") {
        backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    } else if (name == "cuda") {
        backend = ggml_backend_init_by_name("CUDA0", nullptr);
    } else {
        throw py::value_error("backend must be \"cpu\" or \"cuda\", got \"" + name + "\"");
    }
    if (!backend) {
        throw std::runtime_error("ggml backend \"" + name + "\" is not available in this build of dpe_gguf "
                                 "(BUILD_INFO[\"cuda\"] says whether CUDA was built)");
    }
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(backend));
    auto set_n_threads = (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (set_n_threads) {
        set_n_threads(backend, n_threads);
    }
    return ggml_backend_ptr(backend);
}

// Compute gf (without the GIL) and copy t_out into out; an error names the op and the backend.
static void compute_into(ggml_backend_t backend, ggml_cgraph * gf, ggml_tensor * t_out, py::array_t<float> & out,
                         const char * what, const std::string & backend_name) {
    float * out_data = out.mutable_data();
    ggml_status status;
    {
        py::gil_scoped_release release;
        status = ggml_backend_graph_compute(backend, gf);
        if (status == GGML_STATUS_SUCCESS) {
            ggml_backend_tensor_get(t_out, out_data, 0, ggml_nbytes(t_out));
        }
    }
    if (status != GGML_STATUS_SUCCESS) {
        throw std::runtime_error(std::string(what) + ": graph compute failed on \"" + backend_name + "\"");
    }
}

// Allocate ctx's tensors on backend once it is known to run t_out (the graph's one node); errors name what,
// the op and the backend.
static ggml_backend_buffer_ptr dpe_alloc_for(ggml_backend_t backend, ggml_context * ctx, const ggml_tensor * t_out,
                                             const char * what, const std::string & backend_name) {
    if (!ggml_backend_supports_op(backend, t_out)) {
        throw std::runtime_error("ggml backend \"" + backend_name + "\" does not support this " +
                                 ggml_op_name(t_out->op) + " node");
    }
    ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors(ctx, backend));
    if (!buf) {
        throw std::runtime_error(std::string(what) + ": could not allocate the tensors on \"" + backend_name + "\"");
    }
    return buf;
}

// the GGML_OP_ROPE_DPE kind of the bindings' flags
static int dpe_rope_kind(bool is_query, bool inverse, bool full) {
    if (full) {
        return is_query ? GGML_ROPE_DPE_QUERY_PAIR : GGML_ROPE_DPE_KEY_FULL;
    }
    return inverse ? GGML_ROPE_DPE_KEY_INVERSE : is_query ? GGML_ROPE_DPE_QUERY : GGML_ROPE_DPE_KEY;
}

static py::array_t<float> rope_dpe(
        py::array a_in, py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos,
        py::array_t<float, py::array::c_style | py::array::forcecast> table,
        int n_dims, int mode, int window, bool is_query, bool inverse, bool full, float freq_base, float freq_scale,
        float ext_factor, float attn_factor, float beta_fast, float beta_slow, int n_ctx_orig, py::object freq_factors_in,
        const std::string & backend_name, int n_threads) {
    // a: any float32 array [n_tokens, n_head, n_embd_head] with unit stride along the last axis is passed to
    // ggml as a strided view (so slices test the non-contiguous path); anything else is copied first.
    py::array_t<float> a = py::array_t<float>::ensure(a_in);
    if (!a || a.ndim() != 3) {
        throw py::value_error("a must be a float32 array [n_tokens, n_head, n_embd_head]");
    }
    bool strided_ok = a.strides(2) == (py::ssize_t) sizeof(float);
    for (int d = 0; d < 2; d++) {
        strided_ok = strided_ok && a.strides(d) > 0 && a.strides(d) % sizeof(float) == 0;
    }
    if (!strided_ok) {
        a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
    }
    const int64_t n_tokens = a.shape(0), n_head = a.shape(1), n_embd_head = a.shape(2);
    if (pos.ndim() != 1 || pos.shape(0) != n_tokens) {
        throw py::value_error("pos must be int32 [n_tokens]");
    }
    if (table.ndim() != 2 || table.shape(1) != n_dims / 2 || table.shape(0) < 1 || n_head % table.shape(0) != 0) {
        throw py::value_error("table must be float32 [n_head_kv, n_dims/2] with n_head a multiple of n_head_kv");
    }
    if (inverse && (is_query || full)) {
        throw py::value_error("inverse rotates far keys back: it needs is_query=False, full=False");
    }
    if (!full && attn_factor != 1.0f) {
        throw py::value_error("attn_factor scales unrotated vectors: it needs full=True");
    }
    if (n_dims <= 0 || n_dims % 2 != 0 || n_dims > n_embd_head || (mode != GGML_ROPE_TYPE_NORMAL && mode != GGML_ROPE_TYPE_NEOX)) {
        throw py::value_error("need 0 < n_dims <= n_embd_head, n_dims even, mode NORMAL (0) or NEOX (2)");
    }
    const bool has_ff = !freq_factors_in.is_none();
    py::array_t<float, py::array::c_style | py::array::forcecast> freq_factors;
    if (has_ff) {
        freq_factors = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(freq_factors_in);
        if (!freq_factors || freq_factors.ndim() != 1 || freq_factors.shape(0) != n_dims / 2) {
            throw py::value_error("freq_factors must be float32 [n_dims/2]");
        }
    }

    ggml_backend_ptr backend = dpe_backend_init(backend_name, n_threads);

    ggml_init_params params = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, /*no_alloc*/ true };
    ggml_context_ptr ctx(ggml_init(params));

    const size_t span = (size_t) ((n_tokens - 1) * a.strides(0) + (n_head - 1) * a.strides(1)) + n_embd_head * sizeof(float);
    ggml_tensor * t_base  = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_F32, (int64_t) (span / sizeof(float)));
    ggml_tensor * t_a     = ggml_view_3d(ctx.get(), t_base, n_embd_head, n_head, n_tokens, a.strides(1), a.strides(0), 0);
    ggml_tensor * t_pos   = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n_tokens);
    ggml_tensor * t_table = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, n_dims / 2, table.shape(0));
    ggml_tensor * t_ff    = has_ff ? ggml_new_tensor_1d(ctx.get(), GGML_TYPE_F32, n_dims / 2) : nullptr;
    const int kind = dpe_rope_kind(is_query, inverse, full);
    ggml_tensor * t_out   = ggml_rope_dpe_ext(ctx.get(), t_a, t_pos, t_table, t_ff, nullptr, n_dims, mode, n_ctx_orig,
                                              freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow,
                                              window, kind);
    ggml_cgraph * gf = ggml_new_graph(ctx.get());
    ggml_build_forward_expand(gf, t_out);

    ggml_backend_buffer_ptr buf = dpe_alloc_for(backend.get(), ctx.get(), t_out, "rope_dpe", backend_name);
    ggml_backend_tensor_set(t_base, a.data(), 0, span);
    ggml_backend_tensor_set(t_pos, pos.data(), 0, ggml_nbytes(t_pos));
    ggml_backend_tensor_set(t_table, table.data(), 0, ggml_nbytes(t_table));
    if (t_ff) {
        ggml_backend_tensor_set(t_ff, freq_factors.data(), 0, ggml_nbytes(t_ff));
    }

    const int64_t n_out = t_out->ne[3]; // 2 for QUERY_PAIR
    py::array_t<float> out = n_out == 1 ? py::array_t<float>({n_tokens, n_head, n_embd_head})
                                        : py::array_t<float>({n_out, n_tokens, n_head, n_embd_head});
    compute_into(backend.get(), gf, t_out, out, "rope_dpe", backend_name);
    return out;
}

// -- dpe_near_scores: one GGML_OP_DPE_NEAR_SCORES node (for tests) ---------------------------------

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

static py::array_t<float> dpe_near_scores(f32_array kq, f32_array kq_near, i32_array idx, i32_array pos_win,
                                          i32_array pos_q, int window, int kw_slots, int64_t n_out,
                                          const std::string & backend_name, int n_threads) {
    if (kq.ndim() != 4 || kq_near.ndim() != 4 || idx.ndim() != 2 || pos_win.ndim() != 2 || pos_q.ndim() != 1) {
        throw py::value_error("kq, kq_near: 4-d; idx, pos_win: 2-d; pos_q: 1-d");
    }
    const int64_t n_stream = kq.shape(0), n_head = kq.shape(1), n_tps = kq.shape(2), n_kv = kq.shape(3);
    const int64_t n_win = idx.shape(1), n_rows = kq_near.shape(3);
    if (kq_near.shape(0) != n_stream || kq_near.shape(1) != n_head || kq_near.shape(2) != n_tps ||
        idx.shape(0) != n_stream || pos_win.shape(0) != n_stream || pos_win.shape(1) != n_win ||
        pos_q.shape(0) != n_stream*n_tps || kw_slots < 0 || (kw_slots == 0 ? n_rows != n_win : n_rows < kw_slots) ||
        (n_out >= 0 && n_out < n_kv)) {
        throw py::value_error("shapes: kq [S, H, T, n_kv], kq_near [S, H, T, n_win] (kw_slots > 0: [S, H, T, n >= kw_slots]), "
                              "idx/pos_win [S, n_win], pos_q [S*T]");
    }
    ggml_backend_ptr backend = dpe_backend_init(backend_name, n_threads);
    ggml_init_params params = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, /*no_alloc*/ true };
    ggml_context_ptr ctx(ggml_init(params));
    ggml_tensor * t_kq   = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, n_kv, n_tps, n_head, n_stream);
    ggml_tensor * t_near = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, n_rows, n_tps, n_head, n_stream);
    ggml_tensor * t_idx  = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, n_win, n_stream);
    ggml_tensor * t_pw   = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, n_win, n_stream);
    ggml_tensor * t_pq   = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n_stream*n_tps);
    ggml_tensor * t_out  = ggml_dpe_near_scores(ctx.get(), t_kq, t_near, t_idx, t_pw, t_pq, window, kw_slots,
                                                  n_out < 0 ? n_kv : n_out);
    ggml_cgraph * gf = ggml_new_graph(ctx.get());
    ggml_build_forward_expand(gf, t_out);
    ggml_backend_buffer_ptr buf = dpe_alloc_for(backend.get(), ctx.get(), t_out, "dpe_near_scores", backend_name);
    ggml_backend_tensor_set(t_kq, kq.data(), 0, ggml_nbytes(t_kq));
    ggml_backend_tensor_set(t_near, kq_near.data(), 0, ggml_nbytes(t_near));
    ggml_backend_tensor_set(t_idx, idx.data(), 0, ggml_nbytes(t_idx));
    ggml_backend_tensor_set(t_pw, pos_win.data(), 0, ggml_nbytes(t_pw));
    ggml_backend_tensor_set(t_pq, pos_q.data(), 0, ggml_nbytes(t_pq));
    py::array_t<float> out({n_stream, n_head, n_tps, n_out < 0 ? n_kv : n_out});
    compute_into(backend.get(), gf, t_out, out, "dpe_near_scores", backend_name);
    return out;
}

// -- ggml types (for the bindings below) -----------------------------------------------------------------

static ggml_type dpe_type_by_name(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * tn = ggml_type_name((ggml_type) t);
        if (tn && name == tn) {
            return (ggml_type) t;
        }
    }
    throw py::value_error("unknown ggml type \"" + name + "\" (e.g. f32, f16, q8_0, q4_0)");
}

// float32 rows [..., n] in ggml's type t (bytes); n must be a multiple of t's block size
static std::vector<uint8_t> dpe_to_type(const float * x, int64_t rows, int64_t n, ggml_type t) {
    if (n % ggml_blck_size(t) != 0) {
        throw py::value_error(std::string("row length is not a multiple of the block size of ") + ggml_type_name(t));
    }
    std::vector<uint8_t> out(rows*ggml_row_size(t, n));
    if (t == GGML_TYPE_F32) {
        memcpy(out.data(), x, out.size());
    } else if (t == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(x, (ggml_fp16_t *) out.data(), rows*n);
    } else {
        ggml_quantize_chunk(t, x, out.data(), 0, rows, n, nullptr);
    }
    return out;
}

// -- rope_dpe_rows: GGML_OP_ROPE_DPE that gathers its rows from a cache (ggml_rope_dpe_ext with rows) -------

static py::array_t<float> rope_dpe_rows(
        f32_array cache, i32_array rows, i32_array pos, f32_array table,
        int n_dims, int mode, int window, bool is_query, bool inverse, float freq_base, const std::string & cache_type,
        const std::string & backend_name, int n_threads) {
    if (cache.ndim() != 4 || rows.ndim() != 2 || pos.ndim() != 2) {
        throw py::value_error("cache: float32 [n_stream, n_cells, n_head_kv, n_embd_head]; rows, pos: int32 [n_stream, n_slots]");
    }
    const int64_t n_stream = cache.shape(0), n_cells = cache.shape(1), n_head = cache.shape(2), d = cache.shape(3);
    const int64_t n_slots = rows.shape(1);
    if (rows.shape(0) != n_stream || pos.shape(0) != n_stream || pos.shape(1) != n_slots) {
        throw py::value_error("rows and pos must be [n_stream, n_slots]");
    }
    for (int64_t i = 0; i < rows.size(); ++i) {
        if (rows.data()[i] < 0 || rows.data()[i] >= n_cells) {
            throw py::value_error("rows must index cells 0 .. n_cells-1");
        }
    }
    if (table.ndim() != 2 || table.shape(1) != n_dims / 2 || n_head % table.shape(0) != 0) {
        throw py::value_error("table must be float32 [n_head_kv, n_dims/2]");
    }
    if (inverse && is_query) {
        throw py::value_error("inverse rotates far keys back: it needs is_query=False");
    }
    const ggml_type t_cache = dpe_type_by_name(cache_type);
    ggml_backend_ptr backend = dpe_backend_init(backend_name, n_threads);
    ggml_init_params params = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, /*no_alloc*/ true };
    ggml_context_ptr ctx(ggml_init(params));
    ggml_tensor * t_cache_t = ggml_new_tensor_4d(ctx.get(), t_cache, d, n_head, n_cells, n_stream);
    ggml_tensor * t_rows    = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, n_slots, n_stream);
    ggml_tensor * t_pos     = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n_slots*n_stream);
    ggml_tensor * t_table   = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, n_dims / 2, table.shape(0));
    ggml_tensor * t_out     = ggml_rope_dpe_ext(ctx.get(), t_cache_t, t_pos, t_table, nullptr, t_rows, n_dims, mode, 0,
                                                freq_base, 1.0f, 0.0f, 1.0f, 32.0f, 1.0f, window,
                                                dpe_rope_kind(is_query, inverse, false));
    ggml_cgraph * gf = ggml_new_graph(ctx.get());
    ggml_build_forward_expand(gf, t_out);
    ggml_backend_buffer_ptr buf = dpe_alloc_for(backend.get(), ctx.get(), t_out, "rope_dpe_rows", backend_name);
    const std::vector<uint8_t> bytes = dpe_to_type(cache.data(), n_stream*n_cells*n_head, d, t_cache);
    ggml_backend_tensor_set(t_cache_t, bytes.data(), 0, bytes.size());
    ggml_backend_tensor_set(t_rows, rows.data(), 0, ggml_nbytes(t_rows));
    ggml_backend_tensor_set(t_pos, pos.data(), 0, ggml_nbytes(t_pos));
    ggml_backend_tensor_set(t_table, table.data(), 0, ggml_nbytes(t_table));
    py::array_t<float> out({n_stream, n_slots, n_head, d});
    compute_into(backend.get(), gf, t_out, out, "rope_dpe_rows", backend_name);
    return out;
}

// -- rope_dpe_key_write: GGML_ROPE_DPE_KEY_WRITE, or the nodes it replaces (for tests) ------------------------

// The cache and store after writing the keys a: one KEY_WRITE node (fused), or what it replaces (KEY_FULL, set_rows
// into the cache, the cache type's round trip, KEY_INVERSE, set_rows into the store), as the engine built them.
static py::tuple rope_dpe_key_write(f32_array a, i32_array pos, f32_array table, f32_array cache, py::array_t<int64_t> idx,
                                    py::object store_in, py::object slot_in, int n_dims, int mode, int window,
                                    float freq_base, float attn_factor, const std::string & cache_type, bool fused,
                                    const std::string & backend_name, int n_threads) {
    if (a.ndim() != 3 || pos.ndim() != 1 || cache.ndim() != 2 || idx.ndim() != 1) {
        throw py::value_error("a: float32 [n_tokens, n_head_kv, d]; pos: int32 [n_tokens]; cache: [n_rows, n_head_kv*d]; "
                              "idx: int64 [n_tokens]");
    }
    const int64_t nt = a.shape(0), nh = a.shape(1), d = a.shape(2), n_rows = cache.shape(0);
    if (pos.shape(0) != nt || idx.shape(0) != nt || cache.shape(1) != nh*d || table.ndim() != 2 ||
        table.shape(0) != nh || table.shape(1) != n_dims/2) {
        throw py::value_error("shapes: pos, idx [n_tokens]; cache [n_rows, n_head_kv*d]; table [n_head_kv, n_dims/2]");
    }
    for (int64_t i = 0; i < nt; ++i) {
        if (idx.data()[i] < 0 || idx.data()[i] >= n_rows) {
            throw py::value_error("idx must index rows 0 .. n_rows-1");
        }
    }
    const bool has_store = !store_in.is_none();
    f32_array store;
    py::array_t<int64_t> slot;
    int64_t ns = 1, n_slots = 0, n_tps = nt;
    if (has_store) {
        store = f32_array::ensure(store_in);
        slot  = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(slot_in);
        if (!store || store.ndim() != 4 || store.shape(1) != nh || store.shape(3) != d || !slot || slot.ndim() != 2 ||
            slot.shape(0) != store.shape(0) || slot.shape(0)*slot.shape(1) != nt) {
            throw py::value_error("store: float32 [n_stream, n_head_kv, n_slots, d]; slot: int64 [n_stream, n_tps]");
        }
        ns = store.shape(0); n_slots = store.shape(2); n_tps = slot.shape(1);
        for (int64_t i = 0; i < nt; ++i) {
            if (slot.data()[i] < 0 || slot.data()[i] >= n_slots) {
                throw py::value_error("slot must index slots 0 .. n_slots-1");
            }
        }
    }
    const ggml_type ct = dpe_type_by_name(cache_type);
    if (ct != GGML_TYPE_F16 && ct != GGML_TYPE_F32) {
        throw py::value_error("cache_type must be f16 or f32");
    }
    ggml_backend_ptr backend = dpe_backend_init(backend_name, n_threads);
    ggml_init_params params = { ggml_tensor_overhead() * 24 + ggml_graph_overhead(), nullptr, /*no_alloc*/ true };
    ggml_context_ptr ctx(ggml_init(params));
    ggml_context * c = ctx.get();
    ggml_tensor * t_a     = ggml_new_tensor_3d(c, GGML_TYPE_F32, d, nh, nt);
    ggml_tensor * t_pos   = ggml_new_tensor_1d(c, GGML_TYPE_I32, nt);
    ggml_tensor * t_table = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_dims/2, nh);
    ggml_tensor * t_cache = ggml_new_tensor_2d(c, ct, nh*d, n_rows);
    ggml_tensor * t_idx   = ggml_new_tensor_1d(c, GGML_TYPE_I64, nt);
    ggml_tensor * t_store = has_store ? ggml_new_tensor_4d(c, GGML_TYPE_F32, d, n_slots, nh, ns) : nullptr;
    ggml_tensor * t_slot  = has_store ? ggml_new_tensor_3d(c, GGML_TYPE_I64, n_tps, 1, ns) : nullptr;
    ggml_cgraph * gf = ggml_new_graph(c);
    ggml_tensor * check = nullptr; // a node the backend must run
    if (fused) {
        check = ggml_rope_dpe_key_write(c, t_cache, t_a, t_idx, t_pos, t_table, nullptr, t_store, t_slot, n_dims, mode, 0,
                                        freq_base, 1.0f, 0.0f, attn_factor, 32.0f, 1.0f, window);
        ggml_build_forward_expand(gf, check);
    } else {
        ggml_tensor * kf = ggml_rope_dpe_ext(c, t_a, t_pos, t_table, nullptr, nullptr, n_dims, mode, 0, freq_base, 1.0f,
                                             0.0f, attn_factor, 32.0f, 1.0f, window, GGML_ROPE_DPE_KEY_FULL);
        check = kf;
        ggml_build_forward_expand(gf, ggml_set_rows(c, t_cache, ggml_view_2d(c, kf, nh*d, nt, kf->nb[2], 0), t_idx));
        if (has_store) {
            ggml_tensor * kr = kf;
            if (ct == GGML_TYPE_F16) {
                kr = ggml_cast(c, ggml_cast(c, kr, GGML_TYPE_F16), GGML_TYPE_F32);
            }
            ggml_tensor * ko = ggml_rope_dpe_ext(c, kr, t_pos, t_table, nullptr, nullptr, n_dims, mode, 0, freq_base,
                                                 1.0f, 0.0f, 1.0f, 32.0f, 1.0f, window, GGML_ROPE_DPE_KEY_INVERSE);
            ggml_tensor * src = ggml_view_4d(c, ko, d, nh, n_tps, ns, ko->nb[1], ko->nb[2], ko->nb[2]*n_tps, 0);
            ggml_build_forward_expand(gf, ggml_set_rows(c, t_store, ggml_permute(c, src, 0, 2, 1, 3), t_slot));
        }
    }
    ggml_backend_buffer_ptr buf = dpe_alloc_for(backend.get(), c, check, "rope_dpe_key_write", backend_name);
    const std::vector<uint8_t> cache_bytes = dpe_to_type(cache.data(), n_rows, nh*d, ct);
    ggml_backend_tensor_set(t_a, a.data(), 0, ggml_nbytes(t_a));
    ggml_backend_tensor_set(t_pos, pos.data(), 0, ggml_nbytes(t_pos));
    ggml_backend_tensor_set(t_table, table.data(), 0, ggml_nbytes(t_table));
    ggml_backend_tensor_set(t_cache, cache_bytes.data(), 0, cache_bytes.size());
    ggml_backend_tensor_set(t_idx, idx.data(), 0, ggml_nbytes(t_idx));
    if (has_store) {
        // the store [n_stream, n_head_kv, n_slots, d] as ggml's [d, n_slots, n_head_kv, n_stream]
        ggml_backend_tensor_set(t_store, store.data(), 0, ggml_nbytes(t_store));
        ggml_backend_tensor_set(t_slot, slot.data(), 0, ggml_nbytes(t_slot));
    }
    ggml_status status;
    std::vector<uint8_t> cache_out(ggml_nbytes(t_cache));
    py::array_t<float> store_out(has_store ? std::vector<py::ssize_t>{ns, nh, n_slots, d} : std::vector<py::ssize_t>{0});
    {
        py::gil_scoped_release release;
        status = ggml_backend_graph_compute(backend.get(), gf);
        if (status == GGML_STATUS_SUCCESS) {
            ggml_backend_tensor_get(t_cache, cache_out.data(), 0, cache_out.size());
            if (has_store) {
                ggml_backend_tensor_get(t_store, store_out.mutable_data(), 0, ggml_nbytes(t_store));
            }
        }
    }
    if (status != GGML_STATUS_SUCCESS) {
        throw std::runtime_error("rope_dpe_key_write: graph compute failed on \"" + backend_name + "\"");
    }
    py::array_t<float> cache_f({n_rows, nh*d});
    if (ct == GGML_TYPE_F32) {
        memcpy(cache_f.mutable_data(), cache_out.data(), cache_out.size());
    } else {
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) cache_out.data(), cache_f.mutable_data(), n_rows*nh*d);
    }
    return py::make_tuple(cache_f, store_out);
}

// -- round_trip, and dpe_flash_attn: one GGML_OP_DPE_FLASH_ATTN node (for tests and the kernel harness) --

// x rounded to ggml's type: converted (quantized) and back, as a cache of that type holds it
static py::array_t<float> round_trip(f32_array x, const std::string & type_name) {
    const ggml_type t = dpe_type_by_name(type_name);
    if (x.ndim() < 1) {
        throw py::value_error("x must have at least one axis");
    }
    const int64_t n    = x.shape(x.ndim() - 1);
    const int64_t rows = n ? x.size()/n : 0;
    std::vector<uint8_t> q = dpe_to_type(x.data(), rows, n, t);
    py::array_t<float> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    if (t == GGML_TYPE_F32) {
        memcpy(out.mutable_data(), q.data(), q.size());
    } else {
        ggml_get_type_traits(t)->to_float(q.data(), out.mutable_data(), rows*n);
    }
    return out;
}

// The inputs of one GGML_OP_DPE_FLASH_ATTN node (its layout: ggml-dpe.h), shared by the test runner and the timer.
struct dpe_fa_inputs {
    ggml_tensor * q, * q_far, * k, * v, * mask, * k_win, * idx, * pos_win, * pos_q;
};

static dpe_fa_inputs dpe_fa_new_inputs(ggml_context * c, int64_t S, int64_t H, int64_t Hk, int64_t T, int64_t D,
                                       int64_t Dv, int64_t N, int64_t W, ggml_type t_kv, int64_t W_kw = -1) {
    dpe_fa_inputs in;
    in.q       = ggml_new_tensor_4d(c, GGML_TYPE_F32, D, T, H, S);
    in.q_far   = ggml_new_tensor_4d(c, GGML_TYPE_F32, D, T, H, S);
    in.k       = ggml_new_tensor_4d(c, t_kv, D, N, Hk, S);
    in.v       = ggml_new_tensor_4d(c, t_kv, Dv, N, Hk, S);
    in.mask    = ggml_new_tensor_4d(c, GGML_TYPE_F16, N, T, 1, S);
    in.k_win   = ggml_new_tensor_4d(c, GGML_TYPE_F32, D, W_kw < 0 ? W : W_kw, Hk, S);
    in.idx     = ggml_new_tensor_2d(c, GGML_TYPE_I32, W, S);
    in.pos_win = ggml_new_tensor_2d(c, GGML_TYPE_I32, W, S);
    in.pos_q   = ggml_new_tensor_1d(c, GGML_TYPE_I32, S*T);
    return in;
}

static py::array_t<float> dpe_flash_attn(f32_array q, f32_array q_far, f32_array k, f32_array v, f32_array mask,
                                         f32_array k_win, i32_array idx, i32_array pos_win, i32_array pos_q,
                                         py::object sinks_in, int window, float scale, float max_bias, float softcap,
                                         const std::string & kv_type, const std::string & backend_name, int n_threads,
                                         bool stock, int kw_slots) {
    if (q.ndim() != 4 || q_far.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || mask.ndim() != 3 || k_win.ndim() != 4 ||
        idx.ndim() != 2 || pos_win.ndim() != 2 || pos_q.ndim() != 1) {
        throw py::value_error("q, q_far, k, v, k_win: 4-d; mask: 3-d; idx, pos_win: 2-d; pos_q: 1-d");
    }
    const int64_t S = q.shape(0), H = q.shape(1), T = q.shape(2), D = q.shape(3);
    const int64_t Hk = k.shape(1), N = k.shape(2), Dv = v.shape(3), W = idx.shape(1), W_kw = k_win.shape(2);
    if (kw_slots < 0 || (kw_slots == 0 ? W_kw != W : W_kw < kw_slots)) {
        throw py::value_error("k_win [S, Hk, W, D], or with kw_slots > 0 [S, Hk, >= kw_slots, D]");
    }
    for (int i = 0; i < 4; ++i) {
        if (q_far.shape(i) != q.shape(i)) {
            throw py::value_error("q_far must have the shape of q [S, H, T, D]");
        }
    }
    if (k.shape(0) != S || k.shape(3) != D || v.shape(0) != S || v.shape(1) != Hk || v.shape(2) != N ||
        mask.shape(0) != S || mask.shape(1) != T || mask.shape(2) != N || k_win.shape(0) != S || k_win.shape(1) != Hk ||
        k_win.shape(3) != D || idx.shape(0) != S || pos_win.shape(0) != S || pos_win.shape(1) != W ||
        pos_q.shape(0) != S*T || Hk < 1 || H % Hk != 0) {
        throw py::value_error("shapes: q, q_far [S, H, T, D]; k [S, Hk, N, D]; v [S, Hk, N, Dv]; mask [S, T, N]; "
                              "k_win [S, Hk, W, D]; idx, pos_win [S, W]; pos_q [S*T]; H a multiple of Hk");
    }
    const ggml_type t_kv = dpe_type_by_name(kv_type);
    const bool has_sinks = !sinks_in.is_none();
    f32_array sinks;
    if (has_sinks) {
        sinks = f32_array::ensure(sinks_in);
        if (!sinks || sinks.ndim() != 1 || sinks.shape(0) != H) {
            throw py::value_error("sinks must be float32 [H]");
        }
    }

    ggml_backend_ptr backend = dpe_backend_init(backend_name, n_threads);
    ggml_init_params params = { ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, /*no_alloc*/ true };
    ggml_context_ptr ctx(ggml_init(params));
    ggml_context * c = ctx.get();
    const dpe_fa_inputs in = dpe_fa_new_inputs(c, S, H, Hk, T, D, Dv, N, W, t_kv, W_kw);
    ggml_tensor * t_sk  = has_sinks ? ggml_new_tensor_1d(c, GGML_TYPE_F32, H) : nullptr;
    ggml_tensor * t_out;
    if (stock) {
        // stock's flash attention of the far queries over the whole cache: the precision yardstick of a backend
        t_out = ggml_flash_attn_ext(c, in.q_far, in.k, in.v, in.mask, scale, max_bias, softcap);
        ggml_flash_attn_ext_set_prec(t_out, GGML_PREC_F32);
        ggml_flash_attn_ext_add_sinks(t_out, t_sk);
    } else {
        t_out = ggml_dpe_flash_attn(c, in.q, in.q_far, in.k, in.v, in.mask, in.k_win, in.idx, in.pos_win, in.pos_q,
                                    t_sk, scale, max_bias, softcap, window, kw_slots);
    }
    ggml_cgraph * gf = ggml_new_graph(c);
    ggml_build_forward_expand(gf, t_out);
    ggml_backend_buffer_ptr buf = dpe_alloc_for(backend.get(), c, t_out, "dpe_flash_attn", backend_name);
    std::vector<ggml_fp16_t> m16(S*T*N);
    ggml_fp32_to_fp16_row(mask.data(), m16.data(), (int64_t) m16.size());
    const std::vector<uint8_t> k_bytes = dpe_to_type(k.data(), S*Hk*N, D, t_kv);
    const std::vector<uint8_t> v_bytes = dpe_to_type(v.data(), S*Hk*N, Dv, t_kv);
    const std::pair<ggml_tensor *, const void *> data[] = {
        {in.q, q.data()}, {in.q_far, q_far.data()}, {in.k, k_bytes.data()}, {in.v, v_bytes.data()},
        {in.mask, m16.data()}, {in.k_win, k_win.data()}, {in.idx, idx.data()}, {in.pos_win, pos_win.data()},
        {in.pos_q, pos_q.data()},
    };
    for (const auto & [t, p] : data) {
        ggml_backend_tensor_set(t, p, 0, ggml_nbytes(t));
    }
    if (t_sk) {
        ggml_backend_tensor_set(t_sk, sinks.data(), 0, ggml_nbytes(t_sk));
    }
    py::array_t<float> out({S, T, H, Dv});
    compute_into(backend.get(), gf, t_out, out, "dpe_flash_attn", backend_name);
    return out;
}

// -- bench_attention: stock flash attention or DPE's, one node of a given shape, timed (bench/attention.py) --

// Seconds per graph compute (the median of `reps`, after one warm-up) of one attention node over a cache of
// n_kv cells whose last n_tps hold the queries: stock's GGML_OP_FLASH_ATTN_EXT, or GGML_OP_DPE_FLASH_ATTN with
// window w (its window set: the cells within w of the queries, as the engine builds it). Random inputs.
static double bench_attention(bool dpe, int64_t n_kv, int64_t n_tps, int64_t n_head, int64_t n_head_kv, int64_t d,
                              int window, const std::string & kv_type, int reps, const std::string & backend_name,
                              int n_threads) {
    if (n_tps < 1 || n_kv < n_tps || n_head_kv < 1 || n_head % n_head_kv != 0 || reps < 1 || window < 1) {
        throw py::value_error("need 1 <= n_tps <= n_kv, n_head a multiple of n_head_kv, reps >= 1, window >= 1");
    }
    const ggml_type t_kv = dpe_type_by_name(kv_type);
    ggml_backend_ptr backend = dpe_backend_init(backend_name, n_threads);
    ggml_init_params params = { ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, /*no_alloc*/ true };
    ggml_context_ptr ctx(ggml_init(params));
    ggml_context * c = ctx.get();
    const int64_t lo    = n_kv - n_tps;                         // first query's position (= its cell)
    const int64_t first = std::max<int64_t>(0, lo - window + 1);  // first window cell
    const int64_t n_win = n_kv - first;
    const dpe_fa_inputs in = dpe_fa_new_inputs(c, 1, n_head, n_head_kv, n_tps, d, d, n_kv, n_win, t_kv);
    ggml_tensor * t_out = dpe ? ggml_dpe_flash_attn(c, in.q, in.q_far, in.k, in.v, in.mask, in.k_win, in.idx,
                                                    in.pos_win, in.pos_q, nullptr, 0.125f, 0.0f, 0.0f, window, 0)
                              : ggml_flash_attn_ext(c, in.q, in.k, in.v, in.mask, 0.125f, 0.0f, 0.0f);
    if (!dpe) {
        ggml_flash_attn_ext_set_prec(t_out, GGML_PREC_F32);
    }
    ggml_cgraph * gf = ggml_new_graph(c);
    ggml_build_forward_expand(gf, t_out);
    ggml_backend_buffer_ptr buf = dpe_alloc_for(backend.get(), c, t_out, "bench_attention", backend_name);
    uint64_t state = 0x9E3779B97F4A7C15ull;
    auto fill = [&](ggml_tensor * t, int64_t rows, int64_t n, ggml_type type) {
        std::vector<float> x(rows*n);
        for (float & e : x) {
            state = state*6364136223846793005ull + 1442695040888963407ull;
            e = (float) ((int64_t) (state >> 40) - (1 << 23))/(float) (1 << 23);
        }
        const std::vector<uint8_t> bytes = dpe_to_type(x.data(), rows, n, type);
        ggml_backend_tensor_set(t, bytes.data(), 0, ggml_nbytes(t));
    };
    fill(in.q, n_tps*n_head, d, GGML_TYPE_F32);
    fill(in.q_far, n_tps*n_head, d, GGML_TYPE_F32);
    fill(in.k, n_kv*n_head_kv, d, t_kv);
    fill(in.v, n_kv*n_head_kv, d, t_kv);
    fill(in.k_win, n_win*n_head_kv, d, GGML_TYPE_F32);
    std::vector<ggml_fp16_t> mask(n_kv*n_tps);
    std::vector<int32_t> idx(n_win), pw(n_win), pq(n_tps);
    for (int64_t i = 0; i < n_tps; ++i) {
        pq[i] = (int32_t) (lo + i);
        for (int64_t j = 0; j < n_kv; ++j) {
            mask[i*n_kv + j] = ggml_fp32_to_fp16(j <= lo + i ? 0.0f : -INFINITY);
        }
    }
    for (int64_t j = 0; j < n_win; ++j) {
        idx[j] = pw[j] = (int32_t) (first + j);
    }
    ggml_backend_tensor_set(in.mask, mask.data(), 0, ggml_nbytes(in.mask));
    ggml_backend_tensor_set(in.idx, idx.data(), 0, ggml_nbytes(in.idx));
    ggml_backend_tensor_set(in.pos_win, pw.data(), 0, ggml_nbytes(in.pos_win));
    ggml_backend_tensor_set(in.pos_q, pq.data(), 0, ggml_nbytes(in.pos_q));

    std::vector<double> times;
    {
        py::gil_scoped_release release;
        for (int r = 0; r <= reps; ++r) {
            const auto t0 = std::chrono::steady_clock::now();
            if (ggml_backend_graph_compute(backend.get(), gf) != GGML_STATUS_SUCCESS) {
                break;
            }
            ggml_backend_synchronize(backend.get());
            const auto t1 = std::chrono::steady_clock::now();
            if (r > 0) {
                times.push_back(std::chrono::duration<double>(t1 - t0).count());
            }
        }
    }
    if ((int) times.size() != reps) {
        throw std::runtime_error("bench_attention: graph compute failed on \"" + backend_name + "\"");
    }
    std::sort(times.begin(), times.end());
    return times[times.size()/2];
}

PYBIND11_MODULE(_native, m) {
    m.doc() = "Facts about dpe-gguf's native build (patched llama.cpp).";
    py::dict info;
    info["version"] = DPE_GGUF_VERSION;
    info["upstream_commit"] = DPE_UPSTREAM_COMMIT;
    info["patch_series"] = DPE_PATCH_SERIES;
    info["cuda"] = bool(DPE_WITH_CUDA);
    info["cuda_architectures"] = DPE_CUDA_ARCHITECTURES;
    info["build_type"] = DPE_BUILD_TYPE;
    info["lib_subdir"] = "lib";
    info["bin_subdir"] = "bin";
    m.attr("BUILD_INFO") = info;

    m.def("rope_dpe", &rope_dpe, py::arg("a"), py::arg("pos"), py::arg("table"), py::kw_only(),
          py::arg("n_dims"), py::arg("mode"), py::arg("window"), py::arg("is_query"), py::arg("inverse") = false,
          py::arg("full") = false, py::arg("freq_base"),
          py::arg("freq_scale") = 1.0f, py::arg("ext_factor") = 0.0f, py::arg("attn_factor") = 1.0f, py::arg("beta_fast") = 32.0f,
          py::arg("beta_slow") = 1.0f, py::arg("n_ctx_orig") = 0, py::arg("freq_factors") = py::none(),
          py::arg("backend") = "cpu", py::arg("n_threads") = 2,
          "Run one GGML_OP_ROPE_DPE node (csrc/ggml-dpe.h) on a ggml backend (\"cpu\" or \"cuda\").\n"
          "a: float32 [n_tokens, n_head, n_embd_head] (strided views are passed as ggml views), pos: int32 [n_tokens],\n"
          "table: float32 [n_head_kv, n_dims/2]; returns float32 [n_tokens, n_head, n_embd_head].\n"
          "inverse=True: far keys back to the keys rotated at pos (kind KEY_INVERSE).\n"
          "full=True: a is not rotated yet: kind KEY_FULL (keys: the far keys), or QUERY_PAIR (is_query: returns\n"
          "float32 [2, n_tokens, n_head, n_embd_head], the queries rotated at pos and the far queries).");
    m.def("rope_dpe_rows", &rope_dpe_rows, py::arg("cache"), py::arg("rows"), py::arg("pos"), py::arg("table"),
          py::kw_only(), py::arg("n_dims"), py::arg("mode"), py::arg("window"), py::arg("is_query") = false,
          py::arg("inverse") = true, py::arg("freq_base"), py::arg("cache_type") = "f16", py::arg("backend") = "cpu",
          py::arg("n_threads") = 2,
          "Run one GGML_OP_ROPE_DPE node that reads its rows from a cache (ggml_rope_dpe_ext with rows).\n"
          "cache: float32 [S, N, Hk, D] (stored as cache_type: f32 or f16), rows, pos: int32 [S, W]; returns\n"
          "float32 [S, W, Hk, D]: cell rows[s, j] of stream s rotated at pos[s, j] (default: kind KEY_INVERSE).");
    m.def("rope_dpe_key_write", &rope_dpe_key_write, py::arg("a"), py::arg("pos"), py::arg("table"), py::arg("cache"),
          py::arg("idx"), py::arg("store") = py::none(), py::arg("slot") = py::none(), py::kw_only(), py::arg("n_dims"),
          py::arg("mode"), py::arg("window"), py::arg("freq_base"), py::arg("attn_factor") = 1.0f,
          py::arg("cache_type") = "f16", py::arg("fused") = true, py::arg("backend") = "cpu", py::arg("n_threads") = 2,
          "Write the unrotated keys a (float32 [n_tokens, n_head_kv, d]) to cache rows idx (cache: float32\n"
          "[n_rows, n_head_kv*d], held as cache_type) and, with a store (float32 [n_stream, n_head_kv, n_slots, d]),\n"
          "their ordinary keys to slots slot (int64 [n_stream, n_tps]): one GGML_ROPE_DPE_KEY_WRITE node (fused) or\n"
          "the nodes it replaces. Returns (the cache as float32, the store).");
    m.def("dpe_near_scores", &dpe_near_scores, py::arg("kq"), py::arg("kq_near"), py::arg("idx"), py::arg("pos_win"),
          py::arg("pos_q"), py::kw_only(), py::arg("window"), py::arg("kw_slots") = 0, py::arg("n_kv") = -1,
          py::arg("backend") = "cpu",
          py::arg("n_threads") = 2,
          "Run one GGML_OP_DPE_NEAR_SCORES node (csrc/ggml-dpe.h) on a ggml backend.\n"
          "kq: float32 [n_stream, n_head, n_tps, n_kv], kq_near: float32 [n_stream, n_head, n_tps, n_win] (kw_slots = S > 0:\n"
          "[..., n_rows >= S], slot j's score in row idx[j] % S), idx, pos_win: int32 [n_stream, n_win],\n"
          "pos_q: int32 [n_stream*n_tps]; n_kv > kq's width: a wider result, kq's columns then zeros; returns the merged kq.");
    m.def("bench_attention", &bench_attention, py::kw_only(), py::arg("dpe"), py::arg("n_kv"), py::arg("n_tps"),
          py::arg("n_head"), py::arg("n_head_kv"), py::arg("d"), py::arg("window"), py::arg("kv_type") = "f16",
          py::arg("reps") = 10, py::arg("backend") = "cpu", py::arg("n_threads") = 2,
          "Seconds per compute (median of reps) of one stock (dpe=False) or DPE flash-attention node of this shape.");
    m.def("round_trip", &round_trip, py::arg("x"), py::arg("type"),
          "x (float32, rows along the last axis) converted to ggml type `type` (\"f16\", \"q8_0\", ...) and back.");
    m.def("dpe_flash_attn", &dpe_flash_attn, py::arg("q"), py::arg("q_far"), py::arg("k"), py::arg("v"), py::arg("mask"),
          py::arg("k_win"), py::arg("idx"), py::arg("pos_win"), py::arg("pos_q"), py::arg("sinks") = py::none(),
          py::kw_only(), py::arg("window"), py::arg("scale"), py::arg("max_bias") = 0.0f, py::arg("softcap") = 0.0f,
          py::arg("kv_type") = "f16", py::arg("backend") = "cpu", py::arg("n_threads") = 2, py::arg("stock") = false,
          py::arg("kw_slots") = 0,
          "Run one GGML_OP_DPE_FLASH_ATTN node (csrc/ggml-dpe.h) on a ggml backend.\n"
          "stock=True: stock's GGML_OP_FLASH_ATTN_EXT of q_far over k, v and mask instead (the window is ignored).\n"
          "kw_slots=S > 0: k_win is [S_, Hk, >= S, D], slot j's key in row idx[j] % S (a store).\n"
          "q, q_far: float32 [S, H, T, D]; k: [S, Hk, N, D] and v: [S, Hk, N, Dv] (float32, stored as kv_type);\n"
          "mask: float32 [S, T, N] (0 or -inf, stored as F16); k_win: float32 [S, Hk, W, D]; idx, pos_win: int32 [S, W];\n"
          "pos_q: int32 [S*T]; sinks: float32 [H] or None. Returns float32 [S, T, H, Dv].");
}
