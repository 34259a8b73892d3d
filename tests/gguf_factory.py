"""Tiny, structurally valid GGUF models with random weights, written by the tests themselves.

No tokenizer metadata: enough for reading, converting and comparing files, not for running them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
}

# Architectures with q/k/v biases (qwen2 family) get bias tensors.
_QKV_BIAS = {"qwen2", "qwen2moe", "qwen2vl", "qwen"}


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"unsupported metadata value for {key}: {value!r}")


def write_tiny_gguf(path: str | os.PathLike[str], arch: str = "llama", n_layer: int = 2, n_head: int = 4,
                    n_head_kv: int = 2, head_dim: int = 16, n_embd: int = 64, n_ff: int = 96,
                    n_vocab: int = 64, context_length: int = 512, qtype: str = "f32",
                    rope_type_override: str | None = None, extra_kv: dict[str, Any] | None = None,
                    seed: int = 0) -> Path:
    """Write a llama-shaped model of architecture ``arch`` to ``path`` and return the path.

    Matrices (attention, feed-forward, embeddings) use ``qtype``; norms and biases stay F32.
    ``rope_type_override='mrope'`` writes ``{arch}.rope.dimension_sections`` with two non-zero
    sections, which turns the architectures that support it (glm4, glm4moe, ...) into MROPE; the architectures
    whose rope is always multimodal need the key too (qwen2vl, and qwen3vl, which is IMROPE).
    ``extra_kv`` adds or replaces metadata keys (Python int >= 0 -> uint32, float -> float32, str,
    bool, list -> array); a value of None removes a key that would otherwise be written.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    qt = _QTYPES[qtype]
    kv: dict[str, Any] = {
        "general.name": f"tiny-{arch}",
        "general.file_type": 0 if qtype == "f32" else 1 if qtype == "f16" else 7,
        f"{arch}.context_length": context_length,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        "general.quantization_version": 2,
    }
    if rope_type_override == "mrope":
        kv[f"{arch}.rope.dimension_sections"] = [head_dim // 4, head_dim // 8, head_dim // 8, 0]
    elif rope_type_override is not None:
        raise ValueError(f"unsupported rope_type_override {rope_type_override!r} (only 'mrope')")
    kv.update(extra_kv or {})

    writer = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        if key == "general.alignment" and value is not None:
            writer.add_custom_alignment(int(value))  # also pads the data accordingly
        elif value is not None:
            _add_value(writer, key, value)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32) * 0.05
        if qt == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif qt == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qt), raw_dtype=qt)

    def vector(name: str, n: int, scale: float = 1.0, noise: float = 0.0) -> None:
        writer.add_tensor(name, (scale + noise * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", n_vocab, n_embd)
    for layer in range(n_layer):
        b = f"blk.{layer}"
        vector(f"{b}.attn_norm.weight", n_embd, noise=0.01)
        matrix(f"{b}.attn_q.weight", n_head * head_dim, n_embd)
        matrix(f"{b}.attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(f"{b}.attn_v.weight", n_head_kv * head_dim, n_embd)
        if arch in _QKV_BIAS:
            vector(f"{b}.attn_q.bias", n_head * head_dim, scale=0.0, noise=0.02)
            vector(f"{b}.attn_k.bias", n_head_kv * head_dim, scale=0.0, noise=0.02)
            vector(f"{b}.attn_v.bias", n_head_kv * head_dim, scale=0.0, noise=0.02)
        matrix(f"{b}.attn_output.weight", n_embd, n_head * head_dim)
        vector(f"{b}.ffn_norm.weight", n_embd, noise=0.01)
        matrix(f"{b}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"{b}.ffn_up.weight", n_ff, n_embd)
        matrix(f"{b}.ffn_down.weight", n_embd, n_ff)
    vector("output_norm.weight", n_embd, noise=0.01)
    matrix("output.weight", n_vocab, n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
