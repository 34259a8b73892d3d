"""The ``dpe-gguf`` command line: a thin layer over :mod:`dpe_gguf.format.convert`.

Exit codes: 0 success, 2 bad usage or a :class:`DPEError` (message ``dpe-gguf: error: ...``),
130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dpe_gguf.calibration.choose import DEFAULT_TARGET_FACTOR
from dpe_gguf.calibration.selection import DEFAULT_TOPK_FRACTION
from dpe_gguf.calibration.settings import (BACKGROUNDS, DEFAULT_GROUPS, DEFAULT_TASK, DEFAULT_TRIALS, QUICK_TRIALS,
                                           SCORERS)
from dpe_gguf.errors import DPEError
from dpe_gguf.evaluation import suite as evalsuite

PROG = "dpe-gguf"

_SCORES_HELP = """\
scores file: a NumPy .npy file (numpy.save) with one real contribution per (layer, KV head,
frequency), shape (n_layer, n_head_kv, F) where F = n_rot/2; query-head scores of shape
(n_layer, n_head, F) are folded into their KV head by summing. --topk K keeps the K
highest-scoring frequencies of each (layer, KV head) (ties: lower frequency wins); the others get
divisor 1."""

_EVAL_DESC = """\
Run every (method, length, task) through the patched llama.cpp (llama-server / llama-perplexity)
and print a table; write PREFIX.json (every trial) and PREFIX.png (accuracy vs length).

methods: vanilla (plain RoPE), linear (--rope-scaling linear), ntk (--rope-freq-base B*F^(d/(d-2))),
yarn (--rope-scaling yarn --yarn-orig-ctx L), selfextend (the DPE engine, every divisor F, window
--se-window), dpe (MODEL's own DPE table, or --dpe-model). F is auto: the smallest power of two
>= max(4, length / L), or fixed with NAME:F (e.g. yarn:8).

example:
  dpe-gguf eval model.gguf --dpe-model model.dpe.gguf --tasks passkey,multi_needle --lengths 4k,16k,32k --trials 20
"""

_CONVERT_EPILOG = f"""\
examples:
  {PROG} convert model.gguf                 # target 4 x the trained context L, window min(1024, L/8)
  {PROG} convert model.gguf --window 1024 --scales 2,2,4,4,8,8,16,16

Without --scales or --from-calibration, convert calibrates the divisors for the target (default
4 x L) where a GPU is (CUDA build and a device), as `{PROG} calibrate` with its default settings does;
without a GPU (the calibration would take hours) it writes at once the table calibration starts
from: divisor 2T/L on every frequency (Self-Extend), and prints how to calibrate it on a GPU.
--calibrate / --no-calibrate force either; --target-context T alone calibrates. dpe.calibration
(shown by `{PROG} inspect`) records which happened.

The divisor of frequency f (f = 0..F-1, F = n_rot/2) is scales[floor(f*G/F)] with G the number of
scales. --scales 4 alone is uniform divisor 4 (Self-Extend with group size 4).

{_SCORES_HELP}"""


def _version_text() -> str:
    """Package version, pinned llama.cpp commit, patch series, CUDA on or off."""
    from dpe_gguf.llama.info import version_text
    return version_text()


class _VersionAction(argparse.Action):
    """--version: print the build facts line by line (argparse's own action rewraps them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_text())
        parser.exit(0)


def _parse_scales(text: str) -> tuple[int, ...]:
    """``"2,2,4,4"`` -> (2, 2, 4, 4); a non-integer entry is a DPEError."""
    items = [s.strip() for s in text.split(",")]
    scales = []
    for item in items:
        try:
            scales.append(int(item, 10))
        except ValueError:
            raise DPEError(f"--scales: {item!r} is not an integer; divisors are whole numbers >= 1, "
                           "e.g. --scales 2,2,4,4,8,8,16,16") from None
    return tuple(scales)


def cmd_convert(args: argparse.Namespace) -> int:
    """``dpe-gguf convert``."""
    from dpe_gguf.format.convert import convert

    scores, message = args.scores, None
    if args.calibrate is not None and (args.scales is not None or args.from_calibration):
        raise DPEError(f"--{'' if args.calibrate else 'no-'}calibrate chooses how divisors are found when none "
                       "are given; drop it, or drop --scales / --from-calibration")
    if args.from_calibration:
        from dpe_gguf.calibration.result import Calibration
        cal = Calibration.load(args.from_calibration)
        params, scores = cal.params(), cal.score_array()
    elif args.scales is None:
        # no divisors given: calibrate (GPU, --calibrate or --target-context) or the uniform 2T/L table
        from dpe_gguf.calibration.choose import choose_params

        def calibrating() -> None:
            args.kept_on_interrupt = ("no model was written; the calibration's scores measured so far are cached, and "
                                      "the same command resumes from them")
        choice = choose_params(args.input, args.output, args.force, target=args.target_context, window=args.window,
                               calibrate_now=args.calibrate, topk=args.topk, scores=args.scores, quick=args.quick,
                               parallel=_parallel(args), quiet=args.quiet, on_calibrate=calibrating)
        params, scores, message = choice.params, choice.scores, choice.message
    else:
        from dpe_gguf.calibration.choose import given_scales
        params, scores = given_scales(args.input, args.output, args.force, args.window, _parse_scales(args.scales),
                                      args.topk, scores, args.target_context, args.quiet)
    if args.calibration:
        params = dataclasses.replace(params, calibration=args.calibration)
    out = convert(args.input, args.output, params=params, scores=scores, force=args.force,
                  progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}")
        if message:
            print(message)
    return 0


def _parallel(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        raise DPEError("--parallel must be at least 1")
    return args.parallel


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``dpe-gguf calibrate``."""
    from pathlib import Path

    from dpe_gguf.calibration.calibrate import calibrate
    from dpe_gguf.calibration.report import format_detection
    from dpe_gguf.format.model_info import read_model_info
    out = Path(args.output)
    if out.exists() and not args.force:
        raise DPEError(f"{out} exists; pass --force to overwrite it")
    scales = _parse_scales(args.scales) if args.scales else None
    args.kept_on_interrupt = "the scores measured so far are cached; the same command resumes from them"
    cal = calibrate(args.model, args.target_context, window=args.window, topk=args.topk, n_groups=args.groups,
                    text=Path(args.text) if args.text else None, trials=args.trials, seed=args.seed,
                    quick=args.quick, ngl=args.ngl, scales=scales, select_frequencies=not args.no_select,
                    task=args.task, scorer=args.scorer, parallel=_parallel(args), background=args.background,
                    quiet=args.quiet)
    cal.save(out)
    if cal.detection:
        print(format_detection(cal, read_model_info(args.model).context_length))
    print(f"group scales: {','.join(map(str, cal.group_scales))}  window {cal.window}  top-k "
          f"{cal.topk if cal.scores is not None else 'all'}  ({cal.seconds:.0f} s)")
    print(f"wrote {out}; `{PROG} convert {args.model} --from-calibration {out}` writes the DPE GGUF")
    return 0


def cmd_strip(args: argparse.Namespace) -> int:
    """``dpe-gguf strip``."""
    from dpe_gguf.format.convert import strip

    out = strip(args.input, args.output, force=args.force, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from dpe_gguf.models import default_model
    print(default_model())
    return 0


def cmd_lib_path(args: argparse.Namespace) -> int:
    from dpe_gguf.llama.native import LIB_DIR
    if not LIB_DIR.is_dir():
        raise DPEError(f"{LIB_DIR} does not exist: install dpe-gguf with `pip install .`")
    print(LIB_DIR)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``dpe-gguf inspect``."""
    from dpe_gguf.format.convert import inspect

    info = inspect(args.file, include_table=args.plot is not None)
    if args.plot is not None:
        if info["dpe"] is None:
            raise DPEError(f"{args.file}: has no DPE table to plot; convert it first")
        import numpy as np

        from dpe_gguf.evaluation.plot import plot_divisor_table

        dpe = info["dpe"]
        title = (f"{info['architecture']} {args.file}: w={dpe['window']}, scales "
                 f"{','.join(map(str, dpe['group_scales']))}, top-{dpe['topk']}/{info['n_freq']}")
        plot_divisor_table(np.asarray(dpe.pop("table"), dtype=np.float32), args.plot, title)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(_format_inspect(info))
        if args.plot is not None:
            print(f"plot: {args.plot}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dpe_gguf.llama.runtime import RunSettings, default_ngl, env_threads
    from dpe_gguf.models import default_model
    model = Path(args.model) if args.model else default_model()
    out = Path(args.out)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    for p in (json_path, png_path):
        if p.exists() and not args.force:
            raise DPEError(f"{p} exists; pass --force to overwrite it or choose another --out")
    cfg = evalsuite.EvalConfig(
        model=model, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        lengths=[evalsuite.parse_length(x) for x in args.lengths.split(",") if x.strip()],
        methods=[evalsuite.MethodSpec.parse(m) for m in args.methods.split(",") if m.strip()],
        trials=args.trials, seed=args.seed, dpe_model=Path(args.dpe_model) if args.dpe_model else None,
        text=Path(args.text) if args.text else None, se_window=args.se_window,
        settings=RunSettings(ngl=default_ngl() if args.ngl is None else args.ngl, flash_attn=args.fa == "on",
                             threads=args.threads or env_threads()),
        ppl_chunks=args.ppl_chunks, parallel=_parallel(args), dpe_label=args.dpe_label)
    if cfg.settings.ngl == 0:
        print(f"{PROG}: running on the CPU (no CUDA in this build or -ngl 0): long contexts are slow; "
              "a CUDA build runs the full table in minutes", file=sys.stderr)
    rows: list[dict] = []

    def save(row: dict) -> None:
        rows.append(row)
        evalsuite.write_json(json_path, cfg, rows)  # partial results survive an interruption
        args.kept_on_interrupt = f"the rows finished so far are in {json_path}"
    rows = evalsuite.run_eval(cfg, on_row=save, progress=not args.quiet)   # in table order (methods may finish in any order)
    evalsuite.write_json(json_path, cfg, rows)
    summary = evalsuite.summarize(rows)
    print(evalsuite.format_tables(summary))
    try:
        evalsuite.plot(summary, png_path, title=f"{model.name}: {', '.join(cfg.label(m) for m in cfg.methods)}")
    except ImportError:
        print(f"{PROG}: matplotlib is missing: no plot (`dpe-gguf report {json_path} --plot X.png` "
              "draws it where matplotlib is installed)", file=sys.stderr)
        print(f"wrote {json_path}")
        return 0
    print(f"wrote {json_path} and {png_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    rows: list[dict] = []
    for f in args.runs:
        try:
            rows += evalsuite.load_rows(Path(f))
        except (OSError, ValueError, KeyError) as e:
            raise DPEError(f"{f}: not a results file of `dpe-gguf eval` ({e})") from None
    summary = evalsuite.summarize(rows)
    print(evalsuite.format_tables(summary))
    if args.plot:
        evalsuite.plot(summary, Path(args.plot), title=args.title or "")
        print(f"wrote {args.plot}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dpe_gguf.evaluation.demo import run_demo
    return run_demo(length=args.length, depth=args.depth, seed=args.seed, ngl=args.ngl, quiet=args.quiet)


def _format_inspect(info: dict[str, Any]) -> str:
    rows = [
        ("file", info["file"]),
        ("architecture", info["architecture"]),
        ("trained context", info["context_length"]),
        ("layers", info["n_layer"]),
        ("heads (query / KV)", f"{info['n_head']} / {info['n_head_kv']}"),
        ("head size / n_rot", f"{info['head_dim']} / {info['n_rot']} (F = {info['n_freq']} frequencies)"),
        ("rope type", info["rope_type"].upper()
         + ("" if info["dpe_supported"] else "  (not supported by DPE)")),
        ("rope freq base / scale", f"{info['freq_base']:g} / {info['freq_scale']:g}"),
        ("rope scaling", info["rope_scaling_type"] or "none"),
        ("rope_freqs tensor", "yes" if info["has_rope_freqs"] else "no"),
    ]
    dpe = info["dpe"]
    if dpe is None:
        rows.append(("DPE", "none"))
    else:
        rows += [
            ("DPE window", dpe["window"]),
            ("DPE contexts", f"trained {dpe['original_context_length']}, target {dpe['target_context_length']}"),
            ("DPE group scales", ",".join(map(str, dpe["group_scales"]))),
            ("DPE top-k", f"{dpe['topk']} of {info['n_freq']}"),
        ]
        if dpe["calibration"]:
            rows.append(("DPE calibration", dpe["calibration"]))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if dpe is not None:
        lines.append("")
        lines.append("group  frequencies  divisor")
        for g in dpe["groups"]:
            lines.append(f"{g['group']:>5}  {g['first_freq']:>5}..{g['last_freq']:<5}  {g['divisor']:>7}")
        if not dpe["table_matches_groups"]:
            lines.append("note: the table holds divisors other than 1 and its group's scale")
        lines.append("")
        lines.append(f"scaled frequencies (divisor > 1) per layer, per KV head (of {info['n_freq']}):")
        for layer, counts in enumerate(dpe["scaled_per_layer"]):
            lines.append(f"  layer {layer:>3}: " + " ".join(f"{c:>3}" for c in counts))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per verb."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="DPE (dimension-wise positional embedding manipulation) for GGUF models.")
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="show the package version, pinned llama.cpp commit, patch series and CUDA")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", help="add DPE parameters to a RoPE GGUF (writes a new file)",
                       description="Write a copy of IN with the DPE keys and divisor table added.\n"
                                   "Tensors are copied byte for byte; the input is never modified.",
                       epilog=_CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.gguf")
    p.add_argument("-o", "--output", metavar="OUT.gguf", help="output file (default: IN.dpe.gguf)")
    p.add_argument("--window", type=int, metavar="W",
                   help="local window: keys closer than W use ordinary RoPE (1 <= W < trained context; "
                        "default without --scales: min(1024, L/8))")
    p.add_argument("--scales", metavar="S0,...,S{G-1}",
                   help="integer position divisor (>= 1) of each of the G frequency groups; without it, "
                        "convert calibrates them or writes the uniform 2T/L table (see below)")
    p.add_argument("--from-calibration", metavar="FILE", help="parameters measured by `dpe-gguf calibrate`")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--calibrate", dest="calibrate", action="store_const", const=True, default=None,
                     help="without --scales: calibrate, also on a CPU (slow; the default only where a GPU is)")
    how.add_argument("--no-calibrate", dest="calibrate", action="store_const", const=False,
                     help="without --scales: write at once the uniform table calibration starts from "
                          "(divisor 2T/L on every frequency: Self-Extend)")
    p.add_argument("--quick", action="store_true", help=f"calibration: 3 divisors per group, {QUICK_TRIALS} trials")
    p.add_argument("-j", "--parallel", type=int, default=1, metavar="N",
                   help="calibration: measure N candidate tables at once (GPU; see `dpe-gguf calibrate`)")
    p.add_argument("--topk", type=int, metavar="K",
                   help="scale only the K highest-scoring frequencies per layer and KV head (the scores are "
                        "measured when --scores is not given)")
    p.add_argument("--scores", metavar="FILE", help="per-(layer, KV head, frequency) scores, .npy (see below)")
    p.add_argument("--target-context", type=int, metavar="T",
                   help="context the parameters are for; without --scales the target to calibrate for "
                        f"(default {DEFAULT_TARGET_FACTOR} x L), with --scales default (L - W + W//S) * S, "
                        "S = largest scale")
    p.add_argument("--calibration", metavar="TEXT", help="free-text note stored as dpe.calibration")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT if it exists; replace DPE parameters already in IN")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("calibrate", help="measure DPE parameters for a model (selection + detection)",
                       description="Key-frequency selection on ordinary text and per-group effective lengths "
                                   "by a multi-needle sweep at the target length, both through the patched "
                                   "llama.cpp (docs/design.md section 4). Results are cached by model sha256 "
                                   "and settings; an interrupted run resumes.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--target-context", type=int, required=True, metavar="T", help="context to calibrate for")
    p.add_argument("-o", "--output", default="calibration.json", metavar="FILE", help="(default calibration.json)")
    p.add_argument("--window", type=int, metavar="W", help="local window (default min(1024, L/8))")
    p.add_argument("--topk", type=int, metavar="K",
                   help=f"frequencies scaled per KV head (default {DEFAULT_TOPK_FRACTION:.0%}% of n_rot/2)")
    p.add_argument("--no-select", action="store_true", help="no selection: every frequency scaled")
    p.add_argument("--groups", type=int, default=DEFAULT_GROUPS, metavar="G",
                   help=f"frequency groups (default {DEFAULT_GROUPS})")
    p.add_argument("--scales", metavar="S0,...", help="skip detection: use these group divisors")
    p.add_argument("--task", default=DEFAULT_TASK, metavar="TASK[,TASK]",
                   help="detection task: multi_needle (default, 4 needles), passkey, or both joined by a "
                        "comma (every candidate scored on the prompts of each)")
    p.add_argument("--scorer", default=SCORERS[0], choices=SCORERS,
                   help="candidate score: mean log-probability of the answers (default, graded) or the "
                        "fraction retrieved by greedy decoding")
    p.add_argument("--trials", type=int, metavar="N",
                   help=f"prompts per task per candidate (default {DEFAULT_TRIALS}, quick {QUICK_TRIALS})")
    p.add_argument("--quick", action="store_true", help=f"3 divisors per group around 2T/L, {QUICK_TRIALS} trials")
    p.add_argument("--background", choices=BACKGROUNDS, default=BACKGROUNDS[0],
                   help="what the other groups hold while one is swept: fixed = 2T/L (docs/design.md section 4, "
                        "default); uniform = the best uniform divisor, found by a first sweep of uniform tables")
    p.add_argument("-j", "--parallel", type=int, default=1, metavar="N",
                   help="measure N candidate tables at once, each its own llama.cpp context (a GPU has room "
                        "for several with a small model; on a CPU they share the cores)")
    p.add_argument("--text", metavar="FILE", help="selection text (default: the shipped text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-ngl", "--ngl", type=int, default=None, help="layers on the GPU (default: all with CUDA)")
    p.add_argument("--force", action="store_true", help="overwrite the output file")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("inspect", help="describe a GGUF model and its DPE parameters",
                       description="Show architecture, trained context, heads, n_rot, rope type and, if "
                                   "present, the DPE parameters and divisor table.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print JSON for tools")
    p.add_argument("--plot", metavar="PNG", help="draw the divisor table as a heatmap")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("strip", help="remove DPE parameters (writes a new file)",
                       description="Write a copy of IN without the dpe.* keys and rope_dpe.weight.")
    p.add_argument("input", metavar="IN.dpe.gguf")
    p.add_argument("-o", "--output", metavar="OUT.gguf",
                   help="output file (default: IN with .dpe.gguf replaced by .gguf)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_strip)

    p = sub.add_parser("eval", help="evaluate DPE against vanilla, linear, NTK, YaRN and Self-Extend",
                       description=_EVAL_DESC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL.gguf", help="stock or DPE GGUF (default: embedded SmolLM2)")
    p.add_argument("--dpe-model", metavar="FILE", help="the DPE GGUF of method dpe when MODEL has no DPE parameters")
    p.add_argument("--dpe-label", default="dpe", metavar="NAME",
                   help="method dpe's name in the table and JSON (default dpe), e.g. to report two DPE tables together")
    p.add_argument("--tasks", default="passkey", help=f"comma list of {', '.join(evalsuite.TASKS)} (default: passkey)")
    p.add_argument("--lengths", default="4k,8k,16k,32k", help="context lengths in tokens, e.g. 4k,8k,16k,32k,64k")
    p.add_argument("--methods", default="vanilla,linear,ntk,yarn,selfextend,dpe",
                   help="comma list; NAME:FACTOR fixes the factor (default: auto, see above)")
    p.add_argument("--trials", type=int, default=evalsuite.DEFAULT_TRIALS,
                   help=f"samples per (task, length) (default {evalsuite.DEFAULT_TRIALS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", metavar="FILE", help="your own haystack/perplexity text (default: the shipped text)")
    p.add_argument("--se-window", type=int, default=evalsuite.DEFAULT_SE_WINDOW,
                   help=f"Self-Extend window (default {evalsuite.DEFAULT_SE_WINDOW})")
    p.add_argument("--ppl-chunks", type=int, default=1, help="windows per perplexity cell (default 1)")
    p.add_argument("-j", "--parallel", type=int, default=1, metavar="N",
                   help="run N methods at once, each its own llama-server (GPU: a small model leaves room; "
                        "6 ran together on one H100); on a CPU they share the cores")
    p.add_argument("-ngl", "--ngl", type=int, default=None, help="layers on the GPU (default: all with CUDA, else 0)")
    p.add_argument("-fa", "--fa", choices=("on", "off"), default="on", help="flash attention (default on)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: llama.cpp's)")
    p.add_argument("--out", default="dpe-eval", metavar="PREFIX", help="writes PREFIX.json and PREFIX.png")
    p.add_argument("--force", action="store_true", help="overwrite PREFIX.json/.png")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="tables and plot from results files of `dpe-gguf eval` (merged)",
                       description="Merge the rows of one or more PREFIX.json files written by `dpe-gguf eval` "
                                   "(e.g. methods run separately) and print the tables; --plot draws them.")
    p.add_argument("runs", nargs="+", metavar="RUN.json")
    p.add_argument("--plot", metavar="PNG", help="write the accuracy-vs-length plot here")
    p.add_argument("--title", help="plot title")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="stock vs DPE on the embedded SmolLM2, past its trained context",
                       description="Convert the embedded SmolLM2 (cached), hide a pass key in a prompt past "
                                   "its trained 8k context, ask stock llama.cpp and DPE, print both answers.")
    p.add_argument("--length", type=int, default=None, help="prompt tokens (default: 12288 on CPU, 32768 with CUDA)")
    p.add_argument("--depth", type=float, default=0.5, help="where the key sits, 0 = start, 1 = end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-ngl", "--ngl", type=int, default=None, help="layers on the GPU (default: all with CUDA, else 0)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("model", help="print the path of the embedded default model (SmolLM2-135M Q4_1)")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("lib-path", help="print the folder of the patched libllama (for LLAMA_CPP_LIB_PATH)")
    p.set_defaults(func=cmd_lib_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the command of parsed arguments; return the exit code. Split from :func:`main` so that a
    caller running many commands (the fuzz test) builds the parser once: building it costs more than
    most commands do."""
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DPEError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # a verb that keeps partial output sets args.kept_on_interrupt to say what and where
        kept = getattr(args, "kept_on_interrupt", None)
        print(f"{PROG}: interrupted; {kept or 'nothing was written'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
