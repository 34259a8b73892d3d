// dpe_gguf._native: what the Python package needs to know about its native build.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include "dpe-build-info.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "ggml-dpe.h"

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

static py::array_t<float> rope_dpe(
        py::array a_in, py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos,
        py::array_t<float, py::array::c_style | py::array::forcecast> table,
        int n_dims, int mode, int window, bool is_query, bool inverse, float freq_base, float freq_scale, float ext_factor,
        float beta_fast, float beta_slow, int n_ctx_orig, py::object freq_factors_in, const std::string & backend_name,
        int n_threads) {
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
    if (inverse && is_query) {
        throw py::value_error("inverse rotates far keys back: it needs is_query=False");
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
    ggml_tensor * t_out   = ggml_rope_dpe(ctx.get(), t_a, t_pos, t_table, t_ff, n_dims, mode, n_ctx_orig, freq_base,
                                          freq_scale, ext_factor, beta_fast, beta_slow, window,
                                          inverse ? GGML_ROPE_DPE_KEY_INVERSE : is_query ? GGML_ROPE_DPE_QUERY : GGML_ROPE_DPE_KEY);
    ggml_cgraph * gf = ggml_new_graph(ctx.get());
    ggml_build_forward_expand(gf, t_out);

    if (!ggml_backend_supports_op(backend.get(), t_out)) {
        throw std::runtime_error("ggml backend \"" + backend_name + "\" does not support this ROPE_DPE node");
    }
    ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors(ctx.get(), backend.get()));
    if (!buf) {
        throw std::runtime_error("rope_dpe: could not allocate the tensors on \"" + backend_name + "\"");
    }
    ggml_backend_tensor_set(t_base, a.data(), 0, span);
    ggml_backend_tensor_set(t_pos, pos.data(), 0, ggml_nbytes(t_pos));
    ggml_backend_tensor_set(t_table, table.data(), 0, ggml_nbytes(t_table));
    if (t_ff) {
        ggml_backend_tensor_set(t_ff, freq_factors.data(), 0, ggml_nbytes(t_ff));
    }

    py::array_t<float> out({n_tokens, n_head, n_embd_head});
    compute_into(backend.get(), gf, t_out, out, "rope_dpe", backend_name);
    return out;
}

// -- dpe_near_scores: one GGML_OP_DPE_NEAR_SCORES node (for tests) ---------------------------------

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

static py::array_t<float> dpe_near_scores(f32_array kq, f32_array kq_near, i32_array idx, i32_array pos_win,
                                          i32_array pos_q, int window, const std::string & backend_name, int n_threads) {
    if (kq.ndim() != 4 || kq_near.ndim() != 4 || idx.ndim() != 2 || pos_win.ndim() != 2 || pos_q.ndim() != 1) {
        throw py::value_error("kq, kq_near: 4-d; idx, pos_win: 2-d; pos_q: 1-d");
    }
    const int64_t n_stream = kq.shape(0), n_head = kq.shape(1), n_tps = kq.shape(2), n_kv = kq.shape(3);
    const int64_t n_win = kq_near.shape(3);
    if (kq_near.shape(0) != n_stream || kq_near.shape(1) != n_head || kq_near.shape(2) != n_tps ||
        idx.shape(0) != n_stream || idx.shape(1) != n_win || pos_win.shape(0) != n_stream || pos_win.shape(1) != n_win ||
        pos_q.shape(0) != n_stream*n_tps) {
        throw py::value_error("shapes: kq [S, H, T, n_kv], kq_near [S, H, T, n_win], idx/pos_win [S, n_win], pos_q [S*T]");
    }
    ggml_backend_ptr backend = dpe_backend_init(backend_name, n_threads);
    ggml_init_params params = { ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, /*no_alloc*/ true };
    ggml_context_ptr ctx(ggml_init(params));
    ggml_tensor * t_kq   = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, n_kv, n_tps, n_head, n_stream);
    ggml_tensor * t_near = ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, n_win, n_tps, n_head, n_stream);
    ggml_tensor * t_idx  = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, n_win, n_stream);
    ggml_tensor * t_pw   = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_I32, n_win, n_stream);
    ggml_tensor * t_pq   = ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n_stream*n_tps);
    ggml_tensor * t_out  = ggml_dpe_near_scores(ctx.get(), t_kq, t_near, t_idx, t_pw, t_pq, window);
    ggml_cgraph * gf = ggml_new_graph(ctx.get());
    ggml_build_forward_expand(gf, t_out);
    if (!ggml_backend_supports_op(backend.get(), t_out)) {
        throw std::runtime_error("ggml backend \"" + backend_name + "\" does not support this DPE_NEAR_SCORES node");
    }
    ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors(ctx.get(), backend.get()));
    if (!buf) {
        throw std::runtime_error("dpe_near_scores: could not allocate the tensors on \"" + backend_name + "\"");
    }
    ggml_backend_tensor_set(t_kq, kq.data(), 0, ggml_nbytes(t_kq));
    ggml_backend_tensor_set(t_near, kq_near.data(), 0, ggml_nbytes(t_near));
    ggml_backend_tensor_set(t_idx, idx.data(), 0, ggml_nbytes(t_idx));
    ggml_backend_tensor_set(t_pw, pos_win.data(), 0, ggml_nbytes(t_pw));
    ggml_backend_tensor_set(t_pq, pos_q.data(), 0, ggml_nbytes(t_pq));
    py::array_t<float> out({n_stream, n_head, n_tps, n_kv});
    compute_into(backend.get(), gf, t_out, out, "dpe_near_scores", backend_name);
    return out;
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
          py::arg("freq_base"),
          py::arg("freq_scale") = 1.0f, py::arg("ext_factor") = 0.0f, py::arg("beta_fast") = 32.0f,
          py::arg("beta_slow") = 1.0f, py::arg("n_ctx_orig") = 0, py::arg("freq_factors") = py::none(),
          py::arg("backend") = "cpu", py::arg("n_threads") = 2,
          "Run one GGML_OP_ROPE_DPE node (csrc/ggml-dpe.h) on a ggml backend (\"cpu\" or \"cuda\").\n"
          "a: float32 [n_tokens, n_head, n_embd_head] (strided views are passed as ggml views), pos: int32 [n_tokens],\n"
          "table: float32 [n_head_kv, n_dims/2]; returns float32 [n_tokens, n_head, n_embd_head].\n"
          "inverse=True: far keys back to the keys rotated at pos (kind KEY_INVERSE).");
    m.def("dpe_near_scores", &dpe_near_scores, py::arg("kq"), py::arg("kq_near"), py::arg("idx"), py::arg("pos_win"),
          py::arg("pos_q"), py::kw_only(), py::arg("window"), py::arg("backend") = "cpu", py::arg("n_threads") = 2,
          "Run one GGML_OP_DPE_NEAR_SCORES node (csrc/ggml-dpe.h) on a ggml backend.\n"
          "kq: float32 [n_stream, n_head, n_tps, n_kv], kq_near: float32 [n_stream, n_head, n_tps, n_win],\n"
          "idx, pos_win: int32 [n_stream, n_win], pos_q: int32 [n_stream*n_tps]; returns the merged kq.");
}
