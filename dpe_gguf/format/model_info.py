"""What dpe-gguf needs to know about a GGUF model, read from its metadata.

The rope type follows llama.cpp's own mapping from architecture to rope type
(``llama_model_rope_type`` in ``src/llama-model.cpp`` of the pinned llama.cpp, the source vendored in
llama-cpp-python 0.3.36), and ``n_rot`` / head size follow its ``load_hparams``:
``head_dim = {arch}.attention.key_length`` (default ``n_embd / n_head``) and
``n_rot = {arch}.rope.dimension_count`` (default ``head_dim``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpe_gguf.format import params as P
from dpe_gguf.errors import DPEError
from dpe_gguf.format.gguf_header import GGUFHeader

# llama_model_rope_type(), pinned llama.cpp; architecture names from LLM_ARCH_NAMES (src/llama-arch.cpp).
_ROPE_NONE = frozenset("""
    arwkv7 bloom clip glm5-next gpt2 gptj jais jamba jina-bert-v2 kimi-k3 kimi-linear
    mamba mamba2 mpt nemotron_h nemotron_h_moe refact rwkv6 rwkv6qwen2 rwkv7 t5 t5encoder
    wavtokenizer-dec""".split())
_ROPE_NORM = frozenset("""
    arcee arctic baichuan bailingmoe chameleon chatglm cohere2 cohere2moe command-r deci
    deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 dots3note eagle3 ernie4_5 ernie4_5-moe
    glm-dsa granite granite_swa granitehybrid granitemoe graniteswitch hy_v4 internlm2 llada
    llama llama-embed llama4 maincoder minicpm mistral3 mistral4 muse-glimmer nanbeige neo-bert
    olmo plm pockettts smollm3 starcoder xverse""".split())
_ROPE_NEOX = frozenset("""
    afmoe apertus bailingmoe2 bert bitnet codeshell cogvlm dbrx dots1 dream eurobert exaone
    exaone-moe exaone4 falcon falcon-h1 gemma gemma-embedding gemma2 gemma3 gemma3n gemma4
    gemma4-assistant gpt-oss gptneox grok grovemoe hrm_text hunyuan-dense hunyuan-moe hy_v3
    jais2 jina-bert-v3 laguna lfm2 lfm2moe llada-moe maple mellum mimo2 minicpm3 minimax-01
    minimax-m2 minimax-m3 modern-bert nemotron nomic-bert nomic-bert-moe olmo2 olmoe openelm
    orion pangu-embedded phi2 phi3 phimoe plamo plamo2 plamo3 qwen qwen2 qwen2moe qwen3 qwen3moe
    qwen3next rnd1 seed_oss smallthinker spark2_5 stablelm starcoder2 step35 talkie""".split())
_ROPE_MROPE = frozenset("paddleocr qwen2vl".split())
_ROPE_IMROPE = frozenset("qwen35 qwen35moe qwen3tts qwen3vl qwen3vlmoe qwen4exp".split())
# MROPE when the file carries rope sections (use_mrope()), else the second value.
_ROPE_IF_NO_SECTIONS = {"bailingmoe3": "normal", "glm4": "normal", "glm4moe": "neox", "hunyuan_vl": "neox"}

SUPPORTED_ROPE_TYPES = ("normal", "neox")
LLAMA_MAX_LAYERS = 512          # src/llama-hparams.h of the pinned llama.cpp


def rope_type_for(arch: str, rope_sections: list[int] | None = None, hyper_connection_count: int = 0) -> str:
    """llama.cpp's rope type of ``arch``: 'normal', 'neox', 'mrope', 'imrope', 'none' or 'unknown'."""
    sections = list(rope_sections or []) + [0, 0, 0, 0]
    if arch in _ROPE_NONE:
        return "none"
    if arch in _ROPE_NORM:
        return "normal"
    if arch in _ROPE_NEOX:
        return "neox"
    if arch in _ROPE_MROPE:
        return "mrope"
    if arch in _ROPE_IMROPE:
        return "imrope"
    if arch in _ROPE_IF_NO_SECTIONS:
        return "mrope" if sections[0] > 0 and sections[1] > 0 else _ROPE_IF_NO_SECTIONS[arch]
    if arch == "dflash":
        if any(sections[:4]):
            return "mrope"
        return "normal" if hyper_connection_count > 0 else "neox"
    return "unknown"


def field_value(reader: Any, key: str) -> Any:
    """The value of metadata ``key`` as a Python scalar, str or list; None when absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


@dataclass(frozen=True)
class ModelInfo:
    """The model facts DPE depends on. ``rope_type`` is 'normal' or 'neox' for a usable model; with
    ``strict=False`` it can also be 'none', 'mrope', 'imrope' or 'unknown' (for ``inspect``)."""

    path: Path | None
    arch: str
    context_length: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim: int
    n_rot: int
    rope_type: str
    freq_base: float
    freq_scale: float
    rope_scaling_type: str | None
    has_rope_freqs: bool

    @property
    def n_freq(self) -> int:
        """``F = n_rot / 2``."""
        return self.n_rot // 2

    @property
    def table_shape(self) -> tuple[int, int, int]:
        """NumPy shape of the divisor table, ``(n_layer, n_head_kv, F)``."""
        return (self.n_layer, self.n_head_kv, self.n_freq)

    @classmethod
    def from_reader(cls, reader: Any, path: str | os.PathLike[str] | None = None, strict: bool = True) -> ModelInfo:
        """Read the model facts from an open ``gguf.GGUFReader`` or :class:`GGUFHeader`.

        With ``strict`` (the default) raise :class:`DPEError` unless the model is usable with DPE:
        a known architecture with NORMAL or NEOX rope, uniform head counts and an even ``n_rot``.
        """
        if path is None:
            path = getattr(reader, "path", None)
        where = str(path) if path is not None else "the model"
        arch = field_value(reader, "general.architecture")
        if arch is not None and not isinstance(arch, str):
            raise DPEError(f"{where}: general.architecture must be a string, got {_short(arch)}; the file is corrupt")
        if not arch:
            raise DPEError(f"{where}: no general.architecture key; is this a llama.cpp model file?")

        def get(key: str, default: Any = None) -> Any:
            value = field_value(reader, f"{arch}.{key}")
            return default if value is None else value

        def count(key: str, default: int) -> int:
            return _int_value(get(key, default), f"{arch}.{key}", where)

        def real(key: str, default: float) -> float:
            return _float_value(get(key, default), f"{arch}.{key}", where)

        sections = get("rope.dimension_sections", [])
        if not isinstance(sections, list) or not all(_is_int(v) for v in sections):
            sections = []
        rope_type = rope_type_for(arch, sections, count("hyper_connection.count", 0))
        if strict:
            _check_rope_type(where, arch, rope_type)

        n_layer = count("block_count", 0)
        n_embd = count("embedding_length", 0)
        n_head = _uniform_count(get("attention.head_count", 0), f"{arch}.attention.head_count", where)
        n_head_kv_raw = get("attention.head_count_kv")
        n_head_kv = n_head if n_head_kv_raw is None else _uniform_count(
            n_head_kv_raw, f"{arch}.attention.head_count_kv", where)
        head_dim = count("attention.key_length", n_embd // n_head if n_head else 0)
        n_rot = count("rope.dimension_count", head_dim)
        context_length = count("context_length", 0)
        freq_base = real("rope.freq_base", 10000.0)
        factor = real("rope.scaling.factor", real("rope.scale_linear", 0.0))
        freq_scale = 1.0 if factor == 0.0 else 1.0 / factor
        scaling_type = get("rope.scaling.type")
        has_rope_freqs = any(t.name == "rope_freqs.weight" or t.name.endswith(".rope_freqs.weight")
                             for t in reader.tensors)
        info = cls(path=Path(path) if path is not None else None, arch=arch, context_length=context_length,
                   n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_embd=n_embd, head_dim=head_dim,
                   n_rot=n_rot, rope_type=rope_type, freq_base=freq_base, freq_scale=freq_scale,
                   rope_scaling_type=str(scaling_type) if scaling_type is not None else None,
                   has_rope_freqs=has_rope_freqs)
        if strict:
            info._check_shapes(where, getattr(reader, "file_size", None))
        return info

    def _check_shapes(self, where: str, file_size: int | None = None) -> None:
        """Refuse counts no usable model has. A corrupt count is caught here, before convert allocates a
        divisor table from it: ``block_count`` past llama.cpp's limit, or counts whose table would be
        larger than the file (a real model's K projection alone outweighs its table many times)."""
        arch = self.arch
        if self.context_length <= 0:
            raise DPEError(f"{where}: missing or zero {arch}.context_length; DPE needs the trained context")
        if self.n_layer <= 0:
            raise DPEError(f"{where}: missing or zero {arch}.block_count")
        if self.n_head <= 0 or self.n_head_kv <= 0:
            raise DPEError(f"{where}: missing or zero attention head counts")
        if self.n_head % self.n_head_kv:
            raise DPEError(f"{where}: {self.n_head} query heads are not a multiple of {self.n_head_kv} KV heads")
        if self.n_rot <= 0 or self.n_rot % 2 or (self.head_dim and self.n_rot > self.head_dim):
            raise DPEError(f"{where}: invalid rotary dimension count n_rot = {self.n_rot} "
                           f"(head size {self.head_dim}); it must be even and positive")
        if self.n_layer > LLAMA_MAX_LAYERS:
            raise DPEError(f"{where}: {arch}.block_count is {self.n_layer}, more than the {LLAMA_MAX_LAYERS} layers "
                           "llama.cpp loads; the file is corrupt")
        table_bytes = 4 * self.n_layer * self.n_head_kv * self.n_freq
        if file_size is not None and table_bytes > file_size:
            raise DPEError(f"{where}: {self.n_layer} layers x {self.n_head_kv} KV heads x {self.n_freq} frequencies "
                           f"would need a divisor table of {table_bytes} bytes, more than the whole file "
                           f"({file_size} bytes); these counts are corrupt")

    def summary(self) -> dict[str, Any]:
        """The facts as a JSON-friendly dict."""
        return {
            "file": str(self.path) if self.path is not None else None,
            "architecture": self.arch,
            "context_length": self.context_length,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_head_kv": self.n_head_kv,
            "n_embd": self.n_embd,
            "head_dim": self.head_dim,
            "n_rot": self.n_rot,
            "n_freq": self.n_freq,
            "rope_type": self.rope_type,
            "freq_base": self.freq_base,
            "freq_scale": self.freq_scale,
            "rope_scaling_type": self.rope_scaling_type,
            "has_rope_freqs": self.has_rope_freqs,
        }


def _check_rope_type(where: str, arch: str, rope_type: str) -> None:
    if rope_type in SUPPORTED_ROPE_TYPES:
        return
    if rope_type == "none":
        if arch == "clip":
            raise DPEError(f"{where}: this is a vision projector (arch 'clip', vision rope), not a language "
                           "model; convert the text model file instead")
        raise DPEError(f"{where}: architecture '{arch}' does not use RoPE, so DPE does not apply")
    if rope_type in ("mrope", "imrope"):
        raise DPEError(f"{where}: architecture '{arch}' uses multimodal rope ({rope_type.upper()}); "
                       "DPE supports only NORMAL and NEOX rope (text models such as llama, qwen2, gemma)")
    raise DPEError(f"{where}: architecture '{arch}' is unknown to the pinned llama.cpp, so its rope type "
                   "(NORMAL or NEOX) cannot be told; DPE cannot convert it")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_value(value: Any, key: str, where: str) -> int:
    """A count or length: an integer of any GGUF integer type. Anything else (a float, a string, an
    array, a bool) is refused: llama.cpp refuses it too, and int() of NaN or of a string would escape
    as ValueError."""
    if not _is_int(value):
        raise DPEError(f"{where}: {key} must be an integer, got {_short(value)}; the file is corrupt")
    return value


def _float_value(value: Any, key: str, where: str) -> float:
    """A real-valued parameter (rope base, scaling factor): an integer or float value."""
    if not (_is_int(value) or isinstance(value, float)):
        raise DPEError(f"{where}: {key} must be a number, got {_short(value)}; the file is corrupt")
    return float(value)


def _uniform_count(value: Any, key: str, where: str) -> int:
    """A head count that may be stored per layer; layers with 0 (recurrent layers) are ignored."""
    if isinstance(value, list):
        nonzero = sorted({_int_value(v, key, where) for v in value if v != 0})
        if len(nonzero) > 1:
            raise DPEError(f"{where}: {key} differs between layers ({nonzero}); DPE tables need one head count")
        return nonzero[0] if nonzero else 0
    return _int_value(value, key, where)


def open_reader(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header of the GGUF file at ``path`` (see :mod:`dpe_gguf.format.gguf_header`), turning every way
    a file can be broken into a :class:`DPEError` that names it. The result offers the subset of
    ``gguf.GGUFReader`` used here (``fields[key].contents()``, ``tensors``)."""
    path = Path(path)
    if not path.exists():
        raise DPEError(f"{path}: no such file")
    if not path.is_file():
        raise DPEError(f"{path}: not a regular file")
    return GGUFHeader(path)


def read_model_info(path: str | os.PathLike[str], strict: bool = True) -> ModelInfo:
    """:class:`ModelInfo` of the GGUF file at ``path`` (see :meth:`ModelInfo.from_reader`)."""
    return ModelInfo.from_reader(open_reader(path), path=path, strict=strict)


def has_dpe(reader: Any) -> bool:
    """True if the file carries any ``dpe.*`` key or the ``rope_dpe.weight`` tensor."""
    return (any(k.startswith(P.KEY_PREFIX) for k in reader.fields)
            or any(t.name == P.TENSOR_NAME for t in reader.tensors))


def read_dpe(path_or_reader: Any) -> tuple[P.DPEParams, np.ndarray] | None:
    """The DPE parameters and divisor table stored in a GGUF file, or None if it has none.

    The table is float32 of NumPy shape ``(n_layer, n_head_kv, F)``. Raises :class:`DPEError` if the
    DPE metadata is incomplete or malformed.
    """
    if isinstance(path_or_reader, (str, os.PathLike)):
        where = str(path_or_reader)
        reader = open_reader(path_or_reader)
    else:
        reader = path_or_reader
        where = str(getattr(reader, "path", None) or "the model")
    if not has_dpe(reader):
        return None
    fix = "convert the original model again (dpe-gguf convert --force)"

    def uint(key: str) -> int:
        field = reader.fields.get(key)
        if field is None:
            raise DPEError(f"{where}: incomplete DPE metadata, missing {key}; {fix}")
        value = field.contents()
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DPEError(f"{where}: {key} must be an unsigned integer, got {value!r}; {fix}")
        return value

    version = uint(P.KEY_VERSION)
    if version != P.DPE_VERSION:
        raise DPEError(f"{where}: DPE format version {version} is not supported (this dpe-gguf reads "
                       f"version {P.DPE_VERSION}); update dpe-gguf")
    scales_field = reader.fields.get(P.KEY_GROUP_SCALES)
    if scales_field is None:
        raise DPEError(f"{where}: incomplete DPE metadata, missing {P.KEY_GROUP_SCALES}; {fix}")
    scales = scales_field.contents()
    if not isinstance(scales, list) or not all(isinstance(s, int) for s in scales):
        raise DPEError(f"{where}: {P.KEY_GROUP_SCALES} must be an array of integers; {fix}")
    calibration = field_value(reader, P.KEY_CALIBRATION)
    tensors = [t for t in reader.tensors if t.name == P.TENSOR_NAME]
    if not tensors:
        raise DPEError(f"{where}: has dpe.* keys but no {P.TENSOR_NAME} tensor; {fix}")
    tensor = tensors[0]
    if int(tensor.tensor_type) != 0 or len(tensor.shape) != 3:  # 0 = GGML_TYPE_F32
        raise DPEError(f"{where}: {P.TENSOR_NAME} must be a 3-D F32 tensor [F, n_head_kv, n_layer]; {fix}")
    raw = reader.tensor_bytes(tensor) if isinstance(reader, GGUFHeader) else np.asarray(tensor.data).tobytes()
    shape = tuple(int(d) for d in reversed(tensor.shape))
    table = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    if not np.all(np.isfinite(table)) or np.any(table < 1) or np.any(table != np.floor(table)):
        raise DPEError(f"{where}: {P.TENSOR_NAME} must hold integer divisors >= 1; {fix}")
    topk = uint(P.KEY_TOPK)
    try:
        params = P.DPEParams(window=uint(P.KEY_WINDOW), group_scales=tuple(scales),
                             topk=None if topk == table.shape[2] else topk,
                             target_context=uint(P.KEY_TARGET_CONTEXT),
                             calibration=calibration if isinstance(calibration, str) else None)
    except DPEError as e:
        raise DPEError(f"{where}: invalid DPE metadata: {e}; {fix}") from None
    uint(P.KEY_ORIGINAL_CONTEXT)
    return params, table
