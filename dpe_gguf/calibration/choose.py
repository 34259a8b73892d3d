"""What ``dpe-gguf convert`` writes when it is given no divisors: a calibration where a GPU is, else the
table calibration starts from (every group at 2T/L: Self-Extend), and what to tell the user about it."""
from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dpe_gguf.calibration.calibrate import calibrate
from dpe_gguf.calibration.report import say
from dpe_gguf.calibration.selection import default_topk
from dpe_gguf.calibration.settings import DEFAULT_GROUPS, background_divisor, check_extension, default_window
from dpe_gguf.calibration.sweep import select
from dpe_gguf.errors import DPEError
from dpe_gguf.format.convert import check_output
from dpe_gguf.format.model_info import read_model_info
from dpe_gguf.format.params import DPEParams
from dpe_gguf.llama import runtime

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
                  quiet: bool = False, on_calibrate: Callable[[], None] | None = None) -> ConvertChoice:
    """Divisors for `model` when the user gave none.

    ``target`` defaults to ``DEFAULT_TARGET_FACTOR`` x the trained context L, ``window`` to
    :func:`default_window`. ``calibrate_now``: True calibrates (:func:`calibrate`, default settings,
    on the CPU too: slow but allowed), False writes at once the table detection starts from (every
    group at :func:`background_divisor` 2T/L, every frequency scaled: Self-Extend), None chooses: a
    given ``target`` calibrates (what ``--target-context T`` always did); with no target it
    calibrates where :func:`dpe_gguf.llama.runtime.gpu_present` finds a GPU, else writes the uniform table.

    The limit: a calibration expected to take over 30 minutes is not started unasked. The estimate is
    "no GPU means too long": the default calibration scores about 200 prompts of T tokens (41
    candidate tables x 5 prompts at T = 4L = 32k), and SmolLM2-135M, the embedded model, prefills
    about 430 tokens/s on 2 CPU cores at 2k (slower at longer prompts): over 4 hours at 32k. On an
    H100 it takes minutes (a --quick run 224 s; 1.3 s per 32k prompt with -j 8; docs/RESULTS.md).

    The output is checked (:func:`dpe_gguf.format.convert.check_output`) before any time is spent.
    ``topk``/``scores`` select frequencies as `convert --topk/--scores` do (calibration measures them
    when not given; the uniform table scales every frequency unless ``topk`` is given).
    ``on_calibrate`` is called once calibration is decided on, before it starts (the CLI then says, if
    interrupted, that the scores measured so far are cached).
    """
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
        say(f"target context {target} tokens = {DEFAULT_TARGET_FACTOR} x the trained {L} "
             "(--target-context T chooses another)", quiet)
    window = default_window(L) if window is None else window
    check_extension(target, window, L)
    check_output(model, output, force)          # refuse before spending any time
    if calibrate_now:
        say(f"calibrating for {target} tokens ({why}); --no-calibrate writes the uniform table at once", quiet)
        if on_calibrate is not None:
            on_calibrate()
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


def given_scales(model: str | Path, output: str | Path | None, force: bool, window: int | None,
                 scales: tuple[int, ...], topk: int | None, scores: Any, target: int | None,
                 quiet: bool = False) -> tuple[DPEParams, Any]:
    """The parameters and scores of `dpe-gguf convert --scales`: the given group divisors, and with ``topk`` but
    no ``scores`` the selection scores measured (selection only, no detection), once the parameters and the
    output have been checked."""
    if window is None:
        raise DPEError("--scales needs --window W (the local window)")
    params = DPEParams(window=window, group_scales=scales, topk=topk, target_context=target)
    if topk is not None and scores is None:
        info = read_model_info(model)
        params.check_for_model(info.n_freq, info.context_length, model)   # before measuring
        check_output(model, output, force)
        scores, measured = measure_selection(model, topk, quiet)
        params = replace(params, calibration=f"dpe-gguf convert: given group scales; {measured}")
    return params, scores


def measure_selection(model: str | Path, topk: int, quiet: bool = False) -> tuple[np.ndarray, str]:
    """Selection scores for `convert --topk K` without --scores (4 texts x min(2048, L) tokens of the
    shipped text, seed 0), and those words for the dpe.calibration note."""
    n_tokens = min(2048, read_model_info(model).context_length)
    scores = select(Path(model), None, 4, n_tokens, 0, runtime.default_ngl(), quiet)
    return scores, f"selection top-{topk} measured on the shipped text (4 x {n_tokens} tokens, seed 0)"
