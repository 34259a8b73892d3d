"""The patched loader on bad DPE metadata and tables (issue #16): each bad file is refused with a message
that names DPE (or the dpe.* key / rope_dpe.weight tensor at fault), never a crash or a hang; a value
that is legal, however odd, runs normally.

Every case is the tiny random llama of tests/tiny_models.py (trained context 256, 2 layers, 2 KV heads,
F = 8) converted with window 32, then one DPE key or the table rewritten by dpe_gguf.format.gguf_stream, and
run by llama-bench -v (a 48-token prompt, past the window, and 2 generated tokens). The loader's checks
are llama_dpe_load_hparams and llama_dpe_create_tensors (csrc/llama-dpe-engine.cpp) and llama.cpp's
own key and tensor checks.

Why llama-bench: the other programs log through common_log's worker thread, which a program exiting
early does not wait for, so the loader's error line was missing from 8 of 20 runs of llama-completion
(upstream; patches/0007 flushes llama-perplexity only). llama-bench -v logs with llama.cpp's own
synchronous logger. The two command-line cases (--dpe off, --dpe-window) need llama-completion, whose
error line is awaited over a few runs.
"""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from dpe_gguf import DPEParams, convert  # noqa: E402
from dpe_gguf.format.gguf_header import GGUFHeader  # noqa: E402
from dpe_gguf.format.gguf_stream import NewTensor, kv_string, kv_uint32, kv_uint32_array, write_gguf  # noqa: E402
from dpe_gguf.llama.native import NativeBuildMissing, tool_path  # noqa: E402
from tiny_models import write_tiny_gguf  # noqa: E402

TABLE = "rope_dpe.weight"
TRAINED = 256
WINDOW = 32
UINT32_MAX = 2**32 - 1

try:
    BENCH, COMPLETION = tool_path("llama-bench"), tool_path("llama-completion")
except NativeBuildMissing:
    BENCH = COMPLETION = None
pytestmark = pytest.mark.skipif(BENCH is None, reason="no native build (llama-bench, llama-completion)")


# ---------------------------------------------------------------- building the bad files

def record(key: str, vtype: int, payload: bytes) -> bytes:
    """One key/value record of any GGUF type (5 int32, 6 float32, 7 bool, 10 uint64, ...)."""
    name = key.encode()
    return struct.pack("<Q", len(name)) + name + struct.pack("<I", vtype) + payload


def table(value: float | None = None, at: tuple[int, int, int] = (1, 0, 3), dims=(8, 2, 2), ggml_type: int = 0,
          fill: float = 2.0) -> NewTensor:
    """A divisor table of ggml ``dims`` (default the model's), ``fill`` everywhere and ``value`` at
    (layer, KV head, frequency) ``at``, stored as F32 (0), F16 (1) or I32 (26)."""
    arr = np.full(tuple(reversed(dims)), fill, dtype=np.float32)
    if value is not None:
        arr[at] = value
    data = arr.astype({0: "<f4", 1: "<f2", 26: "<i4"}[ggml_type]).tobytes()
    return NewTensor(TABLE, tuple(dims), ggml_type, data)


KEEP = object()


def variant(base: Path, out: Path, kv: dict[str, bytes | None], new_table=KEEP) -> Path:
    """``base`` with the keys in ``kv`` replaced by the given records (None: removed) and its table
    replaced by ``new_table`` (None: removed)."""
    with GGUFHeader(base) as reader, open(out, "wb", buffering=0) as dst:
        write_gguf(reader, base, dst, drop_keys=set(kv), new_kv=[r for r in kv.values() if r is not None],
                   drop_tensors=set() if new_table is KEEP else {TABLE},
                   new_tensors=[new_table] if isinstance(new_table, NewTensor) else [])
    return out


@pytest.fixture(scope="module")
def dpe_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loader")
    plain = d / "tiny.gguf"
    write_tiny_gguf(plain, "llama")
    return convert(plain, d / "tiny.dpe.gguf", DPEParams(window=WINDOW, group_scales=(2, 4)), progress=False)


def bench(model: Path) -> subprocess.CompletedProcess:
    """One llama-bench run (48 prompt tokens, 2 generated), verbose; a hang fails the test after 120 s."""
    cmd = [str(BENCH), "-m", str(model), "-p", "48", "-n", "2", "-r", "1", "-t", "1", "-v", "-o", "csv"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def complete(model: Path, *extra: str, runs: int = 1) -> subprocess.CompletedProcess:
    """Two greedy tokens with llama-completion; a failed load is run again, up to ``runs`` times, until
    its error line reaches the log (see the module docstring)."""
    cmd = [str(COMPLETION), "-m", str(model), "-p", "hello there", "-n", "2", "-c", "128", "--temp", "0",
           "-no-cnv", "-t", "1", "--no-warmup", "-lv", "4", *extra]
    for _ in range(runs):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if res.returncode == 0 or "error loading model" in res.stderr:
            break
    return res


def load_error(res: subprocess.CompletedProcess) -> str:
    """The loader's error line (llama_model_load: error loading model: ...), after a clean exit 1
    (a negative code is a signal: the loader crashed)."""
    assert res.returncode == 1, f"exit {res.returncode}:\n{res.stderr[-3000:]}"
    lines = [line for line in res.stderr.splitlines() if "error loading model" in line]
    assert lines, f"exit {res.returncode} without a loader error:\n{res.stderr[-2000:]}"
    return lines[0]


def u32(key: str, value: int) -> dict[str, bytes]:
    return {key: kv_uint32(key, value)}


# ---------------------------------------------------------------- refused

REFUSED = {
    # the semantic cases
    "version-2": (u32("dpe.version", 2), KEEP, "DPE: unknown dpe.version 2; this build of dpe-gguf reads version 1 "
                                               "(update dpe-gguf, or re-convert the model with this version)"),
    "version-0": (u32("dpe.version", 0), KEEP, "DPE: unknown dpe.version 0"),
    "window-at-trained-context": (u32("dpe.window", TRAINED), KEEP,
                                  f"DPE: window {TRAINED} is not below the trained context {TRAINED}; "
                                  "choose a smaller window (--dpe-window)"),
    "window-past-trained-context": (u32("dpe.window", 1000), KEEP, "DPE: window 1000 is not below the trained"),
    "window-uint32-max": (u32("dpe.window", UINT32_MAX), KEEP, f"DPE: window {UINT32_MAX} is not below"),
    "divisor-nan": ({}, table(float("nan")), "nan at layer 1, KV head 0, frequency 3"),
    "divisor-zero": ({}, table(0.0), "DPE: rope_dpe.weight holds 0 at layer 1, KV head 0, frequency 3"),
    "divisor-negative": ({}, table(-4.0), "DPE: rope_dpe.weight holds -4 at layer 1, KV head 0, frequency 3"),
    "divisor-fraction": ({}, table(2.5), "DPE: rope_dpe.weight holds 2.5 at layer 1, KV head 0, frequency 3"),
    "divisor-below-one": ({}, table(0.5, at=(0, 1, 7)), "holds 0.5 at layer 0, KV head 1, frequency 7"),
    "divisor-infinite": ({}, table(float("inf")), "DPE: rope_dpe.weight holds inf at layer 1"),
    "divisor-huge": ({}, table(1e7), "DPE: rope_dpe.weight holds 1e+07 at layer 1"),
    "divisors-all-zero": ({}, table(fill=0.0), "DPE: rope_dpe.weight holds 0 at layer 0, KV head 0, frequency 0"),
    # tables of the wrong shape or type
    "table-one-layer-too-many": ({}, table(dims=(8, 2, 3)), "tensor 'rope_dpe.weight' has wrong shape"),
    "table-half-the-frequencies": ({}, table(dims=(4, 2, 2)), "tensor 'rope_dpe.weight' has wrong shape"),
    "table-2d": ({}, table(dims=(8, 4)), "tensor 'rope_dpe.weight' has wrong shape"),
    "table-f16": ({}, table(ggml_type=1), "DPE: rope_dpe.weight must be F32, not f16"),
    "table-i32": ({}, table(ggml_type=26), "DPE: rope_dpe.weight must be F32, not i32"),
    "table-missing": ({}, None, "tensor 'rope_dpe.weight' not found"),
    # keys missing or of the wrong type
    "window-missing": ({"dpe.window": None}, KEEP, "key not found in model: dpe.window"),
    "window-string": ({"dpe.window": kv_string("dpe.window", "32")}, KEEP,
                      "key dpe.window has wrong type str but expected type u32"),
    "window-int32": ({"dpe.window": record("dpe.window", 5, struct.pack("<i", 32))}, KEEP,
                     "key dpe.window has wrong type i32 but expected type u32"),
    "window-float": ({"dpe.window": record("dpe.window", 6, struct.pack("<f", 32.0))}, KEEP,
                     "key dpe.window has wrong type f32 but expected type u32"),
    "window-uint64": ({"dpe.window": record("dpe.window", 10, struct.pack("<Q", 32))}, KEEP,
                      "key dpe.window has wrong type u64 but expected type u32"),
    "window-array": ({"dpe.window": kv_uint32_array("dpe.window", [32])}, KEEP,
                     "key dpe.window has wrong type arr but expected type u32"),
    "version-string": ({"dpe.version": kv_string("dpe.version", "1")}, KEEP,
                       "key dpe.version has wrong type str but expected type u32"),
    "version-bool": ({"dpe.version": record("dpe.version", 7, b"\x01")}, KEEP,
                     "key dpe.version has wrong type bool but expected type u32"),
    "target-string": ({"dpe.target_context_length": kv_string("dpe.target_context_length", "1024")}, KEEP,
                      "key dpe.target_context_length has wrong type str but expected type u32"),
}


# A table of the right shape but not F32 used to abort the loader (SIGABRT in create_tensor's GGML_OP_ROPE
# placement probe, which asserts an F32 table) before the loader's own type check; the loader now checks the
# type first.
@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_dpe_metadata_is_refused_with_a_message(dpe_model, tmp_path, case):
    kv, new_table, expect = REFUSED[case]
    bad = variant(dpe_model, tmp_path / f"{case}.gguf", kv, new_table)
    before = bad.read_bytes()
    line = load_error(bench(bad))
    assert expect in line and "dpe" in line.lower(), line
    assert bad.read_bytes() == before


def test_a_window_override_at_the_trained_context_is_refused(dpe_model):
    line = load_error(complete(dpe_model, "--dpe-window", str(TRAINED), runs=10))
    assert (f"DPE: window {TRAINED} is not below the trained context {TRAINED}; "
            "choose a smaller window (--dpe-window)") in line


# ---------------------------------------------------------------- legal, however odd: runs normally

RUNS = {
    "window-0-is-dpe-off": (u32("dpe.window", 0), KEEP, "DPE parameters present, DPE off (dpe.window = 0)"),
    "window-0-skips-a-bad-table": (u32("dpe.window", 0), table(float("nan")), "DPE off (dpe.window = 0)"),
    "window-1": (u32("dpe.window", 1), KEEP, f"DPE on, window = 1, context 928 (trained {TRAINED})"),
    "window-below-trained": (u32("dpe.window", TRAINED - 1), KEEP, f"DPE on, window = {TRAINED - 1}"),
    "target-uint32-max": (u32("dpe.target_context_length", UINT32_MAX), KEEP,
                          f"DPE on, window = {WINDOW}, context {UINT32_MAX} (trained {TRAINED})"),
    "target-0": (u32("dpe.target_context_length", 0), KEEP, f"DPE on, window = {WINDOW}\n"),
    "target-below-trained": (u32("dpe.target_context_length", 100), KEEP, f"DPE on, window = {WINDOW}\n"),
    "target-missing": ({"dpe.target_context_length": None}, KEEP, f"DPE on, window = {WINDOW}\n"),
    "divisor-largest-legal": ({}, table(1e6), f"DPE on, window = {WINDOW}"),
    "divisors-all-one": ({}, table(fill=1.0), "DPE table is all ones (identical to plain RoPE)"),
    # keys only dpe-gguf reads: the loader ignores them (dpe-gguf inspect refuses the file)
    "group-scales-string": ({"dpe.group_scales": kv_string("dpe.group_scales", "2,4")}, KEEP,
                            f"DPE on, window = {WINDOW}"),
    "topk-float": ({"dpe.topk": record("dpe.topk", 6, struct.pack("<f", 8.0))}, KEEP, f"DPE on, window = {WINDOW}"),
    "original-context-missing": ({"dpe.original_context_length": None}, KEEP, f"DPE on, window = {WINDOW}"),
}


@pytest.mark.parametrize("case", list(RUNS))
def test_legal_dpe_metadata_runs_normally(dpe_model, tmp_path, case):
    kv, new_table, log = RUNS[case]
    res = bench(variant(dpe_model, tmp_path / f"{case}.gguf", kv, new_table))
    assert res.returncode == 0, f"exit {res.returncode}:\n{res.stderr[-3000:]}"
    assert log in res.stderr, res.stderr[-3000:]
    assert len(res.stdout.strip().splitlines()) == 3, res.stdout     # csv header, prompt row, generation row


def test_dpe_off_runs_a_file_with_a_bad_window(dpe_model, tmp_path):
    """The way out for a user with a bad file: --dpe off (dpe.window overridden to 0)."""
    res = complete(variant(dpe_model, tmp_path / "bad-window.gguf", u32("dpe.window", 1000)), "--dpe", "off")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DPE parameters present, DPE off (dpe.window = 0)" in res.stderr, res.stderr[-3000:]


def test_target_uint32_max_with_the_default_context_fails_cleanly(dpe_model, tmp_path):
    """-c 0 takes the context from the model, which DPE sets to dpe.target_context_length: 2^32 - 1 tokens
    is refused when the context is made (llama_init_from_model: n_ctx_seq == 0, the padded size wrapped
    around), not by the loader, so the message does not name DPE; what is checked is no crash."""
    model = variant(dpe_model, tmp_path / "huge-target.gguf", u32("dpe.target_context_length", UINT32_MAX))
    cmd = [str(COMPLETION), "-m", str(model), "-p", "hi", "-n", "2", "-c", "0", "-no-cnv", "-t", "1", "--no-warmup"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 1, f"exit {res.returncode}:\n{res.stderr[-3000:]}"


# ---------------------------------------------------------------- models DPE does not support

def with_dpe_keys(plain: Path, out: Path) -> Path:
    """``plain`` with dpe.version 1 and dpe.window 32 added: what the loader reads before its model checks
    (dpe-gguf convert refuses these models itself, so the file is written here)."""
    with GGUFHeader(plain) as reader, open(out, "wb", buffering=0) as dst:
        write_gguf(reader, plain, dst, drop_keys=set(),
                   new_kv=[kv_uint32("dpe.version", 1), kv_uint32("dpe.window", WINDOW)],
                   drop_tensors=set(), new_tensors=[])
    return out


# (architecture, factory options, the loader's message); gemma2 has sliding-window layers, glm4 with
# rope.dimension_sections is MROPE (multimodal rope), qwen3vl (which requires the sections) is IMROPE (interleaved
# multimodal rope). The fourth rope type DPE refuses, VISION, is no text architecture's at this pin (only
# mtmd's image encoders use it, which llama.cpp's model loader does not load).
UNSUPPORTED = {
    "sliding-window": ("gemma2", {}, "DPE: models with sliding-window attention layers are not supported yet; "
                                     "run the model without DPE (--dpe off)"),
    "multimodal-rope": ("glm4", {"rope_type_override": "mrope"},
                        "DPE: rope type 'mrope' is not supported (NORMAL and NEOX are); "
                        "run the model without DPE (--dpe off)"),
    "interleaved-multimodal-rope": ("qwen3vl", {"rope_type_override": "mrope"},
                                    "DPE: rope type 'imrope' is not supported (NORMAL and NEOX are); "
                                    "run the model without DPE (--dpe off)"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_models_are_refused_naming_dpe_off(tmp_path, case):
    from gguf_factory import write_tiny_gguf as write_factory_gguf

    arch, opts, expect = UNSUPPORTED[case]
    plain = write_factory_gguf(tmp_path / f"{arch}.gguf", arch, **opts)
    model = with_dpe_keys(plain, tmp_path / f"{arch}.dpe.gguf")
    line = load_error(bench(model))
    assert expect in line, line
