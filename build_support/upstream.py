"""Fetch, verify, unpack and patch the pinned llama.cpp source; build the llama-cpp-python bindings.

Used at build time only: by CMake (``python build_support/upstream.py source ...``) and by the
scikit-build-core metadata provider in ``build_support/metadata.py``. Standard library only.

The pinned source is the llama.cpp tree vendored in the llama-cpp-python sdist. It is fetched
through pip (the one channel every user has), cached outside the repository and verified by
sha256 before use. ``DPE_LLAMA_CPP_DIR`` (environment or CMake cache entry) points at an existing
pristine llama.cpp tree instead, for offline builds; ``DPE_GGUF_CACHE`` moves the cache.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
UPSTREAM_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# Parts of the vendored tree that no build target needs (docs, models, web assets, other bindings).
SKIP_DIRS = {"models", "docs", "media", "benches", "gguf-py", "examples/model-conversion", ".github"}

REPO = Path(__file__).resolve().parent.parent
PATCH_DIR = REPO / "patches"


class BuildError(RuntimeError):
    """A build step failed; the message says which and what to do."""


def cache_dir() -> Path:
    base = os.environ.get("DPE_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpe-gguf")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist() -> Path:
    """The verified llama-cpp-python sdist, downloaded through pip into the cache if missing."""
    dest = cache_dir() / SDIST_NAME
    if not dest.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                   "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
            env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            got = Path(tmp) / SDIST_NAME
            if res.returncode != 0 or not got.exists():
                raise BuildError(
                    f"downloading the llama.cpp source (llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist) "
                    f"through pip failed:\n{res.stderr.strip()[-2000:]}\n"
                    "Check the network or pip's index settings, or build offline: set DPE_LLAMA_CPP_DIR "
                    f"to a pristine llama.cpp tree at commit {UPSTREAM_COMMIT}, or put {SDIST_NAME} "
                    f"into {cache_dir()}.")
            os.replace(got, dest)
    actual = sha256_file(dest)
    if actual != SDIST_SHA256:
        raise BuildError(
            f"sha256 mismatch for {dest}: got {actual}, expected {SDIST_SHA256}. "
            "The cached or downloaded file is not the pinned source: delete it and build again; "
            "if it fails again, your package index serves a different file.")
    return dest


def pristine_tree() -> Path:
    """A pristine llama.cpp tree: DPE_LLAMA_CPP_DIR if set, else unpacked from the verified sdist."""
    override = os.environ.get("DPE_LLAMA_CPP_DIR")
    if override:
        path = Path(override).expanduser().resolve()
        if not (path / "include" / "llama.h").exists() or not (path / "ggml").is_dir():
            raise BuildError(f"DPE_LLAMA_CPP_DIR={override} is not a llama.cpp source tree "
                             "(no include/llama.h or ggml/).")
        return path
    tree = cache_dir() / f"llama.cpp-{UPSTREAM_COMMIT[:12]}"
    if (tree / ".complete").exists():
        return tree
    sdist = fetch_sdist()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix="unpack-"))
    try:
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len(prefix):]
                if any(rel == d or rel.startswith(d + "/") for d in SKIP_DIRS):
                    continue
                m.name = rel
                members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        (tmp / ".complete").write_text(UPSTREAM_COMMIT + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        os.replace(tmp, tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


def patch_files() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def patch_series_id() -> str:
    """Short hash identifying the patch series (names and contents, in order)."""
    digest = hashlib.sha256()
    for p in patch_files():
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()[:12]


def apply_patches(tree: Path, patches: list[Path] | None = None) -> None:
    for patch in patch_files() if patches is None else patches:
        # Inside another git work tree (a build folder under a checkout) `git apply` would resolve
        # paths against that repository and silently skip them: stop repository discovery at tree.
        env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(Path(tree).resolve().parent))
        res = subprocess.run(["git", "apply", "--verbose", "--whitespace=nowarn", str(patch)],
                             cwd=tree, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise BuildError(f"patch {patch.name} does not apply to llama.cpp {UPSTREAM_COMMIT[:12]}:\n"
                             f"{res.stderr.strip()}\n"
                             "Rebase the patch on the pinned tree (see patches/README.md).")


def prepare_source(dest: Path) -> Path:
    """Copy the pristine tree to ``dest`` and apply ``patches/`` in order; idempotent per series id."""
    stamp = dest / ".dpe-patched"
    series = patch_series_id()
    if stamp.exists() and stamp.read_text().strip() == series:
        return dest
    src = pristine_tree()
    if not dest.exists():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", ".complete"), symlinks=True)
        apply_patches(dest)
    else:
        # A new patch series over an existing build: patch a fresh copy, then replace only the files whose
        # bytes changed, so the build system recompiles what the series touched instead of everything.
        fresh = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".new-"))
        try:
            shutil.rmtree(fresh)
            shutil.copytree(src, fresh, ignore=shutil.ignore_patterns(".git", ".complete"), symlinks=True)
            apply_patches(fresh)
            stamp.unlink(missing_ok=True)
            _sync_tree(fresh, dest)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
    stamp.write_text(series + "\n")
    return dest


def _sync_tree(src: Path, dest: Path) -> None:
    """Make ``dest`` a copy of ``src``, leaving files with identical contents (and their mtimes) untouched."""
    for root, dirs, files in os.walk(dest, topdown=False):
        for name in files + dirs:
            path = Path(root) / name
            if not os.path.lexists(src / path.relative_to(dest)):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            new, old = Path(root) / name, dest / rel / name
            if old.is_symlink() or new.is_symlink() or not old.is_file() or \
                    old.stat().st_size != new.stat().st_size or old.read_bytes() != new.read_bytes():
                if os.path.lexists(old):
                    old.unlink()
                shutil.copy2(new, old, follow_symlinks=False)


def bindings_wheel() -> Path:
    """A llama-cpp-python wheel of the pure-Python bindings (LLAMA_BUILD=OFF: nothing compiled)."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
    if found:
        return found[-1]
    sdist = fetch_sdist()
    wheels.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "FORCE_CMAKE")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels),
           "-C", "cmake.define.LLAMA_BUILD=OFF", "-C", "cmake.define.LLAVA_BUILD=OFF", str(sdist)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
    if res.returncode != 0 or not found:
        raise BuildError("building the llama-cpp-python bindings (LLAMA_BUILD=OFF) failed:\n"
                         f"{res.stderr.strip()[-3000:]}")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("source", help="prepare the patched llama.cpp tree")
    p.add_argument("--dest", required=True, type=Path)
    sub.add_parser("series", help="print the patch series id")
    sub.add_parser("bindings-wheel", help="print the path of the llama-cpp-python bindings wheel")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "source":
            print(prepare_source(args.dest))
        elif args.cmd == "series":
            print(patch_series_id())
        else:
            print(bindings_wheel())
    except BuildError as e:
        print(f"dpe-gguf build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
