"""Automatic calibration: selection + detection through the patched llama.cpp, on tiny models (CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import dpe_gguf  # noqa: F401
from dpe_gguf.calibration import calibrate as C, choose, report, result, scoring, settings as S, stats, sweep
from dpe_gguf.errors import DPEError
from dpe_gguf.cli import main
from dpe_gguf.format.model_info import read_dpe
from dpe_gguf.format.params import divisor_table, topk_mask
from tiny_models import write_tiny_gguf

TARGET, WINDOW = 2048, 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "tiny.gguf"
    write_tiny_gguf(path, "llama", max_position_embeddings=1024)
    return path


def run(tiny, cache, monkeypatch, **kw):
    monkeypatch.setenv("DPE_GGUF_CACHE", str(cache))
    args = dict(window=WINDOW, quick=True, trials=1, ngl=0, quiet=True, sel_samples=2, sel_tokens=256, n_groups=4)
    return C.calibrate(tiny, TARGET, **{**args, **kw})


def test_settings_resolve_for_the_model_and_record_the_files_settings(monkeypatch):
    """One settings object: the model's defaults filled in and checked, and the calibration file's "settings"
    with the keys files written before it have (the score cache is keyed by them too)."""
    monkeypatch.setattr("dpe_gguf.llama.runtime.build_info", lambda: {"cuda": False})
    s = S.CalibrationSettings(target=32768, quick=True, task="passkey, multi_needle,passkey").resolved(8192, 32)
    assert (s.window, s.topk, s.trials, s.task, s.ngl) == (1024, 24, 2, "passkey,multi_needle", 0)
    assert S.CalibrationSettings(target=32768).resolved(8192, 32).trials == 5
    assert list(s.record()) == ["target", "window", "topk", "n_groups", "text", "sel_samples", "sel_tokens", "task",
                                "trials", "seed", "quick", "select", "scorer", "background"]
    assert s.record()["select"] is True and s.record(given_scores=True)["select"] == "given scores"
    for bad, match in ((dict(window=8192), "window 8192 is not below the trained context 8192"),
                       (dict(target=8192), "nothing to extend"), (dict(background="x"), "background 'x'"),
                       (dict(scorer="x"), "scorer 'x'"), (dict(task="ppl"), "detection task 'ppl'")):
        with pytest.raises(DPEError, match=match):
            S.CalibrationSettings(**{"target": 32768, **bad}).resolved(8192, 32)


def test_candidates_and_background_divisor():
    s = S.CalibrationSettings(target=32768, window=1024)
    assert S.background_divisor(32768, 8192) == 8
    assert s.candidates(8192) == [1, 2, 4, 8, 16, 32]          # T/len for len = T .. w
    assert S.CalibrationSettings(target=32768, window=1024, quick=True).candidates(8192) == [4, 8, 16]
    assert S.background_divisor(65536, 8192) == 16


def test_ties_keep_the_background_divisor():
    assert stats.pick({4: 0.5, 8: 0.5, 16: 0.5}, 8) == 8          # no signal: the prior 2T/L
    assert stats.pick({1: 0.0, 2: 0.4, 4: 0.4, 32: 0.4}, 8) == 4  # nearest 8 among the best
    assert stats.pick({2: 0.5, 16: 0.5}, 4) == 2                   # equally near: the smaller
    assert stats.pick({4: 0.2, 8: 0.5, 16: 1.0}, 8) == 16         # a clear winner wins


def test_differences_inside_the_prompts_noise_are_ties():
    # per-prompt scores of three candidates on the same 4 prompts
    noisy = {4: [-0.50, -0.70, -0.40, -0.60], 8: [-0.55, -0.62, -0.48, -0.58], 16: [-0.45, -0.66, -0.42, -0.61]}
    assert stats.pick(noisy, 8) == 8            # 16 has the best mean, but not by more than the noise
    assert stats.as_good(noisy[16], noisy[8]) and stats.as_good(noisy[16], noisy[4])
    clear = {4: [-1.5, -1.7, -1.4, -1.6], 8: [-0.55, -0.62, -0.48, -0.58], 16: [-0.35, -0.42, -0.28, -0.38]}
    assert stats.pick(clear, 8) == 16           # better on every prompt by 0.2: moved off the background
    assert not stats.as_good(clear[16], clear[8])
    # one prompt: only an exact tie is a tie; a constant difference has no noise
    assert not stats.as_good([-0.5], [-0.51]) and stats.as_good([-0.5], [-0.5])
    assert not stats.as_good([-0.5, -0.6], [-0.51, -0.61])


def test_several_tasks_are_tested_apart():
    """Two tasks' prompts (4 each, in turn): a clear gain on the quiet task is not hidden by the noisy
    task's spread, and a gain on one task bought with a loss on the other does not move the group."""
    quiet8, noisy8 = [-0.40, -0.35, -0.45, -0.38], [-1.0, -0.2, -2.0, -0.6]
    gain = {8: quiet8 + noisy8,
            16: [v + 0.05 for v in quiet8] + [-0.9, -0.35, -1.9, -0.7]}   # task 2: +0.1, -0.15, +0.1, -0.1
    assert stats.pick(gain, 8) == 8                       # pooled, the noisy task hides the gain
    assert stats.undominated(gain, 2) == [16] and stats.pick(gain, 8, parts=2) == 16
    trade = {8: quiet8 + noisy8, 16: [v + 0.05 for v in quiet8] + [v - 0.1 for v in noisy8]}
    assert stats.undominated(trade, 2) == [8, 16] and stats.pick(trade, 8, parts=2) == 8
    assert stats.pick(trade, 16, parts=2) == 16           # neither beats the other: the background stays
    with pytest.raises(ValueError, match="do not split"):
        stats.pick({8: [0.1, 0.2, 0.3]}, 8, parts=2)


def test_same_model_settings_and_seed_give_the_same_calibration(tiny, tmp_path, monkeypatch):
    a = run(tiny, tmp_path / "a", monkeypatch)
    b = run(tiny, tmp_path / "b", monkeypatch)   # a separate cache: measured again
    assert a.group_scales == b.group_scales
    assert a.detection == b.detection and len(a.detection) == 4
    assert np.array_equal(a.score_array(), b.score_array())
    assert a.score_array().shape == (2, 2, 8) and np.all(a.score_array() > 0)
    c = run(tiny, tmp_path / "c", monkeypatch, seed=1)        # another seed: other selection text
    assert not np.array_equal(a.score_array(), c.score_array())
    # every group's candidates were scored (log-probabilities: graded, negative), the best one won,
    # and the scores depend on the group's divisor (the candidate tables really differ)
    assert a.background == 4 and not a.uniform                 # 2T/L
    for g, by in a.detection.items():
        assert list(by) == ["2", "4", "8"]
        assert all(v < 0 for v in by.values())
        per = a.per_prompt[g]
        assert all(len(v) == 1 and np.isclose(np.mean(v), by[c]) for c, v in per.items())
        assert a.group_scales[int(g)] == stats.pick({int(c): v for c, v in per.items()}, 4)
    # every group's sweep contains the background table 4,4,4,4: one measurement, the same score
    assert len({by["4"] for by in a.detection.values()}) == 1
    assert len({round(v, 9) for by in a.detection.values() for v in by.values()}) > 3


def test_answer_logprob_matches_llama_cpp_python(tiny, tmp_path):
    """The teacher-forced score equals log-softmax read through llama_cpp.Llama on the same tokens."""
    import llama_cpp
    from dpe_gguf.evaluation.tasks import Sample
    prompt = "The special magic number for apple is: 1234567. What is the special magic number for apple? It is:"
    sample = Sample("multi_needle", 64, 0, 0.0, prompt, ("1234567",), 12)
    got = scoring.answer_logprob(tiny, [sample], 256, 0, False, 2)
    llm = llama_cpp.Llama(str(tiny), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    p = llm.tokenize(prompt.encode())
    a = llm.tokenize(b" 1234567", add_bos=False)
    llm.eval(p + a)
    scores = np.asarray(llm.scores[:len(p) + len(a)], dtype=np.float64)
    want = []
    for i, t in enumerate(a):
        row = scores[len(p) - 1 + i]
        want.append(row[t] - row.max() - np.log(np.exp(row - row.max()).sum()))
    assert abs(got - np.mean(want)) < 1e-4, (got, np.mean(want))


def test_cached_results_are_reused(tiny, tmp_path, monkeypatch):
    first = run(tiny, tmp_path, monkeypatch)
    cache_files = list((tmp_path / "calibration").glob("*.json"))
    assert len(cache_files) == 1
    data = json.loads(cache_files[0].read_text())
    # 4 groups x 3 divisors, the background table 4,4,4,4 shared by the four sweeps: 9 tables
    assert "selection" in data and len([k for k in data if k.startswith("t")]) == 9

    def no_server(*a, **k):
        raise AssertionError("a cached calibration must not run the model again")
    monkeypatch.setattr("dpe_gguf.llama.runtime.Server.__enter__", no_server)
    monkeypatch.setattr(sweep, "answer_logprobs", no_server)
    monkeypatch.setattr("dpe_gguf.calibration.selection.key_scores", no_server)
    again = run(tiny, tmp_path, monkeypatch)
    assert again.group_scales == first.group_scales and again.detection == first.detection


def test_interrupted_run_resumes_in_parallel_with_the_same_result(tiny, tmp_path, monkeypatch):
    """A cache holding some candidates (an interrupted run) measures only the rest; -j N measures
    them concurrently, and the calibration equals the serial one."""
    serial = run(tiny, tmp_path / "serial", monkeypatch)
    run(tiny, tmp_path / "par", monkeypatch)
    path, = (tmp_path / "par" / "calibration").glob("*.json")
    data = json.loads(path.read_text())
    dropped = [k for k in data if k.startswith("t")][::2]
    for k in dropped:
        del data[k]
    path.write_text(json.dumps(data))
    measured = []
    real = scoring.answer_logprobs

    def counting(model, *a, **k):
        measured.append(model.name)
        return real(model, *a, **k)
    monkeypatch.setattr(sweep, "answer_logprobs", counting)
    resumed = run(tiny, tmp_path / "par", monkeypatch, parallel=3)
    assert len(measured) == len(dropped) == 5 and len(set(measured)) == 5
    assert resumed.group_scales == serial.group_scales and resumed.detection == serial.detection
    assert len(json.loads(path.read_text())) == len(data) + len(dropped)


def test_uniform_background_sweeps_uniform_tables_first(tiny, tmp_path, monkeypatch, capsys):
    """background="uniform": the best uniform (Self-Extend) divisor is measured first and the others
    hold it; the cache is shared with a fixed-background run (tables, not runs, are its keys)."""
    u = run(tiny, tmp_path, monkeypatch, background="uniform")
    assert list(u.uniform) == ["2", "4", "8"] and all(len(v) == 1 for v in u.uniform.values())
    assert u.background == stats.pick({int(c): v for c, v in u.uniform.items()}, 4)
    bg = u.background
    cands = [c for c in (1, 2, 4, 8, 16) if bg / 2 <= c <= bg * 2]
    for g, by in u.detection.items():
        assert list(by) == [str(c) for c in cands]
        assert np.isclose(by[str(bg)], np.mean(u.uniform[str(bg)]))      # the uniform table itself
    assert "others held at" in u.params().calibration
    text = report.format_detection(u, 1024)
    assert text.startswith("uniform sweep") and f"-> background {bg}" in text

    measured = []
    real = scoring.answer_logprobs
    monkeypatch.setattr(sweep, "answer_logprobs", lambda m, *a, **k: measured.append(m.name) or real(m, *a, **k))
    f = run(tiny, tmp_path, monkeypatch)            # fixed background 4: tables around 4
    table = lambda g, c, b: tuple(c if i == g else b for i in range(4))  # noqa: E731
    had = {(c,) * 4 for c in (2, 4, 8)} | {table(g, c, bg) for g in range(4) for c in cands}
    wanted = {table(g, c, 4) for g in range(4) for c in (2, 4, 8)}
    assert len(measured) == len(wanted - had) < len(wanted)
    assert f.background == 4 and not f.uniform
    with pytest.raises(DPEError, match="background"):
        run(tiny, tmp_path, monkeypatch, background="median")


def test_detection_on_several_tasks_uses_the_calibration_prompts(tiny, tmp_path, monkeypatch):
    """--task passkey,multi_needle scores every candidate on the prompts of both tasks (paired per
    prompt), drawn from the calibration stream, never the evaluation's."""
    from dpe_gguf.evaluation import tasks as evaltasks
    seen = []
    real = scoring.answer_logprobs

    def recording(model, samples, *a, **k):
        seen.append([(x.task, x.prompt) for x in samples])
        return real(model, samples, *a, **k)
    monkeypatch.setattr(sweep, "answer_logprobs", recording)
    both = run(tiny, tmp_path, monkeypatch, task="passkey, multi_needle,passkey", trials=2, n_groups=2)
    assert both.settings["task"] == "passkey,multi_needle"
    assert all(len(v) == 4 for by in both.per_prompt.values() for v in by.values())
    assert len({tuple(s) for s in seen}) == 1                 # every candidate: the same prompts
    for g, per in both.per_prompt.items():                     # each task's prompts tested apart
        assert both.group_scales[int(g)] == stats.pick({int(c): v for c, v in per.items()}, both.background, parts=2)
    assert [t for t, _ in seen[0]] == ["passkey", "passkey", "multi_needle", "multi_needle"]
    from dpe_gguf.llama.runtime import RunSettings, Server
    with Server(tiny, 256, [], RunSettings(ngl=0, flash_attn=False, threads=2)) as tok:
        count = lambda x: len(tok.tokenize(x))  # noqa: E731
        ev = {x.prompt for t in ("passkey", "multi_needle") for x in evaltasks.make_samples(t, TARGET, 2, 0, count)}
        cal = {x.prompt for t in ("passkey", "multi_needle")
               for x in evaltasks.make_samples(t, TARGET, 2, 0, count, split="calibration")}
    assert {p for _, p in seen[0]} == cal and not cal & ev
    assert "detection passkey,multi_needle at 2048 tokens, 2 trials per task, seed 0" in both.params().calibration
    with pytest.raises(DPEError, match="detection task"):
        run(tiny, tmp_path, monkeypatch, task="passkey,multi_value")


def test_convert_from_calibration_file(tiny, tmp_path, monkeypatch):
    cal = run(tiny, tmp_path / "cache", monkeypatch)
    cal = result.Calibration(**{**cal.__dict__, "group_scales": (2, 8, 4, 2)})  # a non-trivial table
    path = cal.save(tmp_path / "cal.json")
    out = tmp_path / "tiny.dpe.gguf"
    assert main(["convert", str(tiny), "-o", str(out), "--from-calibration", str(path), "-q"]) == 0
    params, table = read_dpe(out)
    keep = topk_mask(cal.score_array(), cal.topk)
    assert np.array_equal(table, divisor_table(2, 2, 8, cal.group_scales, keep))
    assert params.window == WINDOW and params.topk == 6 and params.target_context == TARGET
    assert params.calibration.startswith("dpe-gguf calibrate v1: selection top-6 on the shipped text")
    assert "seed 0" in params.calibration


def test_calibrate_cli_and_errors(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPE_GGUF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "c.json"
    argv = ["calibrate", str(tiny), "--target-context", str(TARGET), "--window", str(WINDOW), "--quick",
            "--trials", "1", "--groups", "2", "-ngl", "0", "-o", str(out), "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "group scales:" in printed and "chosen" in printed and out.exists()
    assert main(argv) == 2 and "exists" in capsys.readouterr().err          # no silent overwrite
    assert main(["calibrate", str(tiny), "--target-context", "1024", "-o", str(tmp_path / "x.json"), "-q"]) == 2
    assert "not above the trained context" in capsys.readouterr().err
    assert main(["calibrate", str(tiny), "--target-context", "4096", "--window", "1024",
                 "-o", str(tmp_path / "y.json"), "-q"]) == 2
    assert "not below the trained context" in capsys.readouterr().err
    for cmd in (["calibrate", str(tiny), "--target-context", str(TARGET)], ["eval", str(tiny)]):
        assert main(cmd + ["-j", "0", "-q"]) == 2 and "--parallel must be at least 1" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["convert", str(tiny), "-o", str(tmp_path / "z.gguf"), "--from-calibration", str(bad), "-q"]) == 2
    assert "calibration file" in capsys.readouterr().err


def test_convert_measures_scores_for_topk_and_detects_for_given_scores(tiny, tmp_path, monkeypatch, capsys):
    """`convert --scales .. --topk K` without --scores runs selection only; `convert --target-context T
    --scores F` runs detection only (the given scores are the selection)."""
    monkeypatch.setenv("DPE_GGUF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sel.dpe.gguf"
    assert main(["convert", str(tiny), "-o", str(out), "--window", str(WINDOW), "--scales", "2,4",
                 "--topk", "6", "-q"]) == 0
    params, table = read_dpe(out)
    assert params.topk == 6 and "selection top-6 measured" in params.calibration
    assert ((table > 1).sum(axis=-1) == 6).all()                 # every head: its own 6 frequencies
    assert len({tuple(np.flatnonzero(h > 1)) for layer in table for h in layer}) > 1

    scores = np.random.default_rng(0).random((2, 2, 8))
    np.save(tmp_path / "s.npy", scores)

    def no_selection(*a, **k):
        raise AssertionError("given scores: no selection run")
    monkeypatch.setattr("dpe_gguf.calibration.selection.key_scores", no_selection)
    out2 = tmp_path / "det.dpe.gguf"
    assert main(["convert", str(tiny), "-o", str(out2), "--target-context", str(TARGET), "--window", str(WINDOW),
                 "--scores", str(tmp_path / "s.npy"), "--topk", "4", "--quick", "-q"]) == 0
    params, table = read_dpe(out2)
    keep = topk_mask(scores, 4)
    assert params.topk == 4 and np.array_equal(table, divisor_table(2, 2, 8, params.group_scales, keep))


def test_convert_calibrate_on_a_cpu_calibrates(tiny, tmp_path, monkeypatch, capsys):
    """`convert --calibrate` on a CPU build runs the calibration (at 4L, the default window) and the
    note records it; made small the way run() makes it (1 trial, 2 groups, short selection texts)."""
    monkeypatch.setenv("DPE_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("dpe_gguf.llama.runtime.build_info", lambda: {"cuda": False})
    runs, real = [], C.calibrate

    def small(model, target, **kw):
        runs.append(real(model, target, **kw, trials=1, n_groups=2, sel_samples=2, sel_tokens=256))
        return runs[-1]
    monkeypatch.setattr(choose, "calibrate", small)
    out = tmp_path / "cal.dpe.gguf"
    assert main(["convert", str(tiny), "-o", str(out), "--calibrate", "--quick"]) == 0
    cal, = runs
    assert cal.target == 4 * 1024 and cal.window == 128 and len(cal.detection) == 2 and cal.settings["quick"]
    params, table = read_dpe(out)
    assert params.group_scales == cal.group_scales and params.target_context == 4096 and params.window == 128
    assert np.array_equal(table, divisor_table(2, 2, 8, cal.group_scales, topk_mask(cal.score_array(), cal.topk)))
    assert params.calibration.startswith("dpe-gguf convert --calibrate; calibrated (--calibrate): "
                                         "dpe-gguf calibrate v1: selection top-6")
    assert "calibrated for 4096 tokens" in capsys.readouterr().out
