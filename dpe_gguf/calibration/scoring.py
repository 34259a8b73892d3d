"""A candidate table's score on a prompt, measured in process by the patched llama.cpp: the answer's
teacher-forced log-probability."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpe_gguf.errors import DPEError
from dpe_gguf.llama.session import LlamaSession


def answer_logprobs(model: Path, samples, n_ctx: int, ngl: int, flash_attn: bool, threads: int | None,
                    n_batch: int = 2048) -> list[float]:
    """Per sample, the mean log-probability of the sample's first answer, teacher-forced after its
    prompt (" " + answer, as the prompts end with "is:"), run by the patched llama.cpp.

    A graded score: it separates candidate tables that retrieve equally often."""
    with LlamaSession(model, n_gpu_layers=ngl) as session:
        session.open_context(n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, flash_attn=flash_attn)
        nb = session.n_batch
        per_sample = []
        for x in samples:
            prompt = session.tokenize(x.prompt)
            answer = session.tokenize(" " + x.answers[0], add_special=False)
            ids = prompt + answer
            if len(ids) > n_ctx:
                raise DPEError(f"prompt of {len(ids)} tokens does not fit the context of {n_ctx}")
            first = len(prompt) - 1                  # logits at positions first .. len(ids) - 2
            session.clear()
            logp = []
            for start in range(0, len(ids) - 1, nb):
                chunk = ids[start:min(start + nb, len(ids) - 1)]
                if session.decode(chunk, start, [start + j >= first for j in range(len(chunk))]) != 0:
                    raise DPEError("llama_decode failed while scoring a candidate")
                for j in range(len(chunk)):
                    p = start + j
                    if p >= first:
                        logits = session.logits(j).astype(np.float64)
                        m = logits.max()
                        logp.append(logits[ids[p + 1]] - m - math.log(np.exp(logits - m).sum()))
            per_sample.append(float(np.mean(logp)))
        return per_sample


def answer_logprob(model: Path, samples, n_ctx: int, ngl: int, flash_attn: bool, threads: int | None,
                   n_batch: int = 2048) -> float:
    """The mean of :func:`answer_logprobs` over the samples."""
    return float(np.mean(answer_logprobs(model, samples, n_ctx, ngl, flash_attn, threads, n_batch)))
