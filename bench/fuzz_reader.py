"""Fuzz the GGUF reader, inspect, convert and strip at scale (issue #16) and print the outcome counts.

The mutations and checks are tests/gguf_fuzz.py's, the ones tests/test_fuzz.py runs a few thousand
of in CI: each mutated header of a small model (or of its DPE conversion) goes through the reader,
`dpe-gguf inspect`, `convert --no-calibrate --force` and `strip`, in-process. Any outcome but a
clean answer or a DPEError / exit code 2 is a failure, and so is a changed input, a file left
behind, or an output that does not read back. Exit code 1 when there was a failure.

    python bench/fuzz_reader.py --count 100000 --seed 16
    python bench/fuzz_reader.py --seed 16 --only 4868      # one mutation, each operation's answer
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gguf_fuzz as G  # noqa: E402


def machine() -> str:
    """CPU model and core count, in words (for the results file)."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def limit_memory(gib: float) -> None:
    """Cap the address space, so that a file making dpe-gguf allocate a huge table fails here with
    MemoryError (a reported escape) instead of taking the machine's memory."""
    if gib > 0:
        n = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (n, n))


def show_one(seeds: list[G.Seed], seed: int, index: int, folder: Path) -> int:
    """Mutation ``index``: its description and each operation's outcome; the file is kept."""
    data, description = G.mutation(seeds, seed, index)
    path = folder / f"mutation-{seed}-{index}.gguf"
    path.write_bytes(data)
    print(f"mutation {index} of seed {seed}: {description}\nfile: {path}")
    for op in G.OPS:
        outcome, detail = G.run_op(op, path, folder / "out.gguf")
        (folder / "out.gguf").unlink(missing_ok=True)
        print(f"  {op:8} {outcome:8} {detail}")
    return 0


def report(tally: G.Tally, seconds: float, command: str) -> None:
    print(f"command: {command}")
    print(f"machine: {machine()}")
    print(f"files: {tally.n_files}, wall time {seconds:.0f} s ({1e3 * seconds / max(tally.n_files, 1):.1f} ms a file)")
    print("\noutcomes (operation: ok / refused / escape):")
    for op in G.OPS:
        c = [tally.counts[(op, o)] for o in ("ok", "refused", "escape")]
        print(f"  {op:8} {c[0]:>8} {c[1]:>8} {c[2]:>8}")
    print("\nmutations applied: " + ", ".join(f"{k} {v}" for k, v in tally.kinds.most_common()))
    print("\nmost frequent refusals of convert (message with the file and numbers taken out):")
    for (op, why), n in [item for item in tally.reasons.most_common() if item[0][0] == "convert"][:15]:
        print(f"  {n:>7}  {why}")
    print(f"\n{len({why for _, why in tally.reasons})} distinct refusal messages")
    print(f"\nfailures: {tally.n_failures}")
    for failure in tally.failures:
        print(f"  {failure}")


def run(args: argparse.Namespace, seeds: list[G.Seed], folder: Path, argv) -> int:
    """Mutations ``--start`` .. ``--start + --count - 1``, a progress line every 5,000, the report."""
    started = time.time()

    def progress(done: int, tally: G.Tally) -> None:
        if done % 5000 == 0:
            print(f"{done}/{args.count} files, {tally.n_failures} failures, {time.time() - started:.0f} s",
                  file=sys.stderr, flush=True)
    tally = G.run_fuzz(seeds, folder / "work", args.seed, args.count, args.start, progress)
    command = "python bench/fuzz_reader.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report(tally, time.time() - started, command)
    return 1 if tally.n_failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000, help="mutations to run (default 100000)")
    ap.add_argument("--seed", type=int, default=16, help="run seed: the same seed gives the same files")
    ap.add_argument("--start", type=int, default=0, help="first mutation index (to split a run)")
    ap.add_argument("--only", type=int, metavar="I", help="run mutation I alone and print every answer")
    ap.add_argument("--workdir", help="folder for the seeds and the mutated files (default: a new temp folder)")
    ap.add_argument("--memory-gib", type=float, default=8.0, help="address-space cap, 0 for none (default 8)")
    args = ap.parse_args(argv)
    limit_memory(args.memory_gib)
    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpe-fuzz-"))
    seeds = G.make_seeds(folder / "seeds")
    if args.only is not None:
        return show_one(seeds, args.seed, args.only, folder)
    try:
        return run(args, seeds, folder, argv)
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
