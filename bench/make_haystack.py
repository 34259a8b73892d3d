"""Write dpe_gguf/data/haystack.txt: the natural-text haystack of the retrieval tasks (dpe_gguf.evaluation.tasks).

Provenance: the text is the Python standard library's own documentation, i.e. the docstrings of
a fixed, sorted list of stdlib modules (the module docstring, then the docstrings of the public
classes and functions each module defines, in name order), read with inspect. That text is part of
CPython and is distributed under the Python Software Foundation License.

Cleaning: code-looking lines are dropped (lines starting with ">>>" or "...", lines indented by
four or more spaces, lines without letters, unindented statements such as "def f(x):"), the lines
of a paragraph are joined into one line (bullets keep their own line), lines that are not prose
(fewer than four words, or mostly symbols, like doctest output) and paragraphs seen before are
skipped, runs of five or more digits are removed (so the 5- and 7-digit needles of the tasks occur
nowhere else in a prompt), and blank lines are collapsed to one.

The committed file was made with CPython 3.11; other versions give slightly different text (the
docstrings change between releases), which is why the file is committed rather than rebuilt.

    python bench/make_haystack.py                # writes dpe_gguf/data/haystack.txt
    python bench/make_haystack.py --out FILE     # somewhere else
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

MODULES = sorted("""
abc argparse ast asyncio asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams
asyncio.subprocess asyncio.tasks base64 bdb binascii bisect builtins bz2 calendar cmd code codecs
collections collections.abc concurrent.futures configparser contextlib contextvars copy copyreg csv
ctypes dataclasses datetime decimal difflib dis doctest email email.charset email.feedparser
email.generator email.header email.headerregistry email.message email.mime.base email.parser
email.policy email.utils enum filecmp fileinput fnmatch fractions ftplib functools gc getopt gettext
glob graphlib gzip hashlib heapq hmac html html.parser http http.client http.cookiejar http.cookies
http.server imaplib importlib importlib.abc importlib.metadata importlib.resources inspect io
ipaddress itertools json json.decoder json.encoder keyword linecache locale logging logging.config
logging.handlers lzma mailbox mimetypes multiprocessing multiprocessing.managers multiprocessing.pool
netrc numbers operator optparse os os.path pathlib pdb pickle pickletools pkgutil platform plistlib
poplib pprint profile pstats queue quopri random re reprlib sched secrets selectors shelve shlex
shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess
symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize trace
traceback tracemalloc types typing unittest unittest.case unittest.loader unittest.mock
unittest.result unittest.runner urllib urllib.error urllib.parse urllib.request urllib.robotparser
uuid warnings wave weakref xml xml.dom xml.dom.minidom xml.etree.ElementTree xml.sax
xml.sax.handler xml.sax.saxutils zipfile zipimport zlib zoneinfo
""".split())

_BULLET = re.compile(r"^([-*+]|\d+[.)])\s")
# unindented statements in examples: "def f(x):", "import os", "if __name__ == '__main__':", "x = f(y)"
_STATEMENT = re.compile(r"^(def|class|import|from|if|elif|else|for|while|with|try|except|finally|"
                        r"return|raise|yield|async|await|print)\b.*([:)]|import .*)$"
                        r"|^[\w.\[\]]+ ?[-+*/]?= ?\S")


def raw_docstrings() -> list[str]:
    """Every docstring, in a fixed order: per module, the module's own, then its public names'."""
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a module this build lacks (e.g. no _ssl): skipped
                continue
            docs.append(inspect.getdoc(module) or "")
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    doc = obj.__doc__  # the object's own docstring, not one inherited from a base
                    if isinstance(doc, str):
                        docs.append(inspect.cleandoc(doc))
    return docs


def paragraphs(doc: str) -> list[str]:
    """The prose paragraphs of one docstring, each on one line (bullets on their own lines)."""
    out: list[str] = []
    current: list[str] = []

    def flush():
        if current:
            out.append("\n".join(current))
            current.clear()

    for line in doc.splitlines():
        stripped = line.strip()
        code_like = (stripped.startswith((">>>", "...")) or line.startswith("    ")
                     or line.startswith("\t") or not re.search(r"[A-Za-z]", stripped)
                     or _STATEMENT.match(stripped))
        if not stripped or code_like:
            flush()
            continue
        if current and not _BULLET.match(stripped):
            current[-1] += " " + stripped
        else:
            current.append(stripped)
    flush()
    return out


def prose(line: str) -> bool:
    """Four words or more, and mostly letters and spaces (not doctest output or a signature)."""
    words = re.findall(r"[A-Za-z]{2,}", line)
    plain = sum(c.isalpha() or c == " " for c in line)
    return len(words) >= 4 and plain >= 0.8 * len(line) and not line.startswith("Traceback")


def build() -> str:
    seen: set[str] = set()
    kept = []
    for doc in raw_docstrings():
        for para in paragraphs(doc):
            para = re.sub(r"\d{5,}", "", para)
            para = re.sub(r"[ \t]+", " ", para).strip()
            para = "\n".join(line for line in para.split("\n") if prose(line))
            if not para or para in seen:
                continue
            seen.add(para)
            kept.append(para)
    text = "\n\n".join(kept) + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv=None) -> int:
    default = Path(__file__).resolve().parent.parent / "dpe_gguf" / "data" / "haystack.txt"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default)
    args = ap.parse_args(argv)
    text = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(text)} characters, {len(text.split())} words "
          f"(Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
