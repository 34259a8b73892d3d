"""Seeded mutations of GGUF headers, and the checks every mutated file must pass (issue #16).

Shared by ``tests/test_fuzz.py`` (a few thousand mutations in CI) and ``bench/fuzz_reader.py``
(100,000 and more). Two seed files: a small plain model (with non-ASCII strings and string arrays,
so that string handling is exercised) and its DPE conversion. Each mutation takes one seed and
changes its header: flipped bytes, an integer or float field set to an extreme, a type id changed,
invalid UTF-8 written into a string, a truncation; sometimes two at once. Mutation ``i`` of seed
``s`` depends on ``(s, i)`` alone, so one failing case can be rebuilt without the others.

Each mutated file goes through four operations, in-process: the reader (every value decoded),
``dpe-gguf inspect --json``, ``dpe-gguf convert --no-calibrate --force`` and ``dpe-gguf strip``.
An outcome is ``ok`` (exit 0 / no exception) or ``refused`` (exit 2 with ``dpe-gguf: error:`` /
``DPEError``); anything else is a failure: an exception escaping, the input file changed, a file
left behind in the folder, or an output that our own reader cannot open again.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import random
import re
import struct
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gguf_factory import write_tiny_gguf

from dpe_gguf import cli
from dpe_gguf.format.convert import convert
from dpe_gguf.errors import DPEError
from dpe_gguf.format.gguf_header import GGUFHeader
from dpe_gguf.format.params import DPEParams

OPS = ("reader", "inspect", "convert", "strip")

# GGUF value type ids -> scalar width in bytes (string 8 and array 9 are walked).
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FLOAT_TYPES = {6: "<f", 12: "<d"}
_STRING, _ARRAY = 8, 9
_ELEMENTS_KEPT = 3          # array elements recorded as slots: the first few and the last

_BAD_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
             b"\xe2\x82")
_SPECIAL_FLOATS = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 3.4e38, 1e300, 0.5)


# ---------------------------------------------------------------- seeds and their layout

@dataclass(frozen=True)
class Slot:
    """One field of a seed's header: ``kind`` is int, float, type (a value or tensor type id) or str
    (the bytes of a string, its length being an int slot of its own)."""

    offset: int
    size: int
    kind: str
    label: str


@dataclass(frozen=True)
class Seed:
    """A valid GGUF file to mutate: its bytes, header slots, where the header ends, and (DPE seed)
    where the divisor table's data lies."""

    name: str
    data: bytes
    slots: tuple[Slot, ...]
    header_end: int
    table: tuple[int, int] | None = None

    def of_kind(self, *kinds: str) -> list[Slot]:
        return [s for s in self.slots if s.kind in kinds and (s.kind != "str" or s.size)]


class _Walk:
    """A walk over a valid header that records every field as a :class:`Slot`."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.slots: list[Slot] = []

    def number(self, size: int, label: str, kind: str = "int", record: bool = True) -> int:
        value = int.from_bytes(self.data[self.pos:self.pos + size], "little")
        if record:
            self.slots.append(Slot(self.pos, size, kind, label))
        self.pos += size
        return value

    def string(self, label: str, record: bool = True) -> str:
        n = self.number(8, f"{label}.len", record=record)
        if record:
            self.slots.append(Slot(self.pos, n, "str", label))
        text = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def value(self, vtype: int, label: str, record: bool = True) -> None:
        if vtype in _SCALAR_SIZE:
            self.number(_SCALAR_SIZE[vtype], label, "float" if vtype in _FLOAT_TYPES else "int", record)
        elif vtype == _STRING:
            self.string(label, record)
        elif vtype == _ARRAY:
            itype = self.number(4, f"{label}.type", "type", record)
            count = self.number(8, f"{label}.count", record=record)
            for i in range(count):
                keep = record and (i < _ELEMENTS_KEPT or i == count - 1)
                self.value(itype, f"{label}[{i}]", keep)
        else:
            raise ValueError(f"seed has value type {vtype}")


def layout(data: bytes) -> tuple[list[Slot], int, dict[str, tuple[int, int]]]:
    """Slots of a valid GGUF file's header, the end of its tensor infos, and each tensor's
    (relative data offset, ggml type)."""
    w = _Walk(data)
    w.pos = 4
    w.number(4, "version")
    n_tensors = w.number(8, "n_tensors")
    n_kv = w.number(8, "n_kv")
    for _ in range(n_kv):
        key = w.string("key")
        vtype = w.number(4, f"{key}.vtype", "type")
        w.value(vtype, key)
    tensors = {}
    for _ in range(n_tensors):
        name = w.string("tensor name")
        n_dims = w.number(4, f"{name}.n_dims")
        for d in range(n_dims):
            w.number(8, f"{name}.ne[{d}]")
        ggml_type = w.number(4, f"{name}.type", "type")
        tensors[name] = (w.number(8, f"{name}.offset"), ggml_type)
    return w.slots, w.pos, tensors


def _seed(name: str, path: Path) -> Seed:
    data = path.read_bytes()
    slots, header_end, tensors = layout(data)
    table = None
    if "rope_dpe.weight" in tensors:
        with GGUFHeader(path) as h:
            t = next(t for t in h.tensors if t.name == "rope_dpe.weight")
            table = (t.data_offset, t.n_bytes)
    return Seed(name, data, tuple(slots), header_end, table)


def make_seeds(folder: Path) -> list[Seed]:
    """The plain seed model and its DPE conversion, written to ``folder`` (small: about 60 KB)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["a", "b", "é", "日本", "Ġthe", "<s>", "ü", "!"]
    plain = write_tiny_gguf(
        folder / "seed.gguf", arch="llama", n_layer=2, n_head=2, n_head_kv=1, head_dim=16, n_embd=32,
        n_ff=32, n_vocab=32, context_length=256, seed=3,
        extra_kv={"general.description": "fuzz seed – ünïcode ✓", "tokenizer.ggml.model": "gpt2",
                  "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [float(i) for i in range(len(tokens))],
                  "tokenizer.ggml.token_type": [1] * len(tokens), "tokenizer.ggml.bos_token_id": 5})
    dpe = convert(plain, folder / "seed.dpe.gguf",
                  DPEParams(window=32, group_scales=(2, 4), target_context=1024, calibration="fuzz seed ✓"),
                  progress=False)
    return [_seed("plain", plain), _seed("dpe", dpe)]


# ---------------------------------------------------------------- mutations

def _flip_bytes(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    """A few bytes of the header flipped (one bit) or replaced (a random byte)."""
    done = []
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        pos = rng.randrange(seed.header_end)
        if rng.random() < 0.5:
            buf[pos] ^= 1 << rng.randrange(8)
        else:
            buf[pos] = rng.randrange(256)
        done.append(pos)
    return f"flip bytes at {done}"


def _int_extreme(slot: Slot, original: int, rng: random.Random) -> int:
    bits = 8 * slot.size
    top = (1 << bits) - 1
    return rng.choice((0, 1, 2, top, top - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1, rng.randrange(top + 1),
                       (original + 1) & top, (original - 1) & top, (original * 2) & top, (original + 4096) & top))


def _set_int(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    """An integer field (a count, a length, a dimension, an offset, a value) set to an extreme."""
    slot = rng.choice(seed.of_kind("int"))
    original = int.from_bytes(buf[slot.offset:slot.offset + slot.size], "little")
    value = _int_extreme(slot, original, rng)
    buf[slot.offset:slot.offset + slot.size] = value.to_bytes(slot.size, "little")
    return f"int {slot.label}@{slot.offset} = {value:#x}"


def _floats(size: int) -> list[float]:
    """The special values that a float of ``size`` bytes can hold (1e300 is not a float32)."""
    return [v for v in _SPECIAL_FLOATS if size == 8 or math.isnan(v) or abs(v) <= 3.4e38]


def _set_float(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    """A float value set to NaN, an infinity, zero, a denormal or a huge number."""
    slot = rng.choice(seed.of_kind("float"))
    value = rng.choice(_floats(slot.size))
    struct.pack_into("<f" if slot.size == 4 else "<d", buf, slot.offset, value)
    return f"float {slot.label}@{slot.offset} = {value!r}"


def _set_type(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    """A value, array element or tensor type id changed to another id, known or not."""
    slot = rng.choice(seed.of_kind("type"))
    value = rng.choice((*range(14), 30, 41, 0x7FFFFFFF, 0xFFFFFFFF))
    struct.pack_into("<I", buf, slot.offset, value)
    return f"type {slot.label}@{slot.offset} = {value}"


def _bad_utf8(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    """Invalid UTF-8 written over part of a key, a string value or a tensor name (length kept)."""
    slot = rng.choice(seed.of_kind("str"))
    bad = rng.choice(_BAD_UTF8)[:slot.size]
    at = slot.offset + rng.randrange(slot.size - len(bad) + 1)
    buf[at:at + len(bad)] = bad
    return f"utf8 {slot.label}@{slot.offset} += {bad!r} at {at}"


def _bad_table(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    """One divisor of the DPE table set to a value that is not an integer >= 1, or a huge one."""
    start, n_bytes = seed.table
    at = start + 4 * rng.randrange(n_bytes // 4)
    value = rng.choice((*_floats(4), 1.5, 1e7))
    struct.pack_into("<f", buf, at, value)
    return f"table @{at} = {value!r}"


def _truncate(buf: bytearray, seed: Seed, rng: random.Random) -> str:
    """The file cut short: mostly inside the header, sometimes anywhere."""
    limit = seed.header_end + 64 if rng.random() < 0.8 else len(buf)
    n = rng.randrange(min(limit, len(buf)))
    del buf[n:]
    return f"truncate to {n}"


_MUTATIONS = ((_flip_bytes, 6), (_set_int, 6), (_set_float, 1), (_set_type, 2), (_bad_utf8, 2),
              (_truncate, 2), (_bad_table, 1))


def mutate(seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    """One mutated copy of ``seed``: one mutation, or two (20 %), a truncation always last."""
    kinds = [m for m, _ in _MUTATIONS if m is not _bad_table or seed.table is not None]
    weights = [w for m, w in _MUTATIONS if m is not _bad_table or seed.table is not None]
    chosen = rng.choices(kinds, weights, k=2 if rng.random() < 0.2 else 1)
    chosen.sort(key=lambda m: m is _truncate)
    buf = bytearray(seed.data)
    done = [m(buf, seed, rng) for m in chosen if not (m is _truncate and len(buf) < len(seed.data))]
    return bytes(buf), f"{seed.name}: " + "; ".join(done)


def mutation(seeds: list[Seed], seed: int, index: int) -> tuple[bytes, str]:
    """Mutation ``index`` of run ``seed``: the same bytes every time, whatever ran before."""
    rng = random.Random(f"{seed}:{index}")
    return mutate(seeds[index % len(seeds)], rng)


# ---------------------------------------------------------------- running one file

@dataclass
class Failure:
    """What went wrong with one operation on one mutated file."""

    index: int
    description: str
    op: str
    problem: str

    def __str__(self) -> str:
        return f"mutation {self.index} ({self.description}), {self.op}: {self.problem}"


@dataclass
class Tally:
    """Outcome counts per (operation, outcome), refusal reasons per (operation, reason), mutation kinds
    applied, and the failures (the first 50 kept)."""

    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    n_failures: int = 0
    n_files: int = 0

    def add_failure(self, failure: Failure) -> None:
        self.n_failures += 1
        if len(self.failures) < 50:
            self.failures.append(failure)


def _read_everything(path: Path) -> None:
    """The reader with every value decoded (strings included: they are decoded only when asked)."""
    with GGUFHeader(path) as header:
        for f in header.fields.values():
            f.contents()
            _ = f.array_type
        for t in header.tensors:
            if t.n_bytes <= 1 << 16:
                header.tensor_bytes(t)


def _argv(op: str, path: Path, out: Path) -> list[str]:
    if op == "inspect":
        return ["inspect", "--json", str(path)]
    if op == "convert":
        return ["convert", str(path), "-o", str(out), "--no-calibrate", "--force", "-q"]
    return ["strip", str(path), "-o", str(out), "-q"]


@functools.lru_cache(maxsize=1)
def _parser():
    """The CLI's parser, built once (building it costs more than most commands on a small file)."""
    return cli.build_parser()


def _where(exc: BaseException) -> str:
    """``Type: message`` and the innermost frame, enough to find the line that raised."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} ({Path(frame.filename).name}:{frame.lineno})"


_NUMBER = re.compile(r"(?<![\w-])(0x[0-9a-f]+|-?\d+(\.\d+)?(e[-+]?\d+)?|nan|inf)(?!\w)")  # not UTF-8's 8


def reason(message: str, path: Path) -> str:
    """A refusal message reduced to its kind: the file name and numbers taken out, cut short."""
    text = message.replace(str(path), "FILE")
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = _NUMBER.sub("N", text)
    text = text.split("; ")[0].strip()
    return text[:120]


def run_op(op: str, path: Path, out: Path) -> tuple[str, str]:
    """(outcome, detail) of one operation: outcome ``ok``, ``refused`` or ``escape``; the detail is the
    refusal message or the escaped exception."""
    if op == "reader":
        try:
            _read_everything(path)
        except DPEError as e:
            return "refused", str(e)
        except Exception as e:  # noqa: BLE001  (what the fuzz test looks for)
            return "escape", _where(e)
        return "ok", ""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = cli.run(_parser().parse_args(_argv(op, path, out)))
    except Exception as e:  # noqa: BLE001
        return "escape", _where(e)
    err = stderr.getvalue()
    if rc == 0:
        return "ok", ""
    if rc == 2 and err.startswith("dpe-gguf: error: "):
        return "refused", err.removeprefix("dpe-gguf: error: ").strip()
    return "escape", f"exit code {rc}, stderr {err[-300:]!r}"


def check_file(data: bytes, description: str, index: int, folder: Path, tally: Tally) -> None:
    """Run every operation on ``data`` (written to ``folder``/case.gguf) and record the outcomes and
    any broken rule: an escape, the input changed, a file left behind, an unreadable output."""
    path, out = folder / "case.gguf", folder / "out.gguf"
    path.write_bytes(data)
    tally.n_files += 1
    for op in OPS:
        outcome, detail = run_op(op, path, out)
        tally.counts[(op, outcome)] += 1
        if outcome == "refused":
            tally.reasons[(op, reason(detail, path))] += 1
        elif outcome == "escape":
            tally.add_failure(Failure(index, description, op, detail))
        for problem in _broken_rules(op, outcome, data, path, out, folder):
            tally.add_failure(Failure(index, description, op, problem))
    path.unlink()


def _broken_rules(op: str, outcome: str, data: bytes, path: Path, out: Path, folder: Path) -> list[str]:
    """The input untouched, nothing left behind but a successful output, which must read back."""
    problems = []
    if path.read_bytes() != data:
        problems.append("the input file was modified")
        path.write_bytes(data)
    wrote = op in ("convert", "strip") and outcome == "ok"
    expected = {path.name} | ({out.name} if wrote else set())
    left = set(os.listdir(folder))
    if left != expected:
        problems.append(f"folder holds {sorted(left)}, expected {sorted(expected)}")
    if wrote and out.exists():
        try:
            GGUFHeader(out).close()
        except DPEError as e:
            problems.append(f"its output does not read back: {e}")
    for name in left - {path.name}:
        (folder / name).unlink()
    return problems


def run_fuzz(seeds: list[Seed], folder: Path, seed: int, count: int, start: int = 0,
             progress=None) -> Tally:
    """Mutations ``start`` .. ``start + count - 1`` of run ``seed``, each through every operation."""
    folder.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    for index in range(start, start + count):
        data, description = mutation(seeds, seed, index)
        for part in description.split(": ", 1)[1].split("; "):
            tally.kinds[part.split()[0]] += 1
        check_file(data, description, index, folder, tally)
        if progress is not None:
            progress(index - start + 1, tally)
    return tally
