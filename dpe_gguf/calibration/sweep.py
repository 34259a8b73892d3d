"""Selection and detection, the two measurements of calibration (docs/design.md section 4): the frequencies' scores
on ordinary text, then every group's divisor swept over candidate tables scored on retrieval prompts."""
from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from dpe_gguf.calibration.cache import ScoreCache, table_key
from dpe_gguf.calibration.report import say
from dpe_gguf.calibration.result import Detection
from dpe_gguf.calibration.scoring import answer_logprobs
from dpe_gguf.calibration.settings import CalibrationSettings, background_divisor
from dpe_gguf.calibration.stats import pick
from dpe_gguf.errors import DPEError
from dpe_gguf.evaluation import tasks as evaltasks
from dpe_gguf.format.model_info import read_model_info
from dpe_gguf.format.params import DPEParams
from dpe_gguf.llama.session import quiet_llama_log


def select(model: Path, text: Path | None, n_samples: int, n_tokens: int, seed: int,
           ngl: int, quiet: bool) -> np.ndarray:
    """Selection scores (n_layer, n_head_kv, F) on the shipped text or the user's."""
    from dpe_gguf.calibration.selection import calibration_texts, key_scores
    texts = calibration_texts(n_samples, int(n_tokens * 5.5), seed, text)
    say(f"selection: {n_samples} text(s) x {n_tokens} tokens through the model (pre-RoPE Q/K)", quiet)
    return key_scores(model, texts, n_tokens=n_tokens, n_gpu_layers=ngl, progress=not quiet)



def detect(model: Path, keep: np.ndarray | None, s: CalibrationSettings, cache: ScoreCache,
           quiet: bool = False) -> "Detection":
    """Per-group divisors by the section-4 sweep (after a uniform sweep choosing the background
    divisor when ``s.background == "uniform"``); ``s`` as :meth:`CalibrationSettings.resolved` made it."""
    from dpe_gguf.llama.runtime import RunSettings, Server, context_cap_args, token_counter
    info = read_model_info(model)
    L = info.context_length
    G = s.n_groups
    if not 1 <= G <= info.n_freq:
        raise DPEError(f"{G} groups: need 1..{info.n_freq} (F = n_rot/2)")
    prior = background_divisor(s.target, L)
    settings = RunSettings(ngl=s.ngl, flash_attn=s.flash_attn, threads=s.threads)
    n_ctx = s.target + max(evaltasks.MAX_TOKENS[t] for t in s.tasks) + 64
    ctx_args = context_cap_args(info.arch, n_ctx)
    if s.ngl == 0:
        say("detection runs on the CPU: prompts of this length take minutes each; a CUDA build "
             "(CMAKE_ARGS=-DGGML_CUDA=on) runs the whole sweep in minutes; --quick tries 3 divisors per group", quiet)
    work = Path(tempfile.mkdtemp(prefix="dpe-calibrate-"))
    lock = threading.Lock()
    measured: dict[tuple[int, ...], list[float]] = {}
    samples: list = []
    t_start = time.time()

    def measure(scales: tuple[int, ...], bar) -> None:
        table_model = work / f"candidate-{'-'.join(map(str, scales))}.dpe.gguf"
        _convert_candidate(model, table_model, s, scales, keep)
        try:
            if s.scorer == "logprob":
                per = answer_logprobs(table_model, samples, n_ctx, s.ngl, s.flash_attn, s.threads)
            else:
                with Server(table_model, n_ctx, ctx_args, settings) as srv:
                    per = [evaltasks.score(x, srv.complete(x.prompt, x.max_tokens)["text"]) for x in samples]
        finally:
            table_model.unlink(missing_ok=True)
        with lock:
            cache.put(table_key(scales), per)
            measured[scales] = per
            bar.update(1)
            bar.set_postfix_str(f"{','.join(map(str, scales))}: {np.mean(per):.2f}")

    def run_tables(tables: list[tuple[int, ...]], what: str) -> None:
        """Measure the tables the cache lacks (several at once with s.parallel > 1)."""
        tables = list(dict.fromkeys(tables))
        for t in tables:
            if (v := cache.get(table_key(t))) is not None:
                measured[t] = v
        todo = [t for t in tables if t not in measured]
        say(f"{what}: {len(tables)} candidate tables ({len(tables) - len(todo)} cached), each scored on "
             f"{' + '.join(f'{s.trials} {t}' for t in s.tasks)} prompts of {s.target} tokens", quiet)
        if not todo:
            return
        if not samples:
            # tokenized with the model itself, once
            with token_counter(model, s.threads) as count:
                for t in s.tasks:
                    samples.extend(evaltasks.make_samples(t, s.target, s.trials, s.seed, count, split="calibration"))
        from tqdm import tqdm
        with tqdm(total=len(todo), disable=quiet, unit="table", file=sys.stderr, dynamic_ncols=True) as bar, \
                quiet_llama_log():
            if s.parallel > 1:
                # candidates are independent: on a GPU a small model leaves room for several at once
                from concurrent.futures import ThreadPoolExecutor
                with ThreadPoolExecutor(max_workers=s.parallel) as pool:
                    for f in [pool.submit(measure, t, bar) for t in todo]:
                        f.result()
            else:
                for t in todo:
                    measure(t, bar)

    try:
        uniform: dict[int, list[float]] = {}
        bg = prior
        if s.background == "uniform":
            ucands = s.candidates(L, prior)
            run_tables([(c,) * G for c in ucands], "uniform sweep (Self-Extend divisors)")
            uniform = {c: measured[(c,) * G] for c in ucands}
            bg = pick(uniform, prior, len(s.tasks))
        cands = s.candidates(L, bg)
        tables = {(g, c): tuple(c if i == g else bg for i in range(G)) for g in range(G) for c in cands}
        run_tables(list(tables.values()), f"group sweep (others at {bg})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_group = {g: {c: measured[tables[(g, c)]] for c in cands} for g in range(G)}
    scales = tuple(pick(per_group[g], bg, len(s.tasks)) for g in range(G))
    say(f"detection took {time.time() - t_start:.0f} s", quiet)
    return Detection(scales=scales, background=bg, uniform=uniform, groups=per_group)



def _convert_candidate(src: Path, out: Path, s: CalibrationSettings, scales, keep: np.ndarray | None) -> None:
    """`src` with the candidate's divisors; `keep` (top-k per head, the same k everywhere) as 0/1
    scores, which topk_mask turns back into exactly `keep`."""
    from dpe_gguf.format.convert import convert
    k = None if keep is None else int(keep[0, 0].sum())
    convert(src, out, DPEParams(window=s.window, group_scales=scales, topk=k, target_context=s.target),
            scores=None if keep is None else keep.astype(np.float64), force=True, progress=False)
