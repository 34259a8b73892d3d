"""Automatic DPE calibration (dpe-spec.md section 4): key-frequency selection and per-group effective
lengths, both measured through the patched llama.cpp.

1. Selection: :func:`dpe_gguf.selection.key_scores` on ordinary text (the shipped haystack or
   ``--text``); the top-k frequencies per (layer, KV head) get divisors, the others keep 1.
2. Detection: for the target length T, every group but the one under test is held at divisor
   2T/L; the group under test sweeps divisors 1, 2, 4, ... up to T/w (lengths T, T/2, ... down to
   the window); each candidate table runs the multi-needle retrieval task at length T through
   llama-server; the best divisor per group wins (ties: the one nearest 2T/L, then the smaller).

Every candidate's score is cached in a JSON file keyed by the model's sha256 and the settings, so an
interrupted run resumes, and a finished one is reused. ``calibrate`` returns (and writes) a
:class:`Calibration` that ``dpe-gguf convert --from-calibration FILE`` turns into a DPE GGUF.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpe_gguf import evaltasks
from dpe_gguf.errors import DPEError
from dpe_gguf.model_info import has_dpe, open_reader, read_model_info
from dpe_gguf.params import DPEParams, topk_mask

CALIBRATION_VERSION = 1


@dataclass
class DetectSettings:
    target: int
    window: int
    n_groups: int = 8
    task: str = "multi_needle"
    trials: int = 5
    seed: int = 0
    quick: bool = False
    ngl: int = 0
    flash_attn: bool = True
    threads: int | None = None
    scorer: str = "logprob"     # "logprob": mean log-probability of the answer; "hits": greedy answers found
    parallel: int = 1           # candidate tables measured at once

    def candidates(self, L: int) -> list[int]:
        """Divisors T/len for len = T, T/2, ... >= w: 1, 2, 4, ..., and in quick mode only the
        three around the background divisor 2T/L."""
        top = max(1, self.target // self.window)
        cands = [1 << i for i in range(int(math.log2(top)) + 1)]
        if self.quick:
            bg = background_divisor(self.target, L)
            cands = [c for c in cands if bg / 2 <= c <= bg * 2] or cands[-1:]
        return cands


def background_divisor(target: int, L: int) -> int:
    """2T/L rounded up to a power of two: the divisor the other groups hold during detection."""
    return 1 << max(0, math.ceil(math.log2(2 * target / L)))


@dataclass
class Calibration:
    """What calibration measured, in a form `convert` accepts (JSON)."""
    model_sha256: str
    target: int
    window: int
    topk: int
    group_scales: tuple[int, ...]
    scores: list | None               # (n_layer, n_head_kv, F) selection scores, None without selection
    detection: dict = field(default_factory=dict)   # group -> {divisor: score}
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    version: int = CALIBRATION_VERSION

    def params(self) -> DPEParams:
        note = (f"dpe-gguf calibrate v{self.version}: selection top-{self.topk} on "
                f"{self.settings.get('text') or 'the shipped text'} ({self.settings.get('sel_samples')} x "
                f"{self.settings.get('sel_tokens')} tokens); detection {self.settings.get('task')} at "
                f"{self.target} tokens, {self.settings.get('trials')} trials, seed {self.settings.get('seed')}"
                f"{', quick' if self.settings.get('quick') else ''}")
        return DPEParams(window=self.window, group_scales=tuple(self.group_scales),
                         topk=self.topk if self.scores is not None else None,
                         target_context=self.target, calibration=note)

    def score_array(self) -> np.ndarray | None:
        return None if self.scores is None else np.asarray(self.scores, dtype=np.float64)

    def save(self, path: Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        try:
            d = json.loads(Path(path).read_text())
            if d.get("version") != CALIBRATION_VERSION:
                raise DPEError(f"{path}: calibration file version {d.get('version')} (this dpe-gguf reads "
                               f"{CALIBRATION_VERSION})")
            d["group_scales"] = tuple(d["group_scales"])
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DPEError(f"{path}: not a calibration file of `dpe-gguf calibrate` ({e})") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("DPE_GGUF_CACHE") or Path.home() / ".cache" / "dpe-gguf") / "calibration"


class _Cache:
    """Candidate scores on disk (JSON, rewritten atomically after each candidate)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def select(model: Path, text: Path | None, n_samples: int, n_tokens: int, seed: int,
           ngl: int, quiet: bool) -> np.ndarray:
    """Selection scores (n_layer, n_head_kv, F) on the shipped text or the user's."""
    from dpe_gguf.selection import calibration_texts, key_scores
    texts = calibration_texts(n_samples, int(n_tokens * 5.5), seed, text)
    _say(f"selection: {n_samples} text(s) x {n_tokens} tokens through the model (pre-RoPE Q/K)", quiet)
    return key_scores(model, texts, n_tokens=n_tokens, n_gpu_layers=ngl, progress=not quiet)


def detect(model: Path, keep: np.ndarray | None, s: DetectSettings, cache: _Cache,
           quiet: bool = False) -> tuple[tuple[int, ...], dict]:
    """Per-group divisors by the section-4 sweep; returns (scales, {group: {divisor: score}})."""
    from dpe_gguf.convert import convert
    from dpe_gguf.runtime import RunSettings, Server
    info = read_model_info(model)
    L = info.context_length
    if s.window >= L:
        raise DPEError(f"window {s.window} is not below the trained context {L}")
    if s.target <= L:
        raise DPEError(f"target context {s.target} is not above the trained context {L}: nothing to extend")
    G = s.n_groups
    if not 1 <= G <= info.n_freq:
        raise DPEError(f"{G} groups: need 1..{info.n_freq} (F = n_rot/2)")
    bg = background_divisor(s.target, L)
    cands = s.candidates(L)
    settings = RunSettings(ngl=s.ngl, flash_attn=s.flash_attn, threads=s.threads)
    n_ctx = s.target + evaltasks.MAX_TOKENS[s.task] + 64
    ctx_args = ["--override-kv", f"{info.arch}.context_length=int:{n_ctx}"]
    total = G * len(cands)
    _say(f"detection: {G} groups x divisors {cands} (others at {bg}), {s.trials} {s.task} trials at "
         f"{s.target} tokens: {total} candidate tables, {total * s.trials} prompts", quiet)
    if s.ngl == 0:
        _say("detection runs on the CPU: prompts of this length take minutes each; a CUDA build "
             f"(CMAKE_ARGS=-DGGML_CUDA=on) runs the whole sweep in minutes; --quick tries 3 divisors per group", quiet)

    work = Path(tempfile.mkdtemp(prefix="dpe-calibrate-"))
    results: dict[int, dict[int, float]] = {}
    key = lambda g, c: f"g{g}/{G}-d{c}-bg{bg}" + ("" if s.scorer == "hits" else f"-{s.scorer}")  # noqa: E731
    for g in range(G):
        results[g] = {c: v for c in cands if (v := cache.get(key(g, c))) is not None}
    todo = [(g, c) for g in range(G) for c in cands if c not in results[g]]
    from tqdm import tqdm
    bar = tqdm(total=total, initial=total - len(todo), disable=quiet, unit="table", file=sys.stderr,
               dynamic_ncols=True)
    lock = threading.Lock()
    t_start = time.time()

    def measure(g: int, c: int, samples) -> None:
        scales = tuple(c if i == g else bg for i in range(G))
        table_model = work / f"candidate-g{g}-d{c}.dpe.gguf"
        _convert_candidate(model, table_model, s, scales, keep)
        try:
            if s.scorer == "logprob":
                hit = answer_logprob(table_model, samples, n_ctx, s.ngl, s.flash_attn, s.threads)
            else:
                with Server(table_model, n_ctx, ctx_args, settings) as srv:
                    hit = float(np.mean([evaltasks.score(x, srv.complete(x.prompt, x.max_tokens)["text"])
                                         for x in samples]))
        finally:
            table_model.unlink(missing_ok=True)
        with lock:
            cache.put(key(g, c), hit)
            results[g][c] = hit
            bar.update(1)
            bar.set_postfix_str(f"group {g} divisor {c}: {hit:.2f}")

    try:
        if todo:
            # tokenized with the model itself (a small server on the stock weights), once
            with Server(model, 256, ["--dpe", "off"] if has_dpe(open_reader(model)) else [],
                        RunSettings(ngl=0, flash_attn=False, threads=s.threads)) as tok:
                count = lambda x: len(tok.tokenize(x))  # noqa: E731
                samples = evaltasks.make_samples(s.task, s.target, s.trials, s.seed, count)
            with _quiet_llama_log():
                if s.parallel > 1:
                    # candidates are independent: on a GPU a small model leaves room for several at once
                    from concurrent.futures import ThreadPoolExecutor
                    with ThreadPoolExecutor(max_workers=s.parallel) as pool:
                        for f in [pool.submit(measure, g, c, samples) for g, c in todo]:
                            f.result()
                else:
                    for g, c in todo:
                        measure(g, c, samples)
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    results = {g: {c: results[g][c] for c in cands} for g in range(G)}   # candidate order, whatever finished first
    best = [pick(results[g], bg) for g in range(G)]
    _say(f"detection took {time.time() - t_start:.0f} s", quiet)
    return tuple(best), {str(g): {str(c): v for c, v in r.items()} for g, r in results.items()}


def answer_logprob(model: Path, samples, n_ctx: int, ngl: int, flash_attn: bool, threads: int | None,
                   n_batch: int = 2048) -> float:
    """Mean over samples of the mean log-probability of the sample's first answer, teacher-forced
    after its prompt (" " + answer, as the prompts end with "is:"), run by the patched llama.cpp.

    A graded score: it separates candidate tables that retrieve equally often."""
    with _quiet_llama_log():
        return _answer_logprob(model, samples, n_ctx, ngl, flash_attn, threads, n_batch)


@contextmanager
def _quiet_llama_log():
    """llama.cpp's log (routed through llama_cpp's Python logger) silenced, then restored: nests, and
    threads inside one outer use leave it as it was."""
    import llama_cpp._logger as llama_logger
    saved = llama_logger.logger.level
    llama_logger.set_verbose(False)
    try:
        yield
    finally:
        llama_logger.logger.setLevel(saved)


def _answer_logprob(model: Path, samples, n_ctx: int, ngl: int, flash_attn: bool, threads: int | None,
                    n_batch: int) -> float:
    import llama_cpp

    from dpe_gguf.selection import tokenize
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = int(ngl)
    lmodel = ctx = batch = None
    try:
        lmodel = llama_cpp.llama_model_load_from_file(str(model).encode(), mparams)
        if not lmodel:
            raise DPEError(f"{model}: llama.cpp could not load the model")
        vocab = llama_cpp.llama_model_get_vocab(lmodel)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(n_batch, n_ctx)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(lmodel, cparams)
        if not ctx:
            raise DPEError(f"{model}: llama.cpp could not create a context of {n_ctx} tokens")
        memory = llama_cpp.llama_get_memory(ctx)
        nb = cparams.n_batch
        batch = llama_cpp.llama_batch_init(nb, 0, 1)
        per_sample = []
        for x in samples:
            prompt = tokenize(llama_cpp, vocab, x.prompt)
            answer = tokenize(llama_cpp, vocab, " " + x.answers[0], add_special=False)
            ids = prompt + answer
            if len(ids) > n_ctx:
                raise DPEError(f"prompt of {len(ids)} tokens does not fit the context of {n_ctx}")
            first = len(prompt) - 1                  # logits at positions first .. len(ids) - 2
            llama_cpp.llama_memory_clear(memory, True)
            logp = []
            for start in range(0, len(ids) - 1, nb):
                chunk = ids[start:min(start + nb, len(ids) - 1)]
                for j, t in enumerate(chunk):
                    batch.token[j] = t
                    batch.pos[j] = start + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = start + j >= first
                batch.n_tokens = len(chunk)
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise DPEError("llama_decode failed while scoring a candidate")
                for j in range(len(chunk)):
                    p = start + j
                    if p >= first:
                        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, j),
                                                       shape=(n_vocab,)).astype(np.float64)
                        m = logits.max()
                        logp.append(logits[ids[p + 1]] - m - math.log(np.exp(logits - m).sum()))
            per_sample.append(float(np.mean(logp)))
        return float(np.mean(per_sample))
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        if lmodel:
            llama_cpp.llama_model_free(lmodel)


def pick(scores: dict[int, float], background: int) -> int:
    """The best-scoring divisor; among equal scores the one nearest the background divisor 2T/L
    (in log2), then the smaller: a sweep that cannot tell candidates apart keeps the prior."""
    top = max(scores.values())
    tied = [c for c, v in scores.items() if v == top]
    return min(tied, key=lambda c: (abs(math.log2(c) - math.log2(background)), c))


def _convert_candidate(src: Path, out: Path, s: DetectSettings, scales, keep: np.ndarray | None) -> None:
    """`src` with the candidate's divisors; `keep` (top-k per head, the same k everywhere) as 0/1
    scores, which topk_mask turns back into exactly `keep`."""
    from dpe_gguf.convert import convert
    k = None if keep is None else int(keep[0, 0].sum())
    convert(src, out, DPEParams(window=s.window, group_scales=scales, topk=k, target_context=s.target),
            scores=None if keep is None else keep.astype(np.float64), force=True, progress=False)


def format_detection(cal: Calibration, L: int) -> str:
    """The per-group table and why each divisor won."""
    lines = [f"{'group':>5}  " + "  ".join(f"{'d=' + c:>6}" for c in next(iter(cal.detection.values())).keys())
             + "   chosen  why"]
    bg = background_divisor(cal.target, L)
    for g, by in cal.detection.items():
        vals = list(by.values())
        chosen = cal.group_scales[int(g)]
        top = max(vals)
        ties = [c for c, v in by.items() if v == top]
        why = (f"best score {top:.2f}" + (f", tied with {', '.join(c for c in ties if int(c) != chosen)}: the "
                                          "divisor nearest 2T/L wins" if len(ties) > 1 else ""))
        lines.append(f"{g:>5}  " + "  ".join(f"{v:>6.2f}" for v in vals) + f"   {chosen:>6}  {why}")
    lines.append(f"(other groups held at divisor {bg} = 2T/L while one group is swept)")
    return "\n".join(lines)


def calibrate(model: str | Path, target: int, window: int | None = None, topk: int | None = None,
              n_groups: int = 8, text: Path | None = None, sel_samples: int = 4, sel_tokens: int = 2048,
              task: str = "multi_needle", trials: int | None = None, seed: int = 0, quick: bool = False,
              ngl: int | None = None, scales: tuple[int, ...] | None = None, select_frequencies: bool = True,
              scorer: str = "logprob", scores: Any = None, parallel: int = 1,
              quiet: bool = False) -> Calibration:
    """Run selection and detection for `model`: detection is skipped when `scales` are given,
    selection when `scores` are (an array or .npy file, as `convert --scores` takes)."""
    from dpe_gguf.runtime import default_ngl
    from dpe_gguf.selection import default_topk
    model = Path(model)
    info = read_model_info(model)
    L = info.context_length
    window = window if window is not None else min(1024, L // 8)
    topk = topk if topk is not None else default_topk(info.n_freq)
    ngl = default_ngl() if ngl is None else ngl
    trials = trials if trials is not None else (2 if quick else 5)
    if window >= L:
        raise DPEError(f"window {window} is not below the trained context {L}")
    if target <= L:
        raise DPEError(f"target context {target} is not above the trained context {L}")
    t0 = time.time()
    sha = file_sha256(model)
    settings = dict(target=target, window=window, topk=topk, n_groups=n_groups, text=str(text) if text else None,
                    sel_samples=sel_samples, sel_tokens=sel_tokens, task=task, trials=trials, seed=seed,
                    quick=quick, select=select_frequencies, scorer=scorer)
    given = None
    if scores is not None:
        from dpe_gguf.convert import load_scores
        scores = load_scores(scores, info)     # folded, checked against the model
        given = hashlib.sha256(np.ascontiguousarray(scores, dtype=np.float64).tobytes()).hexdigest()
        settings["select"] = "given scores"
    tag = hashlib.sha256(json.dumps({**settings, "sha": sha, "scores": given}, sort_keys=True).encode()).hexdigest()[:16]
    cache = _Cache(cache_root() / f"{sha[:16]}-{tag}.json")
    _say(f"calibration cache: {cache.path}", quiet)

    keep = None
    if scores is not None:
        keep = topk_mask(scores, topk)
    elif select_frequencies:
        cached = cache.get("selection")
        if cached is None:
            scores = select(model, text, sel_samples, min(sel_tokens, L), seed, ngl, quiet)
            cache.put("selection", scores.tolist())
        else:
            scores = np.asarray(cached, dtype=np.float64)
        keep = topk_mask(scores, topk)
    if scales is None:
        s = DetectSettings(target=target, window=window, n_groups=n_groups, task=task, trials=trials, seed=seed,
                           quick=quick, ngl=ngl, scorer=scorer, parallel=parallel)
        scales, detection = detect(model, keep, s, cache, quiet)
    else:
        detection = {}
    return Calibration(model_sha256=sha, target=target, window=window, topk=topk, group_scales=tuple(scales),
                       scores=None if scores is None else scores.tolist(), detection=detection,
                       settings=settings, seconds=round(time.time() - t0, 1))
