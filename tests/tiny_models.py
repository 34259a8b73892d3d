"""Tiny random GGUF models that both transformers (gguf_file=...) and llama.cpp can load.

`make_tiny_hf_model(arch)` builds a seeded random transformers model; `export_gguf(model, path)`
writes it the way llama.cpp's convert_hf_to_gguf.py would: llama.cpp's metadata keys, its tensor
names, the Q/K row permutation of llama (NORMAL rope), and a small byte-level "gpt2" BPE vocabulary
(256 byte tokens, a few merges, 3 control tokens). `write_tiny_gguf(path, arch)` does both.

Architectures: "llama" (NORMAL rope), "qwen2" (NEOX rope, q/k/v biases) and "mistral" (stored
as GGUF architecture "llama", as llama.cpp does; transformers tells it apart by the name).
"""
from __future__ import annotations

import numpy as np
import torch

VOCAB_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "i n", "e r", "a n", "Ġ a", "o n", "r e", "Ġ s", "e n", "Ġt h", "Ġth e",
          "i s", "a t", "o r", "e s", "Ġ w", "Ġ c", "l l", "i t", "e d", "Ġ o", "Ġ b", "o u",
          "a r", "Ġ f", "n d", "Ġ p", "in g", "Ġ m", "Ġ i", "Ġ g", "l e", "Ġa n", "Ġan d", "Ġ is"]

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
            rope_theta=10000.0)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): bytes, then one token per merge, then control tokens."""
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in MERGES]
    types = [1] * len(tokens) + [3] * len(VOCAB_SPECIALS)   # 1 normal, 3 control
    return tokens + VOCAB_SPECIALS, types, MERGES


def make_tiny_hf_model(arch: str = "llama", seed: int = 0, weight_std: float = 0.15, **sizes):
    """A seeded random transformers model of `arch` with the tiny sizes above (float32); `sizes`
    overrides entries of TINY (e.g. head_dim=32 for block-quantized KV caches)."""
    import transformers

    n_vocab = len(tiny_vocab()[0])
    kind = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_cls, model_cls = kind[arch]
    eos = n_vocab - len(VOCAB_SPECIALS)
    config = config_cls(vocab_size=n_vocab, tie_word_embeddings=False, bos_token_id=eos,
                        eos_token_id=eos, **{**TINY, **sizes})
    torch.manual_seed(seed)
    model = model_cls(config).eval().to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(weight_std * torch.randn(p.shape, generator=g))
    return model


def rope_base(config) -> float:
    """rope_theta of a transformers config (5.x keeps it in rope_parameters, 4.x on the config)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF rotate_half rows -> NORMAL pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(model, path, qtype: str = "F32", name: str | None = None, *, dpe=None,
                rope_freqs: np.ndarray | None = None, rope_scaling: tuple[str, float] | None = None) -> None:
    """Write a transformers llama/qwen2/mistral model as a GGUF file, as llama.cpp's converter does.

    qtype: "F32", or "Q8_0" for every 2-D weight (norms and biases stay F32).
    dpe: optional (table, window, group_scales): also write the DPE keys and `rope_dpe.weight`
    of docs/design.md section 5 (table: float32 (n_layer, n_head_kv, F)).
    rope_freqs: optional per-frequency factors (tensor `rope_freqs.weight`);
    rope_scaling: optional (type, factor) written as rope.scaling.type / rope.scaling.factor.
    (transformers ignores these two; llama.cpp and the DPE reference honour them.)
    """
    import gguf

    cfg = model.config
    hf_arch = cfg.model_type
    arch = "qwen2" if hf_arch == "qwen2" else "llama"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or f"tiny-{hf_arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope_base(cfg))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, types, merges = tiny_vocab()
    assert len(tokens) == cfg.vocab_size
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_add_bos_token(False)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        writer.add_rope_scaling_factor(rope_scaling[1])
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    if dpe is not None:
        table, window, scales = dpe
        table = np.ascontiguousarray(table, dtype=np.float32)
        writer.add_uint32("dpe.version", 1)
        writer.add_uint32("dpe.window", window)
        writer.add_uint32("dpe.original_context_length", cfg.max_position_embeddings)
        writer.add_uint32("dpe.target_context_length", 4 * cfg.max_position_embeddings)
        writer.add_key_value("dpe.group_scales", [int(x) for x in scales], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.UINT32)
        writer.add_uint32("dpe.topk", table.shape[-1])
        writer.add_tensor("rope_dpe.weight", table)   # ggml shape [F, n_head_kv, n_layer]

    rename = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf_name, p in model.state_dict().items():
        w = p.detach().to(torch.float32).numpy().copy()
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{rename[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                n = cfg.num_attention_heads if module == "self_attn.q_proj" else cfg.num_key_value_heads
                w = permute_qk(w, n)
        if qtype == "Q8_0" and w.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif qtype in ("F32", "Q8_0"):
            writer.add_tensor(name, w)
        else:
            raise ValueError(f"qtype {qtype!r}: expected 'F32' or 'Q8_0'")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_gguf(path, arch: str = "llama", qtype: str = "F32", seed: int = 0, **sizes):
    """Write a tiny random GGUF model of `arch` to `path`; returns the transformers model it came from."""
    model = make_tiny_hf_model(arch, seed, **sizes)
    export_gguf(model, path, qtype)
    return model


def load_hf_from_gguf(path, dtype=torch.float64):
    """The GGUF file loaded by transformers itself (weights dequantized), eager attention.

    transformers 5.x keeps GGUF weights packed unless told to dequantize, and needs accelerate.
    """
    import inspect
    import os

    import transformers

    kw = {}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None and "dequantize" in inspect.signature(gguf_config).parameters:
        kw["quantization_config"] = gguf_config(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), dtype=dtype,
        attn_implementation="eager", **kw).eval()
