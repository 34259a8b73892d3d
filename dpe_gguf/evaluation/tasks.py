"""Long-context retrieval tasks: seeded, reproducible prompts for raw completion, and their scores.

Five tasks, all plain text (no chat template), each asking the model to repeat numbers hidden in a
long prompt:

- ``passkey``: the classic passkey test (Landmark Attention, LongLM): a 5-digit key in a repeated
  filler passage ("The grass is green. ...").
- ``multi_needle``: four "special magic number" sentences for four different words hidden in
  natural text; the question asks for one of them.
- ``multi_key`` (as RULER's multi-key needle): eight such sentences whose keys are look-alike word
  pairs built from four words ("apple-river", "river-apple", ...); the question asks for one.
- ``multi_value`` (RULER's multi-value): four numbers for one and the same word; the question asks
  for all four.
- ``multi_query`` (RULER's multi-query): four words with a number each; the question asks for all.

Every prompt is sized to a target length in tokens with the caller's ``count(text) -> int`` (the
model's tokenizer): it never exceeds the target and falls short of it by at most
``max(16, target // 100)`` tokens. ``count`` is called a handful of times per prompt, not once per
unit of filler. A sample depends only on (task, length, n, seed, haystack, count).

The natural text of the haystack tasks is dpe_gguf/data/haystack.txt, made by
bench/make_haystack.py from the docstrings of the Python standard library (text distributed with
CPython under the Python Software Foundation License); ``load_haystack(path)`` reads a user's file
instead. Runs of five or more digits are removed from any haystack so that the needles' numbers
occur nowhere else in a prompt.
"""
from __future__ import annotations

import hashlib
import operator
import random
import re
from dataclasses import asdict, dataclass
from typing import Callable

from dpe_gguf.texts import load_haystack  # noqa: F401  (part of this module's API: the tasks' default haystack)

TASKS = ("passkey", "multi_needle", "multi_key", "multi_value", "multi_query")

MAX_TOKENS = {"passkey": 8, "multi_needle": 12, "multi_key": 12, "multi_value": 48, "multi_query": 48}

# passkey: the classic layout, one part per line
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                "them. I will quiz you about the important information there.")
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
FILLER = " ".join(FILLER_SENTENCES)
PASSKEY_INFO = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

# the natural-text tasks
INSTRUCTION_ONE = ("Some special magic numbers are hidden in the following text. Remember them; you "
                   "will be asked about one of them.")
INSTRUCTION_SOME = ("Some special magic numbers are hidden in the following text. Remember them; you "
                    "will be asked about some of them.")
NEEDLE = "The special magic number for {key} is: {value}."
NEEDLE_MV = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key}? The special magic number for {key} is:"
QUESTION_MV = ("What are all the special magic numbers for {key}? The special magic numbers for {key} "
               "are:")
QUESTION_MQ = "What are the special magic numbers for {keys}? The special magic numbers for {keys} are:"

# Simple nouns for the needles' keys; none is a substring of another, so a key names one needle.
WORDS = (
    "anchor", "apple", "arrow", "badge", "balloon", "banana", "basket", "beach", "bicycle", "blanket",
    "bottle", "bridge", "bucket", "butter", "cabin", "camera", "candle", "canyon", "carpet", "castle",
    "cherry", "chimney", "circus", "cloud", "compass", "cookie", "cotton", "desert", "diamond",
    "dolphin", "dragon", "drum", "eagle", "engine", "falcon", "feather", "fence", "forest",
    "fountain", "garden", "giraffe", "glacier", "guitar", "hammer", "harbor", "helmet", "honey",
    "island", "jacket", "jungle", "kettle", "kitten", "ladder", "lantern", "lemon", "library",
    "lizard", "magnet", "marble", "meadow", "mirror", "monkey", "mountain", "necklace", "needle",
    "ocean", "orchard", "owl", "paddle", "parrot", "pencil", "penguin", "pepper", "piano", "pillow",
    "planet", "pocket", "pumpkin", "puzzle", "quilt", "rabbit", "rainbow", "river", "rocket",
    "saddle", "sandal", "scarf", "shadow", "shovel", "silver", "spider", "squirrel", "statue",
    "tiger", "tomato", "tower", "trumpet", "tulip", "turtle", "umbrella", "valley", "violin",
    "wagon", "walnut", "whistle", "window", "wizard", "zebra",
)

# where a needle may go: after a run of newlines, or after the spaces that follow a sentence
_BOUNDARY = re.compile(r"\n+|(?<=[.!?]) +")
_LONG_DIGITS = re.compile(r"\d{5,}")
_WORD = re.compile(r"\S+")
_SNAP_WINDOW = 2000   # characters searched on each side of a needle's offset for a boundary
_MAX_STEPS = 40       # sizing: prompts built and counted at most, per sample


@dataclass(frozen=True)
class Sample:
    """One trial: a prompt to complete and the numbers the completion must contain."""
    task: str
    length: int                 # target length in tokens
    index: int                  # trial index within (task, length)
    depth: float                # relative depth of the (first) needle in [0, 1]
    prompt: str
    answers: tuple[str, ...]    # strings that must appear in the output
    max_tokens: int             # how many tokens to generate for this sample

    def to_dict(self) -> dict:
        d = asdict(self)
        d["answers"] = list(self.answers)
        return d


def make_samples(task: str, length: int, n: int, seed: int, count: Callable[[str], int],
                 haystack: str | None = None, split: str = "eval") -> list[Sample]:
    """n trials of ``task`` at ``length`` tokens, needle depths evenly spaced over [0, 1].

    ``count(text)`` is the number of tokens of ``text``; ``haystack`` is the natural text of the
    needle tasks (default: the shipped one; passkey uses its own filler). ``split`` names an
    independent stream of prompts: calibration draws its own ("calibration"), so that a table is
    never tuned on the prompts it is evaluated on. Raises ValueError for an unknown task or a length
    too short to hold the task's fixed parts.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")
    try:
        length = operator.index(length)   # an int, numpy's included; not a float
    except TypeError:
        raise ValueError(f"length must be a whole number of tokens, not {length!r}") from None
    if length <= 0:
        raise ValueError(f"length must be a positive number of tokens, not {length}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    text, starts = "", [0]
    if task != "passkey":
        text = _clean_haystack(load_haystack() if haystack is None else haystack)
        starts = [0] + [m.end() for m in re.finditer(r"\n\s*\n", text)]
    return [_sample(task, length, i, 0.5 if n == 1 else i / (n - 1), seed, count, text, starts, split)
            for i in range(n)]


def make_sample(task: str, length: int, depth: float, seed: int, count: Callable[[str], int],
                haystack: str | None = None, index: int = 0) -> Sample:
    """One trial with its (first) needle at ``depth``; trial ``index`` of :func:`make_samples` when
    ``depth`` is the depth that function gives it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], not {depth}")
    make_samples(task, length, 0, seed, count)   # the same argument checks
    text, starts = "", [0]
    if task != "passkey":
        text = _clean_haystack(load_haystack() if haystack is None else haystack)
        starts = [0] + [m.end() for m in re.finditer(r"\n\s*\n", text)]
    return _sample(task, length, index, depth, seed, count, text, starts)


def _sample(task, length, index, depth, seed, count, text, starts, split="eval") -> Sample:
    rng = random.Random(_trial_seed(seed, task, length, index, split))
    if task == "passkey":
        prompt, answers = _passkey(rng, length, depth, count)
    else:
        prompt, answers = _needles(task, rng, length, depth, count, text, starts)
    return Sample(task=task, length=length, index=index, depth=depth, prompt=prompt,
                  answers=answers, max_tokens=MAX_TOKENS[task])


def score(sample: Sample, output: str) -> float:
    """The fraction of the sample's answers found in ``output`` as whole numbers (not inside a longer
    run of digits: "123456" does not contain the answer "12345")."""
    if not sample.answers:
        return 0.0
    found = sum(re.search(rf"(?<!\d){re.escape(a)}(?!\d)", output) is not None for a in sample.answers)
    return found / len(sample.answers)


# ---------------------------------------------------------------- internals

def _trial_seed(seed: int, task: str, length: int, index: int, split: str = "eval") -> int:
    key = f"{seed}-{task}-{length}-{index}"   # the evaluation's prompts, as published in docs/RESULTS.md
    if split != "eval":
        key = f"{split}:{key}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _tolerance(length: int) -> int:
    """How far below the target a prompt may end."""
    return max(16, length // 100)


def _fit(build: Callable[[int], str], count: Callable[[str], int], length: int, per_unit: float,
         fixed: int, task: str) -> str:
    """The prompt build(k) with the most tokens not above ``length``, k units of filler.

    Starts from the estimate (length - fixed) / per_unit, then corrects k with the tokens per unit
    measured on the last prompt built (a secant step), never retrying a k already known to be too
    long or too short; one ``count`` per step, a few steps in practice.
    """
    tol = _tolerance(length)
    aim = length - tol // 4
    k = max(0, int((aim - fixed) / per_unit))
    below, above = -1, None       # largest k known short of the target, smallest k known over it
    best: tuple[int, str] | None = None
    for _ in range(_MAX_STEPS):
        prompt = build(k)
        got = count(prompt)
        if got <= length:
            if best is None or got > best[0]:
                best = (got, prompt)
            if got >= length - tol:
                return prompt
            below = max(below, k)
        else:
            above = k if above is None else min(above, k)
        rate = (got - fixed) / k if k >= 16 and got > fixed else per_unit
        step = round((aim - got) / max(rate, 1e-6))
        nxt = min(k + step, k - 1) if got > length else max(k + step, k + 1)
        if above is not None:
            nxt = min(nxt, above - 1)
        nxt = max(nxt, below + 1)
        if nxt < 0 or (above is not None and nxt >= above):
            break
        k = nxt
    if best is None:
        raise ValueError(f"length {length} is too short for a {task} prompt (its fixed parts alone "
                         f"take about {fixed} tokens)")
    return best[1]


def _passkey(rng: random.Random, length: int, depth: float, count) -> tuple[str, tuple[str, ...]]:
    key = str(rng.randint(10000, 99999))
    info = PASSKEY_INFO.format(key=key)
    sentences = len(FILLER_SENTENCES)

    def filler(start: int, stop: int) -> str:
        # sentences start..stop-1 of the endlessly repeated filler passage
        return " ".join(FILLER_SENTENCES[j % sentences] for j in range(start, stop))

    def build(k: int) -> str:
        at = round(k * depth)
        return "\n".join((PASSKEY_TASK, filler(0, at), info, filler(at, k), PASSKEY_QUESTION))

    per_sentence = count(" ".join([FILLER] * 64)) / (64 * sentences)
    fixed = count("\n".join((PASSKEY_TASK, info, PASSKEY_QUESTION)))
    return _fit(build, count, length, per_sentence, fixed, "passkey"), (key,)


def _clean_haystack(text: str) -> str:
    text = _LONG_DIGITS.sub("", text).strip()
    if not text:
        raise ValueError("the haystack has no text")
    return text


class _Stream:
    """The haystack read from a start offset on, wrapping around (and so repeating) as needed.

    Word ends are indexed lazily, as far as the longest prefix asked for so far.
    """

    def __init__(self, text: str, start: int):
        self.text = text
        self.buf = text[start:]
        self.ends: list[int] = []
        self.scanned = 0

    def words(self, k: int) -> str:
        """The first k words, with the text's own spacing."""
        while len(self.ends) < k:
            if self.scanned >= len(self.buf):
                self.buf += ("\n\n" + self.text) * max(1, 65536 // len(self.text))
            stop = min(len(self.buf), self.scanned + max(65536, 8 * (k - len(self.ends))))
            found = list(_WORD.finditer(self.buf, self.scanned, stop))
            self.scanned = stop
            if found and found[-1].end() == stop < len(self.buf) and not self.buf[stop].isspace():
                self.scanned = found.pop().start()  # a word cut by the window: read it next time
            self.ends += [m.end() for m in found]
        return self.buf[:self.ends[k - 1]] if k > 0 else ""


def _boundary(text: str, pos: int) -> int:
    """The needle position nearest ``pos``: after a newline or a sentence's end (or a space)."""
    if pos <= 0:
        return 0
    if pos >= len(text):
        return len(text)
    lo, hi = max(0, pos - _SNAP_WINDOW), min(len(text), pos + _SNAP_WINDOW)
    best = None
    for m in _BOUNDARY.finditer(text, lo, hi):
        if best is None or abs(m.end() - pos) < abs(best - pos):
            best = m.end()
    if best is None:  # no sentence in sight: the nearest word boundary
        space = text.rfind(" ", 0, pos)
        best = space + 1 if space >= 0 else 0
    return best


def _join(pieces: list[str]) -> str:
    """Concatenate, with a space between two pieces that would otherwise run together."""
    out: list[str] = []
    for piece in pieces:
        if not piece:
            continue
        if out and not out[-1][-1].isspace() and not piece[0].isspace():
            out.append(" ")
        out.append(piece)
    return "".join(out)


def _insert(text: str, needles: list[tuple[float, str]]) -> str:
    """``text`` with each (depth, sentence) needle at the boundary nearest its relative depth.

    Needles at the same place go in order of depth, so a depth-0 needle comes first and a depth-1
    needle last.
    """
    placed = sorted((_boundary(text, round(d * len(text))), d, j, s) for j, (d, s) in enumerate(needles))
    pieces, prev = [], 0
    for pos, _, _, sentence in placed:
        pieces += [text[prev:pos], sentence]
        prev = pos
    pieces.append(text[prev:])
    return _join(pieces)


def _needles(task: str, rng: random.Random, length: int, depth: float, count, text: str,
             starts: list[int]) -> tuple[str, tuple[str, ...]]:
    """A natural-text task: its needles in the haystack read from a random paragraph on."""
    stream = _Stream(text, starts[rng.randrange(len(starts))])
    depths = [depth] + [rng.random() for _ in range(7 if task == "multi_key" else 3)]
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), len(depths))]
    if task == "multi_needle":
        words = rng.sample(WORDS, 4)
        needles = [NEEDLE.format(key=w, value=v) for w, v in zip(words, values)]
        head, question, answers = INSTRUCTION_ONE, QUESTION.format(key=words[0]), (values[0],)
    elif task == "multi_key":
        a, b, c, d = rng.sample(WORDS, 4)
        pairs = [f"{x}-{y}" for x in (a, b, c, d) for y in (a, b, c, d) if x != y]
        keys = rng.sample(pairs, 8)
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        head, question, answers = INSTRUCTION_ONE, QUESTION.format(key=keys[0]), (values[0],)
    elif task == "multi_value":
        word = rng.choice(WORDS)
        needles = [NEEDLE_MV.format(key=word, value=v) for v in values]
        head, question, answers = INSTRUCTION_SOME, QUESTION_MV.format(key=word), tuple(values)
    else:  # multi_query
        words = rng.sample(WORDS, 4)
        needles = [NEEDLE.format(key=w, value=v) for w, v in zip(words, values)]
        order = rng.sample(range(4), 4)
        keys = ", ".join(words[j] for j in order[:3]) + " and " + words[order[3]]
        head, question = INSTRUCTION_SOME, QUESTION_MQ.format(keys=keys)
        answers = tuple(values[j] for j in order)
    placed = list(zip(depths, needles))

    def build(k: int) -> str:
        return head + "\n" + _insert(stream.words(k), placed) + "\n\n" + question

    sample_words = 4096
    per_word = count(stream.words(sample_words)) / sample_words
    fixed = count(head + "\n" + " ".join(needles) + "\n\n" + question)
    return _fit(build, count, length, per_word, fixed, task), answers
