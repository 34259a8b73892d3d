"""`dpe-gguf eval`: DPE against the context-extension methods users have today, side by side.

Every method is a way of running the same GGUF in the patched llama.cpp:

| method | how it runs |
| --- | --- |
| vanilla | the model as it is (plain RoPE; `--dpe off` for a DPE file) |
| linear | `--rope-scaling linear --rope-scale F` (position interpolation) |
| ntk | `--rope-freq-base B * F^(d / (d - 2))` (NTK-aware base scaling, d = rotated dims) |
| yarn | `--rope-scaling yarn --rope-scale F --yarn-orig-ctx L` |
| selfextend | the DPE engine with every divisor F and window `--se-window` (Self-Extend's grouped attention; stock llama.cpp's `--grp-attn-n 4/8` retrieved 0/5 passkeys at every length from 4k to 32k on SmolLM2 in the anchor measurements docs/RESULTS.md compares with) |
| dpe | the DPE GGUF's own table (the input when it has one, else `--dpe-model`) |

F is `auto` unless a method names it (`linear:8`): the smallest power of two that is at least
max(4, length / L), the settings of those anchor measurements (x4 up to 4L, x8 at 8L).

Tasks come from :mod:`dpe_gguf.evaluation.tasks` (seeded, reproducible); ``ppl`` is perplexity over
natural text at each length (llama-perplexity, second half of each window scored).
"""
from __future__ import annotations

import hashlib
import json
import math
import io
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from dpe_gguf.evaluation import tasks as evaltasks
from dpe_gguf.errors import DPEError
from dpe_gguf.format.gguf_stream import write_atomic
from dpe_gguf.format.model_info import ModelInfo, has_dpe, open_reader, read_model_info
from dpe_gguf.paths import cache_root
from dpe_gguf.llama.runtime import RunSettings, Server, context_cap_args, perplexity, token_counter

METHODS = ("vanilla", "linear", "ntk", "yarn", "selfextend", "dpe")
TASKS = (*evaltasks.TASKS, "ppl")
DEFAULT_TRIALS = 5        # samples per (task, length)
DEFAULT_SE_WINDOW = 1024  # Self-Extend's window when none is given
CACHE_DIR_NAME = "eval-models"


def parse_length(text: str) -> int:
    """'4k' -> 4096, '32768' -> 32768."""
    t = text.strip().lower()
    try:
        n = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise DPEError(f"bad length {text!r}: give tokens, e.g. 4096 or 4k") from None
    if n < 64:
        raise DPEError(f"length {text!r} is too short (at least 64 tokens)")
    return n


def auto_factor(length: int, context_length: int) -> int:
    need = max(4.0, length / context_length)
    return 1 << math.ceil(math.log2(need))


@dataclass(frozen=True)
class MethodSpec:
    """A method name with an optional fixed factor (`yarn:8`); factor None means auto per length."""
    name: str
    factor: int | None = None

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        name, _, f = text.strip().partition(":")
        if name not in METHODS:
            raise DPEError(f"unknown method {name!r}; methods: {', '.join(METHODS)} (optionally NAME:FACTOR)")
        if f and name in ("vanilla", "dpe"):
            raise DPEError(f"method {name} takes no factor")
        factor = None
        if f:
            try:
                factor = int(f)
            except ValueError:
                raise DPEError(f"bad factor in {text!r}: an integer >= 1") from None
            if factor < 1:
                raise DPEError(f"bad factor in {text!r}: an integer >= 1")
        return cls(name, factor)

    @property
    def label(self) -> str:
        return self.name if self.factor is None else f"{self.name}:{self.factor}"


@dataclass
class Resolved:
    """What one (method, length) runs: a model file and llama.cpp flags."""
    method: str
    factor: int | None
    model: Path
    args: list[str]

    @property
    def key(self) -> tuple:
        return (str(self.model), tuple(self.args))


class Methods:
    """Turns method names into llama.cpp runs for one input model (converting Self-Extend copies
    into a cache folder as needed)."""

    def __init__(self, model: str | Path, dpe_model: str | Path | None, cache_dir: Path,
                 se_window: int = DEFAULT_SE_WINDOW, progress: bool = True):
        self.model = Path(model)
        self.info: ModelInfo = read_model_info(self.model)
        self.input_has_dpe = has_dpe(open_reader(self.model))
        self.dpe_model = Path(dpe_model) if dpe_model else (self.model if self.input_has_dpe else None)
        if self.dpe_model is not None and not has_dpe(open_reader(self.dpe_model)):
            raise DPEError(f"{self.dpe_model} has no DPE parameters: convert it first (`dpe-gguf convert`)")
        self.cache_dir = cache_dir
        L = self.info.context_length
        self.se_window = se_window if se_window < L else L // 4
        self.progress = progress

    def context_args(self, n_ctx: int) -> list[str]:
        """llama-server caps a slot at the model's trained context (upstream, every method alike);
        raising the context_length metadata lifts the cap and changes no RoPE math (YaRN gets its
        original context explicitly)."""
        return context_cap_args(self.info.arch, n_ctx, self.info.context_length)

    def plain(self) -> tuple[Path, list[str]]:
        return self.model, (["--dpe", "off"] if self.input_has_dpe else [])

    def _input_tag(self) -> str:
        st = self.model.stat()
        h = hashlib.sha256(f"{self.model.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return h[:16]

    def selfextend_model(self, factor: int) -> Path:
        """A copy of the model with a uniform divisor table (cached)."""
        from dpe_gguf.format.convert import convert, strip
        from dpe_gguf.format.params import DPEParams
        folder = self.cache_dir / CACHE_DIR_NAME / self._input_tag()
        out = folder / f"selfextend-{factor}-w{self.se_window}.dpe.gguf"
        if out.exists():
            return out
        folder.mkdir(parents=True, exist_ok=True)
        src = self.model
        if self.input_has_dpe:
            src = folder / "stock.gguf"
            if not src.exists():
                strip(self.model, src, progress=False)
        convert(src, out, DPEParams(window=self.se_window, group_scales=(factor,),
                                    calibration=f"eval: uniform divisor {factor} (Self-Extend)"),
                progress=False)
        return out

    def resolve(self, spec: MethodSpec, length: int) -> Resolved:
        L = self.info.context_length
        factor = spec.factor or auto_factor(length, L)
        if spec.name == "vanilla":
            m, a = self.plain()
            return Resolved("vanilla", None, m, a)
        if spec.name == "linear":
            m, a = self.plain()
            return Resolved(spec.name, factor, m, a + ["--rope-scaling", "linear", "--rope-scale", str(factor)])
        if spec.name == "ntk":
            m, a = self.plain()
            d = self.info.n_rot
            base = self.info.freq_base * factor ** (d / (d - 2))
            return Resolved(spec.name, factor, m, a + ["--rope-freq-base", f"{base:.1f}"])
        if spec.name == "yarn":
            m, a = self.plain()
            return Resolved(spec.name, factor, m, a + ["--rope-scaling", "yarn", "--rope-scale", str(factor),
                                                       "--yarn-orig-ctx", str(L)])
        if spec.name == "selfextend":
            return Resolved(spec.name, factor, self.selfextend_model(factor), [])
        if spec.name == "dpe":
            if self.dpe_model is None:
                raise DPEError(f"method dpe needs a DPE model: {self.model} has no DPE parameters; pass "
                               "--dpe-model FILE (from `dpe-gguf convert`) or evaluate the DPE file itself")
            return Resolved("dpe", None, self.dpe_model, [])
        raise AssertionError(spec)


@dataclass
class EvalConfig:
    model: Path
    tasks: list[str]
    lengths: list[int]
    methods: list[MethodSpec]
    trials: int = DEFAULT_TRIALS
    seed: int = 0
    dpe_model: Path | None = None
    text: Path | None = None
    se_window: int = DEFAULT_SE_WINDOW
    settings: RunSettings = field(default_factory=RunSettings)
    cache_dir: Path = field(default_factory=cache_root)
    ppl_chunks: int = 1
    parallel: int = 1        # methods run at the same time (each its own llama-server)
    dpe_label: str = "dpe"   # method dpe's name in rows and tables (tell two DPE tables apart in one report)

    def label(self, spec: MethodSpec) -> str:
        return self.dpe_label if spec.name == "dpe" else spec.label


def _check(cfg: EvalConfig) -> None:
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad:
        raise DPEError(f"unknown task(s) {', '.join(bad)}; tasks: {', '.join(TASKS)}")
    if cfg.trials < 1:
        raise DPEError("--trials must be at least 1")
    if not cfg.methods or not cfg.lengths or not cfg.tasks:
        raise DPEError("need at least one method, length and task")
    labels = [cfg.label(m) for m in cfg.methods]
    if not cfg.dpe_label.strip() or len(set(labels)) < len(labels):
        raise DPEError(f"method names must be distinct and not empty: {', '.join(labels)}")


def make_all_samples(cfg: EvalConfig, count: Callable[[str], int], haystack: str) -> dict:
    """{(task, length): [Sample]} for every generation task."""
    out = {}
    for task in cfg.tasks:
        if task == "ppl":
            continue
        for n in cfg.lengths:
            try:
                out[(task, n)] = evaltasks.make_samples(task, n, cfg.trials, cfg.seed, count, haystack)
            except ValueError as e:
                raise DPEError(f"{task} at {n} tokens: {e}") from None
    return out


def _ppl_text(path: Path, haystack: str, count: Callable[[str], int], n_ctx: int, chunks: int) -> Path:
    """About llama-perplexity's 2 * n_ctx tokens of the haystack, repeated if it is shorter (only the
    first `chunks` windows are scored; they repeat nothing while the haystack is longer than them)."""
    need = max(2, chunks) * n_ctx + 256
    chars_per_token = len(haystack) / max(count(haystack), 1)
    n_chars = int(need * chars_per_token * 1.1) + 1
    text = ("\n\n".join([haystack] * (n_chars // len(haystack) + 1)))[:n_chars]
    path.write_text(text)
    return path


def run_eval(cfg: EvalConfig, on_row: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
    """Run every (method, length, task, trial); return one row per trial (and per ppl cell)."""
    _check(cfg)
    haystack = evaltasks.load_haystack(cfg.text)
    methods = Methods(cfg.model, cfg.dpe_model, cfg.cache_dir, cfg.se_window)
    # Prompts are sized with the model's own tokenizer (llama-server's /tokenize).
    with token_counter(cfg.model, cfg.settings.threads) as count:
        samples = make_all_samples(cfg, count, haystack)
        ppl_files = {}
        tmp = None
        if "ppl" in cfg.tasks:
            import tempfile
            tmp = Path(tempfile.mkdtemp(prefix="dpe-eval-ppl-"))
            for n in cfg.lengths:
                ppl_files[n] = _ppl_text(tmp / f"text-{n}.txt", haystack, count, n, cfg.ppl_chunks)

    gen_tasks = [t for t in cfg.tasks if t != "ppl"]
    total = len(cfg.methods) * len(cfg.lengths) * (len(gen_tasks) * cfg.trials + ("ppl" in cfg.tasks))
    from tqdm import tqdm
    bar = tqdm(total=total, disable=not progress, unit="run", file=sys.stderr, dynamic_ncols=True)
    rows: list[dict] = []
    lock = threading.Lock()
    # resolved up front, in this thread: Self-Extend copies are converted once, never concurrently
    resolved = {(spec, n): methods.resolve(spec, n) for spec in cfg.methods for n in cfg.lengths}

    def emit(row: dict) -> None:
        with lock:
            rows.append(row)
            if on_row:
                on_row(row)
            bar.update(1)

    def run_method(spec: MethodSpec) -> None:
        for n in cfg.lengths:
            r = resolved[(spec, n)]
            with lock:
                bar.set_postfix_str(f"{cfg.label(spec)} @ {n}")
            common = dict(method=cfg.label(spec), factor=r.factor, model=r.model.name, args=" ".join(r.args), length=n)
            if gen_tasks:
                max_new = max(s.max_tokens for t in gen_tasks for s in samples[(t, n)])
                n_ctx = n + max_new + 64
                with Server(r.model, n_ctx, r.args + methods.context_args(n_ctx), cfg.settings) as srv:
                    for task in gen_tasks:
                        for s in samples[(task, n)]:
                            t0 = time.time()
                            out = srv.complete(s.prompt, s.max_tokens)
                            emit(dict(common, task=task, trial=s.index, depth=s.depth,
                                      score=evaltasks.score(s, out["text"]), answers=list(s.answers),
                                      output=out["text"][:200], prompt_tokens=out["prompt_tokens"],
                                      seconds=round(time.time() - t0, 3)))
            if "ppl" in cfg.tasks:
                t0 = time.time()
                ppl, _ = perplexity(r.model, ppl_files[n], n, cfg.ppl_chunks, r.args, cfg.settings)
                emit(dict(common, task="ppl", trial=0, depth=None, score=ppl, answers=[], output="",
                          prompt_tokens=n, seconds=round(time.time() - t0, 3)))

    try:
        if cfg.parallel > 1 and len(cfg.methods) > 1:
            # one worker per method: each runs its own llama-server; a small model leaves a GPU idle
            # most of the time, so several methods at once finish the table sooner
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(max_workers=min(cfg.parallel, len(cfg.methods))) as pool:
                for f in [pool.submit(run_method, spec) for spec in cfg.methods]:
                    f.result()
        else:
            for spec in cfg.methods:
                run_method(spec)
    finally:
        bar.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    order = {cfg.label(m): i for i, m in enumerate(cfg.methods)}
    tasks = {t: i for i, t in enumerate(cfg.tasks)}
    rows.sort(key=lambda r: (order[r["method"]], r["length"], tasks[r["task"]], r["trial"]))
    return rows


# ---------------------------------------------------------------- reports

def summarize(rows: Iterable[dict]) -> dict:
    """{task: {method: {length: (mean score, n trials)}}}, in first-seen order."""
    acc: dict = {}
    for r in rows:
        cell = acc.setdefault(r["task"], {}).setdefault(r["method"], {}).setdefault(r["length"], [])
        cell.append(r["score"])
    return {t: {m: {n: (sum(v) / len(v), len(v)) for n, v in by_len.items()} for m, by_len in by_m.items()}
            for t, by_m in acc.items()}


def _len_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_tables(summary: dict) -> str:
    """Markdown tables, one per task: passkey cells as passed/trials, other tasks as mean score,
    perplexity as a number."""
    out = []
    for task, by_m in summary.items():
        lengths = sorted({n for by_len in by_m.values() for n in by_len})
        out.append(f"### {task}\n")
        out.append("| method | " + " | ".join(_len_label(n) for n in lengths) + " |")
        out.append("| --- |" + " --- |" * len(lengths))
        for m, by_len in by_m.items():
            cells = []
            for n in lengths:
                if n not in by_len:
                    cells.append("")
                    continue
                mean, k = by_len[n]
                if task == "ppl":
                    cells.append(f"{mean:.3g}")
                elif task == "passkey":
                    cells.append(f"{round(mean * k)}/{k}")
                else:
                    cells.append(f"{mean:.2f}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def method_colors(summary: dict) -> dict:
    """One colour per method, the same in every panel (methods in first-seen order over all tasks)."""
    import matplotlib
    methods = list(dict.fromkeys(m for by_m in summary.values() for m in by_m))
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot(summary: dict, path: Path, title: str = "") -> Path:
    """One panel per task: score (or perplexity, log scale) against context length, one line per
    method, each method one colour throughout; one legend of every method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    colors = method_colors(summary)
    tasks = list(summary)
    cols = min(3, len(tasks))
    rows_n = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.8 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for m, by_len in summary[task].items():
            xs = sorted(by_len)
            ax.plot(xs, [by_len[x][0] for x in xs], marker="o", label=m, color=colors[m])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for b in summary[task].values() for x in b}))
        ax.set_xticklabels([_len_label(x) for x in ax.get_xticks()])
        ax.set_xlabel("context length (tokens)")
        if task == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel("perplexity")
        else:
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel("accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.legend(handles=[Line2D([], [], color=c, marker="o", label=m) for m, c in colors.items()],
               loc="center right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))   # room on the right for the legend
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(Path(path), png.getvalue())


def write_json(path: Path, cfg: EvalConfig, rows: list[dict]) -> Path:
    meta = dict(model=str(cfg.model), dpe_model=str(cfg.dpe_model) if cfg.dpe_model else None,
                tasks=cfg.tasks, lengths=cfg.lengths, methods=[cfg.label(m) for m in cfg.methods], trials=cfg.trials,
                seed=cfg.seed, text=str(cfg.text) if cfg.text else None, se_window=cfg.se_window,
                parallel=cfg.parallel, settings=asdict(cfg.settings))
    return write_atomic(Path(path), json.dumps(dict(config=meta, rows=rows), indent=1).encode())


def load_rows(path: Path) -> list[dict]:
    """The rows of a results file written by :func:`write_json` (ValueError for anything else)."""
    data: Any = json.loads(Path(path).read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    need = {"task", "method", "length", "score"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and need <= r.keys() for r in rows):
        raise ValueError("no eval rows (task, method, length, score) in it")
    return rows
