"""The per-kernel table of an `ncu --metrics gpu__time_duration.sum --print-summary per-kernel` log, sorted by
total time: calls, average and total microseconds per kernel (its name without the argument list, its grid and
block), so a stock run and a DPE run can be read side by side (docs/RESULTS.md, "Where decode's time goes").

    ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \\
        llama-bench -m M -ngl 99 -fa 1 -p 0 -n 8 -r 1 > log.txt
    python bench/ncu_summary.py log.txt [--top 20]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

UNITS = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def kernels(log: str) -> list[tuple[str, int, float]]:
    """(kernel, calls, average us) for every kernel of the summary."""
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"^\s+(.*), Device \d+, CC [\d.]+, Invocations (\d+)$", line)
        if not m:
            continue
        j = next(k for k in range(i + 1, len(lines)) if "gpu__time_duration.sum" in lines[k])
        fields = lines[j].split()
        avg = float(fields[-1].replace(",", "")) * UNITS[fields[1]]
        # "void f<...>(const float *, ...) (grid)x(block)": keep the name and the launch shape
        name = re.sub(r"\((?:[^()]|\([^()]*\))*\) (\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\))$", r" \1", m.group(1))
        out.append((name, int(m.group(2)), avg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--top", type=int, default=20, help="rows to print")
    a = ap.parse_args()
    rows = sorted(kernels(a.log.read_text()), key=lambda r: -r[1] * r[2])
    print(f"total {sum(c * t for _, c, t in rows):,.0f} us over {sum(c for _, c, _ in rows)} kernels")
    print("| kernel (grid)x(block) | calls | avg us | total us |")
    print("| --- | --- | --- | --- |")
    for name, calls, avg in rows[:a.top]:
        print(f"| `{name}` | {calls} | {avg:.2f} | {calls * avg:,.0f} |")


if __name__ == "__main__":
    main()
