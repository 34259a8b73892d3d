// dpe-gguf: hooks from the patched llama.cpp into DPE (implemented in csrc/llama-dpe-engine.cpp).
// Each is called from exactly one place in patches/0004-llama-dpe-engine.patch.
#pragma once

#include "llama-dpe-hparams.h"

#include <cstdint>

struct ggml_context;
struct ggml_tensor;
struct llama_model_base;
struct llama_model_loader;
struct llama_ubatch;
struct llama_cparams;
struct llama_dpe_store;
struct llm_graph_context;
class llama_kv_cache_context;
class llm_graph_input_attn_kv;

// llama_model_base::load_hparams, at its end: read dpe.* keys (kv overrides apply), validate them.
void llama_dpe_load_hparams(llama_model_loader & ml, llama_model_base & model);

// llama_model_base::load_tensors, before done_getting_tensors: create rope_dpe.weight if present,
// validate it (integers >= 1) and leave DPE off when every divisor is 1 (DPE is then plain RoPE).
void llama_dpe_create_tensors(llama_model_loader & ml, llama_model_base & model);

// build_attn_inp_kv_impl: the DPE inputs (query positions, the window cells, the flash-attention mask).
void llama_dpe_build_inputs(ggml_context * ctx, const llama_kv_cache_context * mctx, const llama_ubatch & ubatch,
                            const llama_cparams & cparams, const llama_dpe_hparams & dpe, llm_graph_input_attn_kv * inp);

// llm_graph_input_attn_kv::set_input, after the stock mask is filled.
void llama_dpe_set_inputs(const llm_graph_input_attn_kv * inp, const llama_ubatch * ubatch);

// llm_graph_input_attn_kv::can_reuse: whether the graph built for an earlier ubatch reads the window's keys the
// way this ubatch needs (from the store, or rotated back from the cache); also plans the ubatch's window.
bool llama_dpe_can_reuse(llm_graph_input_attn_kv * inp, const llama_ubatch & ubatch);

// llama_kv_cache: cells of stream s (-1: every stream) were written outside the graph (a state load, a stream
// copy), so the store no longer holds their ordinary keys. store may be null (no DPE graph was built yet).
void llama_dpe_store_invalidate(llama_dpe_store * store, int s);

// llama_kv_cache::seq_rm, when it frees cells: forget the window keys the last graph rotated back into the store
// (llama_decode frees a failed or aborted ubatch's cells this way, and such a graph may not have written them all).
void llama_dpe_store_discard_pending(llama_dpe_store * store);

// llm_graph_context::build_attn (KV cache), first: when DPE is on, rotate k_cur to far keys (what the cache
// stores) and return the far queries; nullptr (q_cur, k_cur unchanged) when DPE is off for this graph. Where
// q_cur and k_cur are the model's own rope nodes, DPE's rotations replace them (q_cur becomes a view of the
// node that also holds the far queries), so each is rotated by one node, as in stock.
ggml_tensor * llama_dpe_build_qk(const llm_graph_context & g, const llm_graph_input_attn_kv * inp, int il,
                                 ggml_tensor *& q_cur, ggml_tensor *& k_cur);

// llm_graph_context::build_attn (KV cache), around cpy_k: whether k_cur (from llama_dpe_build_qk) is DPE's key
// node that wrote the new keys to the cache itself (ggml_rope_dpe_key_write), so that cpy_k is not built.
bool llama_dpe_wrote_k(const ggml_tensor * k_cur);

// llm_graph_context::build_attn (KV cache), in place of build_attn_mha when llama_dpe_build_qk returned far
// queries: one softmax over near scores (q against the window's keys) and far scores (q_far against the
// cache); k is the cache's far keys. Returns the attention output [n_embd_head_v*n_head, n_tokens].
ggml_tensor * llama_dpe_build_attn(const llm_graph_context & g, const llm_graph_input_attn_kv * inp, int il,
                                   ggml_tensor * q, ggml_tensor * q_far, ggml_tensor * k, ggml_tensor * v,
                                   ggml_tensor * kq_b, ggml_tensor * kq_mask, ggml_tensor * sinks, float kq_scale);
