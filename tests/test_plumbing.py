"""The shared plumbing: the cache folder, the context-cap override, atomic writes of small files."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpe_gguf.errors import DPEError
from dpe_gguf.format.gguf_stream import write_atomic
from dpe_gguf.paths import cache_root
from dpe_gguf.llama.runtime import context_cap_args


def test_cache_root_order(monkeypatch, tmp_path):
    """DPE_GGUF_CACHE first, then $XDG_CACHE_HOME/dpe-gguf (as the build's cache), then ~/.cache/dpe-gguf."""
    monkeypatch.delenv("DPE_GGUF_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root("demo") == tmp_path / "home" / ".cache" / "dpe-gguf" / "demo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dpe-gguf"
    monkeypatch.setenv("DPE_GGUF_CACHE", str(tmp_path / "mine"))
    assert cache_root("calibration") == tmp_path / "mine" / "calibration"


def test_users_of_the_cache_follow_it(monkeypatch, tmp_path):
    from dpe_gguf.calibration import cache
    from dpe_gguf.evaluation import demo
    from dpe_gguf.evaluation import suite as evalsuite
    monkeypatch.delenv("DPE_GGUF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "dpe-gguf" / "calibration"
    assert demo.cache_dir() == tmp_path / "dpe-gguf" / "demo"
    cfg = evalsuite.EvalConfig(model=Path("m.gguf"), tasks=["passkey"], lengths=[4096], methods=[])
    assert cfg.cache_dir == tmp_path / "dpe-gguf"


def test_context_cap_override_names_the_architecture():
    assert context_cap_args("qwen2", 40000) == ["--override-kv", "qwen2.context_length=int:40000"]
    assert context_cap_args("llama", 9000, trained=8192) == ["--override-kv", "llama.context_length=int:9000"]
    assert context_cap_args("llama", 8192, trained=8192) == []


def test_write_atomic_all_or_nothing(tmp_path):
    out = tmp_path / "rows.json"
    out.write_text("old")
    write_atomic(out, b"new")
    assert out.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]   # no temporary file left behind
    with pytest.raises(DPEError, match="set DPE_GGUF_CACHE"):
        write_atomic(tmp_path / "missing" / "x.json", b"{}", remedy="set DPE_GGUF_CACHE to a writable folder")
