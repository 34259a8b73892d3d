"""Run the patched llama.cpp programs from Python: a `llama-server` per (model, settings, context
length) for generation, `llama-perplexity` for perplexity.

The evaluation suite and the demo go through the same programs users run, so every setting they
test is a llama.cpp command-line flag and nothing is measured that a user could not reproduce by
hand. Each run keeps the program's log, so tests can check that a flag really reached llama.cpp.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dpe_gguf.errors import DPEError
from dpe_gguf.llama.native import build_info, tool_path


def default_ngl() -> int:
    """Offload every layer when the build has CUDA, none otherwise."""
    return 99 if build_info().get("cuda") else 0


def gpu_present() -> tuple[bool, str]:
    """Whether llama.cpp can run on a GPU here (a CUDA build, and a GPU device that llama.cpp finds),
    and why, in words."""
    if not build_info().get("cuda"):
        return False, "no GPU (this build has no CUDA)"
    import llama_cpp

    from dpe_gguf.llama.session import quiet_llama_log
    with quiet_llama_log():
        llama_cpp.llama_backend_init()
        if not llama_cpp.llama_supports_gpu_offload():
            return False, "no GPU (this CUDA build finds no GPU device)"
    return True, "GPU present"


@dataclass
class RunSettings:
    """How llama.cpp runs: the flags shared by every method (threads, offload, flash attention)."""
    ngl: int = 0
    flash_attn: bool = True
    threads: int | None = None
    batch: int = 2048
    ubatch: int = 512

    def args(self) -> list[str]:
        a = ["-ngl", str(self.ngl), "-fa", "on" if self.flash_attn else "off",
             "-b", str(self.batch), "-ub", str(self.ubatch)]
        if self.threads:
            a += ["-t", str(self.threads)]
        return a


def context_cap_args(arch: str, n_ctx: int, trained: int | None = None) -> list[str]:
    """llama.cpp's programs cap a context (llama-server a slot) at the model's trained context. The
    override of ``{arch}.context_length`` lifts the cap and changes no RoPE math (YaRN reads its original
    context separately); nothing when ``n_ctx`` fits the trained context ``trained``."""
    if trained is not None and n_ctx <= trained:
        return []
    return ["--override-kv", f"{arch}.context_length=int:{n_ctx}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One `llama-server` process: a model, its method flags and a context size; greedy completion.

    Use as a context manager. `log` holds the server's output once it has started.
    """
    model: Path
    n_ctx: int
    extra_args: list[str] = field(default_factory=list)
    settings: RunSettings = field(default_factory=RunSettings)
    startup_timeout: float = 300.0

    def __post_init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._logf = tempfile.NamedTemporaryFile("w+", prefix="dpe-server-", suffix=".log", delete=False)

    def command(self) -> list[str]:
        return [str(tool_path("llama-server")), "-m", str(self.model), "-c", str(self.n_ctx), "-np", "1",
                "--host", "127.0.0.1", "--port", str(self.port), "--no-webui", "--no-warmup", "-lv", "4",
                *self.settings.args(), *self.extra_args]

    @property
    def log(self) -> str:
        self._logf.flush()
        return Path(self._logf.name).read_text(errors="replace")

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen(self.command(), stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise DPEError(f"llama-server exited with code {self.proc.returncode} while loading "
                               f"{self.model}:\n{self.log[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.time() > deadline:
                self.__exit__(None, None, None)
                raise DPEError(f"llama-server did not become ready in {self.startup_timeout:.0f} s:\n"
                               f"{self.log[-3000:]}")
            time.sleep(0.1)

    def __exit__(self, exc_type=None, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        if exc_type is None:  # keep the log of a failed run for the error message / the user
            Path(self._logf.name).unlink(missing_ok=True)

    def post(self, path: str, body: dict, timeout: float = 3600.0) -> dict:
        """POST a JSON body to one of llama-server's endpoints; its JSON answer (errors as DPEError)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise DPEError(f"llama-server {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from e
        except (urllib.error.URLError, ConnectionError) as e:
            alive = self.proc is not None and self.proc.poll() is None
            raise DPEError(f"llama-server {path} failed ({e}); server {'alive' if alive else 'exited'}:\n"
                           f"{self.log[-3000:]}") from e

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as a prompt body (no BOS)."""
        return self.post("/tokenize", {"content": text, "add_special": False})["tokens"]

    def complete(self, prompt: str, n_predict: int) -> dict:
        """Greedy continuation of `prompt` (BOS added as llama.cpp does for the model).

        Returns the text and llama.cpp's own counts and timings."""
        res = self.post("/completion", {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0,
                                         "top_k": 1, "seed": 0, "cache_prompt": True, "stream": False})
        timings = res.get("timings", {})
        return dict(text=res["content"], prompt_tokens=res.get("tokens_evaluated"),
                    cached_tokens=timings.get("cache_n"), prompt_ms=timings.get("prompt_ms"),
                    predicted_ms=timings.get("predicted_ms"))


_PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf)")


@contextmanager
def token_counter(model: Path, threads: int | None = None) -> Iterator[Callable[[str], int]]:
    """A function text -> its number of tokens as a prompt body, by the model's own tokenizer: a small
    llama-server on the CPU (DPE off for a DPE file: tokenization does not depend on it). Prompts of
    calibration and evaluation are sized with it."""
    from dpe_gguf.format.model_info import has_dpe, open_reader
    with open_reader(model) as reader:
        args = ["--dpe", "off"] if has_dpe(reader) else []
    with Server(Path(model), 256, args, RunSettings(ngl=0, flash_attn=False, threads=threads)) as tok:
        yield lambda text: len(tok.tokenize(text))


def perplexity(model: Path, text_file: Path, n_ctx: int, chunks: int, extra_args: list[str],
               settings: RunSettings) -> tuple[float, str]:
    """llama-perplexity over `chunks` windows of `n_ctx` tokens (the second half of each is scored).

    Returns (perplexity, log). The file must hold at least 2 * n_ctx tokens (llama-perplexity's rule)."""
    # n_batch > n_ctx makes llama-perplexity score n_batch / n_ctx windows at once: keep one per batch
    one = RunSettings(**{**settings.__dict__, "batch": min(settings.batch, n_ctx),
                         "ubatch": min(settings.ubatch, n_ctx)})
    cmd = [str(tool_path("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-c", str(n_ctx),
           "--chunks", str(chunks), *one.args(), *extra_args]
    # llama.cpp's asynchronous logger is not flushed at exit upstream (common_log_main() leaks its
    # instance), so the last lines, "Final estimate" included, were sometimes lost; patches/0007 flushes
    # it. Kept for builds without that patch: the computation is deterministic, so run again when only
    # the log went missing.
    for _ in range(4):
        res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        log = res.stdout + res.stderr
        m = _PPL_RE.search(log)
        if res.returncode != 0 or m:
            break
    if res.returncode != 0 or not m:
        raise DPEError(f"llama-perplexity failed (exit {res.returncode}):\n{' '.join(cmd)}\n{log[-3000:]}")
    return float(m.group(1)), log


def log_value(log: str, key: str) -> str | None:
    """The value llama_context logs for `key` (e.g. 'freq_base', 'freq_scale', 'n_ctx')."""
    m = re.search(rf"llama_context: {re.escape(key)}\s+= (\S+)", log)
    return m.group(1) if m else None


def env_threads() -> int | None:
    v = os.environ.get("DPE_GGUF_THREADS")
    return int(v) if v else None
