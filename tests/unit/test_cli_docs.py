"""scripts/cli_docs.py: the man pages and bash completion come from the real parsers."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cuju_libvirt.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cli_docs"] = module
    spec.loader.exec_module(module)
    return module


cli_docs = _load()


def _leaf_commands(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for name, _help, sub in cli_docs._subparsers(parser):
        out += _leaf_commands(sub) or [sub.prog]
        del name
    return out


def test_man_page_documents_every_command_and_option() -> None:
    parser = build_parser()
    page = cli_docs.manpage(parser, 1, "summary", "2026-01-01", "0.0")
    assert page.startswith('.TH CUJU-LIBVIRT 1 "2026-01-01"')
    leaves = _leaf_commands(parser)
    assert "cuju-libvirt tracker check" in leaves
    for prog in leaves:
        assert f".SS {cli_docs._roff(prog)}\n" in page, prog
    assert "\\fB\\-\\-ram\\-dir\\fR \\fIRAM_DIR\\fR" in page
    assert ".SH EXIT STATUS" in page


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
def test_man_page_renders_without_warnings(tmp_path: Path) -> None:
    page = tmp_path / "cuju-libvirt.1"
    page.write_text(cli_docs.manpage(build_parser(), 1, "summary", "2026-01-01", "0.0"))
    out = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=60,
                         env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"}, check=False)
    assert out.returncode == 0
    assert out.stderr == ""
    assert "cuju-libvirt tracker check [-h] [--ram-dir RAM_DIR] [--json]" in out.stdout


def _complete(script: Path, func: str, *words: str) -> list[str]:
    quoted = " ".join(f"'{w}'" for w in words)
    cmd = (f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; {func}; "
           'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30, check=True)
    return [w for w in out.stdout.split("\n") if w]


def test_bash_completion_follows_the_command_tree(tmp_path: Path) -> None:
    script = tmp_path / "cuju-libvirt"
    script.write_text(cli_docs.bash_completion(build_parser()))
    f = "_cuju_libvirt"
    assert _complete(script, f, "cuju-libvirt", "tra") == ["tracker"]
    assert _complete(script, f, "cuju-libvirt", "tracker", "") == ["check"]
    assert _complete(script, f, "cuju-libvirt", "tracker", "check", "--r") == ["--ram-dir"]
    assert _complete(script, f, "cuju-libvirt", "tracker", "check", "--ram-dir", "") == []  # files
    assert "validate" in _complete(script, f, "cuju-libvirt", "xml", "")
