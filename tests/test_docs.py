"""The design the code cites is in the repository: every `docs/design.md section N` the code and tests
name is a section of that page."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cited_design_sections_exist():
    design = (REPO / "docs" / "design.md").read_text()
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", design, flags=re.M)}
    cited = {}
    for folder in ("dpe_gguf", "csrc", "tests", "bench"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix not in {".py", ".c", ".h", ".cpp", ".cu", ".cuh"} or path == Path(__file__).resolve():
                continue
            text = path.read_text(errors="replace")
            assert "dpe-spec.md" not in text, f"{path} cites a page outside the repository"
            for m in re.finditer(r"docs/design\.md,? sections? ([\d ,\-and]+)", text):
                for n in re.findall(r"\d+", m.group(1)):
                    cited.setdefault(int(n), str(path.relative_to(REPO)))
    assert cited, "no citation found: the pattern is out of date"
    missing = {n: p for n, p in cited.items() if n not in sections}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"
