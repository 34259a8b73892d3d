"""Turn a RoPE GGUF into a DPE GGUF and back (docs/design.md section 5), and describe one.

``convert`` copies every tensor of the input as raw bytes (never dequantized) and every metadata key
(same order, type and value), then appends the ``dpe.*`` keys and the ``rope_dpe.weight`` table.
``strip`` removes them again: ``strip(convert(x))`` has the same keys, values and tensor bytes as
``x``. Both stream the tensor data, write to a temporary file in the destination folder and rename
it at the end, so an interrupted run leaves no partial output; the input is never modified.

Scores file (``scores=`` / ``--scores FILE``): a NumPy ``.npy`` file (``numpy.save``) holding one
real, finite contribution per (layer, KV head, frequency) (higher = more important), shape
``(n_layer, n_head_kv, F)`` with ``F = n_rot / 2`` and frequency ``f`` as in docs/design.md section 1.
Query-head scores of shape ``(n_layer, n_head, F)`` are accepted too and folded into their KV head
by summing each group of ``n_head / n_head_kv`` consecutive query heads (docs/design.md section 4).
With ``topk = K`` each (layer, KV head) keeps its K highest-scoring frequencies (ties: lower ``f``
wins); the other frequencies get divisor 1.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dpe_gguf.format import params as P
from dpe_gguf.errors import DPEError
from dpe_gguf.format.gguf_stream import (
    NewTensor,
    atomic_output,
    kv_string,
    kv_uint32,
    kv_uint32_array,
    plan_size,
    write_gguf,
)
from dpe_gguf.format.model_info import ModelInfo, has_dpe, open_reader, read_dpe

GGML_TYPE_F32 = 0

__all__ = ["check_output", "convert", "default_output", "default_strip_output", "inspect", "load_scores", "strip"]


def default_output(input: str | os.PathLike[str]) -> Path:
    """``model.gguf`` -> ``model.dpe.gguf``."""
    p = Path(input)
    stem = p.name.removesuffix(".gguf")
    return p.with_name(f"{stem}.dpe.gguf")


def default_strip_output(input: str | os.PathLike[str]) -> Path:
    """``model.dpe.gguf`` -> ``model.gguf``; anything else -> ``<name>.nodpe.gguf``."""
    p = Path(input)
    if p.name.endswith(".dpe.gguf") and len(p.name) > len(".dpe.gguf"):
        return p.with_name(p.name[:-len(".dpe.gguf")] + ".gguf")
    stem = p.name.removesuffix(".gguf")
    return p.with_name(f"{stem}.nodpe.gguf")


def load_scores(scores: Any, info: ModelInfo) -> np.ndarray:
    """Per-(layer, KV head, frequency) scores as float64 ``(n_layer, n_head_kv, F)`` from an array or
    a ``.npy`` path; query-head scores are folded into KV heads (see the module docstring)."""
    where = "scores"
    if isinstance(scores, (str, os.PathLike)):
        where = str(scores)
        path = Path(scores)
        if not path.is_file():
            raise DPEError(f"{where}: no such scores file")
        try:
            scores = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DPEError(f"{where}: not a NumPy .npy file ({e}); save scores with numpy.save") from None
        if not isinstance(scores, np.ndarray):
            raise DPEError(f"{where}: expected one array saved with numpy.save, got an .npz archive")
    arr = np.asarray(scores)
    if arr.dtype.kind not in "fiu":
        raise DPEError(f"{where}: scores must be real numbers, got dtype {arr.dtype}")
    kv_shape = info.table_shape
    q_shape = (info.n_layer, info.n_head, info.n_freq)
    if arr.shape == kv_shape:
        out = arr.astype(np.float64)
    elif arr.shape == q_shape:
        out = P.fold_query_heads(arr.astype(np.float64), info.n_head_kv)
    else:
        raise DPEError(f"{where}: scores have shape {arr.shape}; {info.path} needs (n_layer, n_head_kv, F) = "
                       f"{kv_shape} or query-head scores (n_layer, n_head, F) = {q_shape}")
    if not np.all(np.isfinite(out)):
        raise DPEError(f"{where}: scores contain NaN or infinite values")
    return out


def check_output(input: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
                 force: bool = False) -> Path:
    """What :func:`convert` would refuse about its input and output, checked before any slow work
    (calibration, selection): an input that is not a usable RoPE model or already has DPE parameters,
    an output that exists (without ``force``), is the input, or cannot be written. Returns the output
    path (default ``<name>.dpe.gguf``)."""
    inp = Path(input)
    out = Path(output) if output is not None else default_output(inp)
    reader = open_reader(inp)
    ModelInfo.from_reader(reader, inp, strict=True)
    _refuse_dpe_input(reader, inp, force)
    _check_output(inp, out, force)
    return out


def _refuse_dpe_input(reader: Any, inp: Path, force: bool) -> None:
    if has_dpe(reader) and not force:
        raise DPEError(f"{inp}: already has DPE parameters (dpe.* keys / {P.TENSOR_NAME}); pass --force to "
                       "replace them, or run `dpe-gguf strip` first")


def _check_output(inp: Path, out: Path, force: bool) -> None:
    if out.resolve() == inp.resolve() or (out.exists() and os.path.samefile(out, inp)):
        raise DPEError(f"{out}: output path is the input file; the input is never modified, choose another -o")
    if out.is_dir():
        raise DPEError(f"{out}: is a directory; give a file name with -o")
    if out.exists() and not force:
        raise DPEError(f"{out}: already exists; pass --force to overwrite it or choose another -o")
    folder = out.parent
    if not folder.is_dir():
        raise DPEError(f"{out}: destination folder {folder} does not exist; create it or choose another -o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DPEError(f"{out}: destination folder {folder} is not writable; choose another -o")


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None: no bar when stderr is not a terminal.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None,
                leave=False, dynamic_ncols=True)


def _rewrite(reader: Any, inp: Path, out: Path, new_kv: list[bytes], new_tensors: list[NewTensor],
             progress: bool) -> None:
    drop_tensors = {P.TENSOR_NAME}
    needed = plan_size(reader, set(), drop_tensors, new_tensors)
    total = sum(int(t.n_bytes) for t in reader.tensors if t.name not in drop_tensors)
    total += sum(len(t.data) for t in new_tensors)
    with atomic_output(out, needed) as dst:
        bar = _progress_bar(total, out.name, progress)
        try:
            write_gguf(reader, inp, dst, drop_key_prefix=P.KEY_PREFIX, drop_tensors=drop_tensors,
                       new_kv=new_kv, new_tensors=new_tensors, progress=bar)
        finally:
            if bar is not None:
                bar.close()


def convert(input: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
            params: P.DPEParams | None = None, scores: Any = None, force: bool = False,
            progress: bool = True) -> Path:
    """Write a DPE GGUF next to ``input`` (default ``<name>.dpe.gguf``) and return its path.

    ``scores`` (array or ``.npy`` path, see the module docstring) is required with ``params.topk``.
    ``force`` overwrites an existing output and replaces DPE parameters already in the input.
    Raises :class:`DPEError` for every bad input, before anything is written.
    """
    if params is None:
        raise TypeError("convert() needs params=DPEParams(...)")
    if not isinstance(params, P.DPEParams):
        raise DPEError(f"params must be a DPEParams, got {type(params).__name__}")
    inp = Path(input)
    out = Path(output) if output is not None else default_output(inp)
    reader = open_reader(inp)
    info = ModelInfo.from_reader(reader, inp, strict=True)
    _refuse_dpe_input(reader, inp, force)
    params.check_for_model(info.n_freq, info.context_length, str(inp))
    keep = None
    if params.topk is not None and scores is None:
        raise DPEError("topk (--topk) needs scores (--scores FILE: contributions per layer, KV head and frequency)")
    if scores is not None:
        if params.topk is None:
            raise DPEError("scores (--scores) need topk (--topk K: how many frequencies to scale per layer "
                           "and KV head)")
        keep = P.topk_mask(load_scores(scores, info), params.topk)
    _check_output(inp, out, force)

    table = P.divisor_table(info.n_layer, info.n_head_kv, info.n_freq, params.group_scales, keep)
    target = params.target_context or P.default_target_context(info.context_length, params.window,
                                                                params.group_scales)
    new_kv = [
        kv_uint32(P.KEY_VERSION, P.DPE_VERSION),
        kv_uint32(P.KEY_WINDOW, params.window),
        kv_uint32(P.KEY_ORIGINAL_CONTEXT, info.context_length),
        kv_uint32(P.KEY_TARGET_CONTEXT, target),
        kv_uint32_array(P.KEY_GROUP_SCALES, params.group_scales),
        kv_uint32(P.KEY_TOPK, params.topk if params.topk is not None else info.n_freq),
    ]
    if params.calibration is not None:
        new_kv.append(kv_string(P.KEY_CALIBRATION, params.calibration))
    tensor = NewTensor(P.TENSOR_NAME, (info.n_freq, info.n_head_kv, info.n_layer), GGML_TYPE_F32,
                       table.astype("<f4").tobytes())
    _rewrite(reader, inp, out, new_kv, [tensor], progress)
    return out


def strip(input: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, force: bool = False,
          progress: bool = True) -> Path:
    """Write a copy of ``input`` without the ``dpe.*`` keys and ``rope_dpe.weight`` (default output:
    ``model.dpe.gguf`` -> ``model.gguf``) and return its path."""
    inp = Path(input)
    out = Path(output) if output is not None else default_strip_output(inp)
    reader = open_reader(inp)
    if not has_dpe(reader):
        raise DPEError(f"{inp}: has no DPE parameters, nothing to strip")
    _check_output(inp, out, force)
    _rewrite(reader, inp, out, [], [], progress)
    return out


def inspect(path: str | os.PathLike[str], include_table: bool = False) -> dict[str, Any]:
    """A JSON-friendly description of a GGUF model and its DPE parameters (``"dpe": None`` if none).

    ``include_table`` adds the full divisor table (nested lists ``[layer][kv_head][f]``).
    """
    p = Path(path)
    reader = open_reader(p)
    info = ModelInfo.from_reader(reader, p, strict=False)
    result: dict[str, Any] = info.summary()
    result["file_size"] = p.stat().st_size
    result["gguf_version"] = reader.version
    result["n_tensors"] = len(reader.tensors)
    result["dpe_supported"] = info.rope_type in ("normal", "neox")
    dpe = read_dpe(reader)
    if dpe is None:
        result["dpe"] = None
        return result
    params, table = dpe
    if result["dpe_supported"] and table.shape != info.table_shape:
        raise DPEError(f"{p}: {P.TENSOR_NAME} has shape {list(reversed(table.shape))}, expected "
                       f"[F, n_head_kv, n_layer] = {list(reversed(info.table_shape))}; convert the original "
                       "model again")
    n_layer, n_head_kv, n_freq = table.shape
    groups = P.group_of(n_freq, params.n_groups)
    expected = np.asarray(params.group_scales, dtype=np.float32)[groups]
    scaled = table > 1
    result["dpe"] = {
        "version": P.DPE_VERSION,
        "window": params.window,
        "original_context_length": int(reader.fields[P.KEY_ORIGINAL_CONTEXT].contents()),
        "target_context_length": params.target_context,
        "group_scales": list(params.group_scales),
        "topk": params.topk if params.topk is not None else n_freq,
        "calibration": params.calibration,
        "groups": [{"group": g, "first_freq": int(np.flatnonzero(groups == g)[0]),
                    "last_freq": int(np.flatnonzero(groups == g)[-1]), "divisor": int(s)}
                   for g, s in enumerate(params.group_scales) if np.any(groups == g)],
        "table_shape": [n_freq, n_head_kv, n_layer],
        "table_matches_groups": bool(np.all((table == 1) | (table == expected))),
        "scaled_per_layer": scaled.sum(axis=2).tolist(),
        "scaled_fraction": float(scaled.mean()),
    }
    if include_table:
        result["dpe"]["table"] = table.astype(int).tolist()
    return result
