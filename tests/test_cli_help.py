"""The CLI's help, verb by verb, against the texts recorded in tests/cli_help/ (issue #15: the package is being
reorganised, and every command, flag and help line must stay as users know it).

A change to the CLI that is meant changes the recorded text in the same commit:
    DPE_RECORD_CLI_HELP=1 .venv/bin/pytest tests/test_cli_help.py
argparse lays help out differently from one Python version to another, so the texts hold for the version they
were recorded with (tests/cli_help/PYTHON); the test says so and skips on another one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from dpe_gguf.cli import build_parser, main

HERE = Path(__file__).parent / "cli_help"
VERBS = ["", "convert", "calibrate", "inspect", "strip", "eval", "report", "demo", "model", "lib-path"]
RECORD = os.environ.get("DPE_RECORD_CLI_HELP") == "1"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def help_text(verb: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")        # argparse wraps to the terminal's width
    assert main(([verb] if verb else []) + ["--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v or "top-level")
def test_help_is_what_was_recorded(verb, capsys, monkeypatch):
    path = HERE / f"{verb or 'top-level'}.txt"
    text = help_text(verb, capsys, monkeypatch)
    if RECORD:
        HERE.mkdir(exist_ok=True)
        (HERE / "PYTHON").write_text(PYTHON + "\n")
        path.write_text(text)
        return
    recorded = (HERE / "PYTHON").read_text().strip()
    if recorded != PYTHON:
        pytest.skip(f"the help texts were recorded with Python {recorded}; argparse's layout differs on {PYTHON}")
    assert text == path.read_text(), f"`dpe-gguf {verb} --help` changed; if that is meant, record it (see the top)"


def test_every_verb_is_recorded():
    """A new verb gets its recorded help too: VERBS is every sub-command the parser has."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(v for v in VERBS if v)
