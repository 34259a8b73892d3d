"""Automatic DPE calibration (docs/design.md section 4): key-frequency selection and per-group effective
lengths, both measured through the patched llama.cpp.

1. Selection: :func:`dpe_gguf.selection.key_scores` on ordinary text (the shipped haystack or
   ``--text``); the top-k frequencies per (layer, KV head) get divisors, the others keep 1.
2. Detection: for the target length T, every group but the one under test is held at a background
   divisor, 2T/L (the spec) or, with ``background="uniform"``, the best uniform divisor found by a
   first sweep of uniform (Self-Extend) tables; the group under test sweeps divisors 1, 2, 4, ... up
   to T/w (lengths T, T/2, ... down to the window); each candidate table is scored on the same
   retrieval prompts at length T (multi-needle by default, or several tasks' prompts together),
   by the answer's teacher-forced log-probability or greedy hits. The prompts are the tasks of
   :mod:`dpe_gguf.evaltasks` drawn from their own "calibration" stream: never the evaluation's.
   The best divisor per group wins: one candidate beats another when it is better by more than the
   prompts' noise (paired per-prompt differences over two standard errors) on some task's prompts
   and not measurably worse on any; among the candidates no other beats, the one nearest the
   background wins. A group is moved off the background only where the measurement says so, and a
   gain on one task bought with a loss on another does not move it.

Every candidate table's per-prompt scores are cached in a JSON file keyed by the model's sha256 and
the settings, so an interrupted run resumes, a finished one is reused, and a table measured twice
(every group's sweep contains the background table) runs once. ``calibrate`` returns (and writes) a
:class:`Calibration` that ``dpe-gguf convert --from-calibration FILE`` turns into a DPE GGUF.
"""
from __future__ import annotations

import hashlib
import json
import math
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dpe_gguf import evaltasks, paths
from dpe_gguf.errors import DPEError
from dpe_gguf.gguf_stream import write_atomic
from dpe_gguf.model_info import read_model_info
from dpe_gguf.params import DPEParams, check_target_context, check_window, topk_mask
from dpe_gguf.llama_session import LlamaSession, quiet_llama_log

CALIBRATION_VERSION = 1
DEFAULT_GROUPS = 8        # G, docs/design.md section 2
DETECTION_TASKS = ("multi_needle", "passkey")   # one answer each, what the log-probability score needs


@dataclass
class DetectSettings:
    target: int
    window: int
    n_groups: int = DEFAULT_GROUPS
    task: str = "multi_needle"  # a task of DETECTION_TASKS, or several joined by commas
    trials: int = 5             # prompts per task
    seed: int = 0
    quick: bool = False
    ngl: int = 0
    flash_attn: bool = True
    threads: int | None = None
    scorer: str = "logprob"     # "logprob": mean log-probability of the answer; "hits": greedy answers found
    parallel: int = 1           # candidate tables measured at once
    background: str = "fixed"   # "fixed": the others hold 2T/L; "uniform": the best uniform divisor, swept first

    @property
    def tasks(self) -> list[str]:
        return parse_tasks(self.task)

    def candidates(self, L: int, around: int | None = None) -> list[int]:
        """Divisors T/len for len = T, T/2, ... >= w: 1, 2, 4, ..., and in quick mode only the
        three around `around` (default: the background divisor 2T/L)."""
        top = max(1, self.target // self.window)
        cands = [1 << i for i in range(int(math.log2(top)) + 1)]
        if self.quick:
            bg = around or background_divisor(self.target, L)
            cands = [c for c in cands if bg / 2 <= c <= bg * 2] or cands[-1:]
        return cands


def parse_tasks(task: str) -> list[str]:
    """The detection tasks of a comma list ("passkey,multi_needle"), in order, each once."""
    tasks = list(dict.fromkeys(t.strip() for t in str(task).split(",") if t.strip()))
    bad = [t for t in tasks if t not in DETECTION_TASKS]
    if not tasks or bad:
        raise DPEError(f"detection task {task!r}: one or more of {', '.join(DETECTION_TASKS)}, joined by commas")
    return tasks


def background_divisor(target: int, L: int) -> int:
    """2T/L rounded up to a power of two: the divisor the other groups hold during detection."""
    return 1 << max(0, math.ceil(math.log2(2 * target / L)))


def default_window(L: int) -> int:
    """The local window when none is given: the spec's 1024, or L/8 for models trained on fewer
    than 8192 tokens (docs/design.md section 2: always below L)."""
    return min(1024, L // 8)


def check_extension(target: int, window: int, L: int) -> None:
    """Refuse a window that is not below the trained context L, or a target that is not above it (the
    rules of dpe_gguf.params, which convert applies too)."""
    check_window(window, L)
    check_target_context(target, L)


@dataclass
class Calibration:
    """What calibration measured, in a form `convert` accepts (JSON)."""
    model_sha256: str
    target: int
    window: int
    topk: int
    group_scales: tuple[int, ...]
    scores: list | None               # (n_layer, n_head_kv, F) selection scores, None without selection
    detection: dict = field(default_factory=dict)   # group -> {divisor: mean score}
    settings: dict = field(default_factory=dict)
    background: int = 0                             # divisor the other groups held (0: no detection)
    uniform: dict = field(default_factory=dict)     # divisor -> per-prompt scores of the uniform sweep
    per_prompt: dict = field(default_factory=dict)  # group -> {divisor: per-prompt scores}
    seconds: float = 0.0
    version: int = CALIBRATION_VERSION

    def params(self) -> DPEParams:
        note = (f"dpe-gguf calibrate v{self.version}: selection top-{self.topk} on "
                f"{self.settings.get('text') or 'the shipped text'} ({self.settings.get('sel_samples')} x "
                f"{self.settings.get('sel_tokens')} tokens); detection {self.settings.get('task')} at "
                f"{self.target} tokens, {self.settings.get('trials')} trials"
                f"{' per task' if ',' in str(self.settings.get('task')) else ''}, seed {self.settings.get('seed')}"
                f"{', quick' if self.settings.get('quick') else ''}"
                + (f", others held at {self.background}"
                   + (" (best uniform)" if self.settings.get("background") == "uniform" else " (2T/L)")
                   if self.background else ""))
        return DPEParams(window=self.window, group_scales=tuple(self.group_scales),
                         topk=self.topk if self.scores is not None else None,
                         target_context=self.target, calibration=note)

    def score_array(self) -> np.ndarray | None:
        return None if self.scores is None else np.asarray(self.scores, dtype=np.float64)

    def save(self, path: Path) -> Path:
        return write_atomic(Path(path), json.dumps(asdict(self), indent=1).encode())

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
    return paths.cache_root("calibration")


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
        write_atomic(self.path, json.dumps(self.data, indent=1).encode(),
                     remedy="set DPE_GGUF_CACHE to a writable folder")


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


def _table_key(scales: tuple[int, ...]) -> str:
    return "t" + ",".join(map(str, scales))


def detect(model: Path, keep: np.ndarray | None, s: DetectSettings, cache: _Cache,
           quiet: bool = False) -> "Detection":
    """Per-group divisors by the section-4 sweep (after a uniform sweep choosing the background
    divisor when ``s.background == "uniform"``)."""
    from dpe_gguf.runtime import RunSettings, Server, context_cap_args, token_counter
    info = read_model_info(model)
    L = info.context_length
    check_extension(s.target, s.window, L)
    G = s.n_groups
    if not 1 <= G <= info.n_freq:
        raise DPEError(f"{G} groups: need 1..{info.n_freq} (F = n_rot/2)")
    prior = background_divisor(s.target, L)
    settings = RunSettings(ngl=s.ngl, flash_attn=s.flash_attn, threads=s.threads)
    n_ctx = s.target + max(evaltasks.MAX_TOKENS[t] for t in s.tasks) + 64
    ctx_args = context_cap_args(info.arch, n_ctx)
    if s.ngl == 0:
        _say("detection runs on the CPU: prompts of this length take minutes each; a CUDA build "
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
            cache.put(_table_key(scales), per)
            measured[scales] = per
            bar.update(1)
            bar.set_postfix_str(f"{','.join(map(str, scales))}: {np.mean(per):.2f}")

    def run_tables(tables: list[tuple[int, ...]], what: str) -> None:
        """Measure the tables the cache lacks (several at once with s.parallel > 1)."""
        tables = list(dict.fromkeys(tables))
        for t in tables:
            if (v := cache.get(_table_key(t))) is not None:
                measured[t] = v
        todo = [t for t in tables if t not in measured]
        _say(f"{what}: {len(tables)} candidate tables ({len(tables) - len(todo)} cached), each scored on "
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
    _say(f"detection took {time.time() - t_start:.0f} s", quiet)
    return Detection(scales=scales, background=bg, uniform=uniform, groups=per_group)


@dataclass
class Detection:
    """What the sweeps measured: per-sample scores of every candidate (same prompts for all)."""
    scales: tuple[int, ...]
    background: int                          # the divisor the other groups held
    uniform: dict[int, list[float]]          # divisor -> scores (empty unless background "uniform")
    groups: dict[int, dict[int, list[float]]]  # group -> divisor -> scores

    def means(self) -> dict:
        return {str(g): {str(c): float(np.mean(v)) for c, v in by.items()} for g, by in self.groups.items()}


def answer_logprobs(model: Path, samples, n_ctx: int, ngl: int, flash_attn: bool, threads: int | None,
                    n_batch: int = 2048) -> list[float]:
    """Per sample, the mean log-probability of the sample's first answer, teacher-forced after its
    prompt (" " + answer, as the prompts end with "is:"), run by the patched llama.cpp.

    A graded score: it separates candidate tables that retrieve equally often."""
    with LlamaSession(model, n_gpu_layers=ngl) as session:
        session.open_context(n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, flash_attn=flash_attn)
        nb = session.n_batch
        per_sample = []
        for x in samples:
            prompt = session.tokenize(x.prompt)
            answer = session.tokenize(" " + x.answers[0], add_special=False)
            ids = prompt + answer
            if len(ids) > n_ctx:
                raise DPEError(f"prompt of {len(ids)} tokens does not fit the context of {n_ctx}")
            first = len(prompt) - 1                  # logits at positions first .. len(ids) - 2
            session.clear()
            logp = []
            for start in range(0, len(ids) - 1, nb):
                chunk = ids[start:min(start + nb, len(ids) - 1)]
                if session.decode(chunk, start, [start + j >= first for j in range(len(chunk))]) != 0:
                    raise DPEError("llama_decode failed while scoring a candidate")
                for j in range(len(chunk)):
                    p = start + j
                    if p >= first:
                        logits = session.logits(j).astype(np.float64)
                        m = logits.max()
                        logp.append(logits[ids[p + 1]] - m - math.log(np.exp(logits - m).sum()))
            per_sample.append(float(np.mean(logp)))
        return per_sample


def answer_logprob(model: Path, samples, n_ctx: int, ngl: int, flash_attn: bool, threads: int | None,
                   n_batch: int = 2048) -> float:
    """The mean of :func:`answer_logprobs` over the samples."""
    return float(np.mean(answer_logprobs(model, samples, n_ctx, ngl, flash_attn, threads, n_batch)))


def as_good(best: list[float], other: list[float], z: float = 2.0) -> bool:
    """True when `other` is not measurably worse than `best`: scores on the same prompts, so the
    per-prompt differences are paired; their mean must exceed `z` standard errors to count. With one
    prompt only an exact tie counts."""
    d = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    m = float(d.mean())
    if m <= 0:
        return True
    if len(d) < 2:
        return False
    return m <= z * float(d.std(ddof=1)) / math.sqrt(len(d))


def _task_slices(n: int, parts: int) -> list[slice]:
    """The prompts of each of `parts` tasks among a candidate's n scores (each task's run in turn)."""
    if parts < 1 or n % parts:
        raise ValueError(f"{n} scores do not split into {parts} tasks")
    k = n // parts
    return [slice(i * k, (i + 1) * k) for i in range(parts)]


def _best_mean(per: dict) -> Any:
    return max(per, key=lambda c: (per[c].mean(), -int(c)))


def undominated(scores: dict, parts: int = 1) -> list:
    """The candidates no other candidate measurably beats. One beats another when it is better by more
    than the prompts' noise (paired differences over two standard errors, :func:`as_good`) on the
    prompts of some task and not measurably worse on those of any. Tasks are tested apart: pooled, the
    noisier task's spread would hide a clear difference on the other (and a gain on one task could
    hide a loss on the other). With one task: the candidates not measurably worse than any other."""
    per = {c: np.atleast_1d(np.asarray(v, dtype=np.float64)) for c, v in scores.items()}
    parts = parts if len(next(iter(per.values()))) > 1 else 1    # one number per candidate: a mean
    sls = _task_slices(len(next(iter(per.values()))), parts)

    def better(a, b, x: slice) -> bool:           # b measurably worse than a on the prompts x
        return not as_good(per[a][x], per[b][x])

    def beats(a, b) -> bool:
        return any(better(a, b, x) for x in sls) and not any(better(b, a, x) for x in sls)

    keep = [c for c in per if not any(beats(o, c) for o in per if o != c)]
    return keep or [_best_mean(per)]     # noise can make a cycle of "beats": then the best mean


def pick(scores: dict[int, Any], background: int, parts: int = 1) -> int:
    """The best divisor: among the candidates (scores: a list per prompt, `parts` tasks' prompts in
    turn, or one number) that no other measurably beats (:func:`undominated`), the one nearest the
    background divisor (in log2), then the smaller. A sweep that cannot tell candidates apart keeps
    the background."""
    return min(undominated(scores, parts), key=lambda c: (abs(math.log2(c) - math.log2(background)), c))


def _convert_candidate(src: Path, out: Path, s: DetectSettings, scales, keep: np.ndarray | None) -> None:
    """`src` with the candidate's divisors; `keep` (top-k per head, the same k everywhere) as 0/1
    scores, which topk_mask turns back into exactly `keep`."""
    from dpe_gguf.convert import convert
    k = None if keep is None else int(keep[0, 0].sum())
    convert(src, out, DPEParams(window=s.window, group_scales=scales, topk=k, target_context=s.target),
            scores=None if keep is None else keep.astype(np.float64), force=True, progress=False)


def format_detection(cal: Calibration, L: int) -> str:
    """The per-group table (mean scores) and why each divisor won."""
    prior = background_divisor(cal.target, L)
    bg = cal.background or prior
    first = next(iter(cal.detection.values()))
    parts = len(parse_tasks(cal.settings.get("task", "multi_needle")))
    lines = []
    if cal.uniform:
        means = {c: float(np.mean(v)) for c, v in cal.uniform.items()}
        lines.append("uniform sweep (every group the same divisor: Self-Extend): "
                     + "  ".join(f"d={c} {v:.2f}" for c, v in means.items())
                     + f"  -> background {bg}:" + _why(cal.uniform, prior, "2T/L", parts))
    lines.append(f"{'group':>5}  " + "  ".join(f"{'d=' + c:>6}" for c in first) + "   chosen  why")
    for g, by in cal.detection.items():
        chosen = cal.group_scales[int(g)]
        per = cal.per_prompt.get(g) or {c: [v] for c, v in by.items()}
        lines.append(f"{g:>5}  " + "  ".join(f"{v:>6.2f}" for v in by.values()) + f"   {chosen:>6} "
                     + _why(per, bg, "the background", parts))
    lines.append(f"(other groups held at divisor {bg}" + (" = 2T/L" if bg == prior else " (best uniform)")
                 + " while one group is swept; scores: mean log-probability of the answer, higher is better)")
    return "\n".join(lines)


def _why(per: dict, prior: int, prior_name: str, parts: int = 1) -> str:
    arrays = {c: np.atleast_1d(np.asarray(v, dtype=np.float64)) for c, v in per.items()}
    best = _best_mean(arrays)
    keep = undominated(arrays, parts)
    by = " on any task" if parts > 1 and len(arrays[best]) > 1 else ""
    if keep == [best]:
        return f" best mean {arrays[best].mean():.2f}, clearly"
    if len(keep) == 1:
        return f" the only candidate no other measurably beats{by} (best mean: d={best})"
    return (f" best mean {arrays[best].mean():.2f} (d={best}); not measurably beaten{by}: "
            f"{', '.join(f'd={c}' for c in keep)}; the one nearest {prior_name} ({prior}) wins")


def calibrate(model: str | Path, target: int, window: int | None = None, topk: int | None = None,
              n_groups: int = DEFAULT_GROUPS, text: Path | None = None, sel_samples: int = 4,
              sel_tokens: int = 2048, task: str = "multi_needle", trials: int | None = None, seed: int = 0,
              quick: bool = False, ngl: int | None = None, scales: tuple[int, ...] | None = None,
              select_frequencies: bool = True, scorer: str = "logprob", scores: Any = None, parallel: int = 1,
              background: str = "fixed", quiet: bool = False) -> Calibration:
    """Run selection and detection for `model`: detection is skipped when `scales` are given,
    selection when `scores` are (an array or .npy file, as `convert --scores` takes)."""
    from dpe_gguf.runtime import default_ngl
    from dpe_gguf.selection import default_topk
    model = Path(model)
    info = read_model_info(model)
    L = info.context_length
    window = window if window is not None else default_window(L)
    topk = topk if topk is not None else default_topk(info.n_freq)
    ngl = default_ngl() if ngl is None else ngl
    trials = trials if trials is not None else (2 if quick else 5)
    check_extension(target, window, L)
    task = ",".join(parse_tasks(task))
    if background not in ("fixed", "uniform"):
        raise DPEError(f"background {background!r}: fixed (2T/L) or uniform (the best uniform divisor)")
    t0 = time.time()
    sha = file_sha256(model)
    settings = dict(target=target, window=window, topk=topk, n_groups=n_groups, text=str(text) if text else None,
                    sel_samples=sel_samples, sel_tokens=sel_tokens, task=task, trials=trials, seed=seed,
                    quick=quick, select=select_frequencies, scorer=scorer, background=background)
    given = None
    if scores is not None:
        from dpe_gguf.convert import load_scores
        scores = load_scores(scores, info)     # folded, checked against the model
        given = hashlib.sha256(np.ascontiguousarray(scores, dtype=np.float64).tobytes()).hexdigest()
        settings["select"] = "given scores"
    # measurements are keyed by candidate table inside the file, so quick and full runs, and either
    # background, share one cache ("cache": 3 since the prompts come from the calibration stream)
    shared = {k: v for k, v in settings.items() if k not in ("quick", "background")}
    tag = hashlib.sha256(json.dumps({**shared, "sha": sha, "scores": given, "cache": 3},
                                    sort_keys=True).encode()).hexdigest()[:16]
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
                           quick=quick, ngl=ngl, scorer=scorer, parallel=parallel, background=background)
        d = detect(model, keep, s, cache, quiet)
        scales, found = d.scales, dict(detection=d.means(), background=d.background,
                                       uniform={str(c): v for c, v in d.uniform.items()},
                                       per_prompt={str(g): {str(c): v for c, v in by.items()}
                                                   for g, by in d.groups.items()})
    else:
        found = {}
    return Calibration(model_sha256=sha, target=target, window=window, topk=topk, group_scales=tuple(scales),
                       scores=None if scores is None else scores.tolist(), settings=settings,
                       seconds=round(time.time() - t0, 1), **found)


# ---------------------------------------------------------------------------------------------
# `dpe-gguf convert` without divisors: calibrate where a GPU is, else the table calibration starts from

DEFAULT_TARGET_FACTOR = 4   # no --target-context: 4 x the trained context

# What the uncalibrated table measured where it has been measured: on SmolLM2-135M-Instruct (L = 8192)
# at T = 32768 the rule gives divisor 8 = 2T/L on every frequency, window 1024 = default_window(8192):
# docs/RESULTS.md, evaluation suite, rows "Self-Extend divisor 8" (passkey and multi-needle, 20 trials,
# H100) and "vanilla" (stock llama.cpp); calibration: row "DPE calibrated for 32k (third session)".
UNIFORM_MEASURED = (
    "on SmolLM2-135M, H100, 20 trials, this rule (divisor 8 = 2*32768/8192 on every frequency, window 1024) "
    "retrieved the passkey 17/20 at 16k and 8/20 at 32k tokens and multi-needle 0.50 at 16k and 0.25 at 32k "
    "(stock llama.cpp: 0/20 and 0.00 at both; docs/RESULTS.md)")
CALIBRATED_MEASURED = (
    "on SmolLM2 a calibration for 32k (--task passkey,multi_needle --trials 10) raised multi-needle at 32k "
    "to 0.55 and lowered passkey at 32k to 4/20")


@dataclass
class ConvertChoice:
    """The parameters `dpe-gguf convert` writes when it is given no divisors (no --scales, no
    --from-calibration), and what to tell the user about them."""
    params: DPEParams
    scores: np.ndarray | None   # selection scores for params.topk; None: every frequency scaled
    calibrated: bool
    message: str                # what was chosen, how good it measured, how to improve it


def choose_params(model: str | Path, output: str | Path | None = None, force: bool = False,
                  target: int | None = None, window: int | None = None, calibrate_now: bool | None = None,
                  topk: int | None = None, scores: Any = None, quick: bool = False, parallel: int = 1,
                  quiet: bool = False) -> ConvertChoice:
    """Divisors for `model` when the user gave none.

    ``target`` defaults to ``DEFAULT_TARGET_FACTOR`` x the trained context L, ``window`` to
    :func:`default_window`. ``calibrate_now``: True calibrates (:func:`calibrate`, default settings,
    on the CPU too: slow but allowed), False writes at once the table detection starts from (every
    group at :func:`background_divisor` 2T/L, every frequency scaled: Self-Extend), None chooses: a
    given ``target`` calibrates (what ``--target-context T`` always did); with no target it
    calibrates where :func:`dpe_gguf.runtime.gpu_present` finds a GPU, else writes the uniform table.

    The limit: a calibration expected to take over 30 minutes is not started unasked. The estimate is
    "no GPU means too long": the default calibration scores about 200 prompts of T tokens (41
    candidate tables x 5 prompts at T = 4L = 32k), and SmolLM2-135M, the embedded model, prefills
    about 430 tokens/s on 2 CPU cores at 2k (slower at longer prompts): over 4 hours at 32k. On an
    H100 it takes minutes (a --quick run 224 s; 1.3 s per 32k prompt with -j 8; docs/RESULTS.md).

    The output is checked (:func:`dpe_gguf.convert.check_output`) before any time is spent.
    ``topk``/``scores`` select frequencies as `convert --topk/--scores` do (calibration measures them
    when not given; the uniform table scales every frequency unless ``topk`` is given).
    """
    from dpe_gguf import runtime
    from dpe_gguf.convert import check_output
    from dpe_gguf.selection import default_topk
    model = Path(model)
    info = read_model_info(model)
    L = info.context_length
    given = [f"--target-context {target}"] if target is not None else []
    given += [f"--window {window}"] if window is not None else []
    given += [] if calibrate_now is None else ["--calibrate" if calibrate_now else "--no-calibrate"]
    how = f"dpe-gguf convert {' '.join(given)}" if given else "dpe-gguf convert: no options"
    if calibrate_now is not None:
        why = "--calibrate" if calibrate_now else "--no-calibrate"
    elif target is not None:
        calibrate_now, why = True, "--target-context given"
    else:
        calibrate_now, why = runtime.gpu_present()
    if target is None:
        target = DEFAULT_TARGET_FACTOR * L
        _say(f"target context {target} tokens = {DEFAULT_TARGET_FACTOR} x the trained {L} "
             "(--target-context T chooses another)", quiet)
    window = default_window(L) if window is None else window
    check_extension(target, window, L)
    check_output(model, output, force)          # refuse before spending any time
    if calibrate_now:
        _say(f"calibrating for {target} tokens ({why}); --no-calibrate writes the uniform table at once", quiet)
        cal = calibrate(model, target, window=window, topk=topk, quick=quick, scores=scores, parallel=parallel,
                        quiet=quiet)
        p = cal.params()
        msg = (f"calibrated for {target} tokens in {cal.seconds:.0f} s ({why}): group scales "
               f"{','.join(map(str, cal.group_scales))}, window {cal.window}, top-k "
               f"{cal.topk if cal.scores is not None else 'all'}")
        return ConvertChoice(replace(p, calibration=f"{how}; calibrated ({why}): {p.calibration}"),
                             cal.score_array(), True, msg)

    bg = background_divisor(target, L)
    if scores is not None and topk is None:
        topk = default_topk(info.n_freq)     # as calibrate() does with given scores
    scaled = "every frequency"
    if topk is not None:
        scaled = f"the top {topk} frequencies per KV head"
        if scores is None:
            scores, measured = measure_selection(model, topk, quiet)
            scaled += f" ({measured})"
    params = DPEParams(window=window, group_scales=(bg,) * min(DEFAULT_GROUPS, info.n_freq), topk=topk,
                       target_context=target,
                       calibration=f"{how}; uniform background divisor {bg} = 2T/L on {scaled} (Self-Extend), "
                                   f"window {window}, target {target}; not calibrated: {why}")
    q = shlex.quote
    o = f" -o {q(str(output))}" if output is not None else ""
    w = f" --window {window}" if window != default_window(L) else ""
    msg = "\n".join([
        f"not calibrated, {why}: divisor {bg} = 2T/L on {scaled} beyond a window of {window} tokens "
        f"(Self-Extend), for a target of {target} tokens ({target / L:g} x the trained {L}).",
        f"Measured: {UNIFORM_MEASURED}.",
        "To calibrate the groups for this model on a GPU (a CUDA build of dpe-gguf; on a CPU, --calibrate "
        f"does it too, slowly: its prompts are {target} tokens long):",
        f"  dpe-gguf convert {q(str(model))}{o} --target-context {target}{w} --force",
        f"  or: dpe-gguf calibrate {q(str(model))} --target-context {target}{w} -o calibration.json, then "
        f"dpe-gguf convert {q(str(model))}{o} --from-calibration calibration.json --force",
        f"Calibration is not better on every task: {CALIBRATED_MEASURED} (docs/RESULTS.md).",
    ])
    return ConvertChoice(params, scores, False, msg)


def measure_selection(model: str | Path, topk: int, quiet: bool = False) -> tuple[np.ndarray, str]:
    """Selection scores for `convert --topk K` without --scores (4 texts x min(2048, L) tokens of the
    shipped text, seed 0), and those words for the dpe.calibration note."""
    from dpe_gguf.runtime import default_ngl
    n_tokens = min(2048, read_model_info(model).context_length)
    scores = select(Path(model), None, 4, n_tokens, 0, default_ngl(), quiet)
    return scores, f"selection top-{topk} measured on the shipped text (4 x {n_tokens} tokens, seed 0)"
