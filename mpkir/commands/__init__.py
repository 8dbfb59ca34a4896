"""mpkir.commands: one module per CLI verb, found automatically by :mod:`mpkir.cli`.

A command module defines ``register(subparsers)``, which adds its parser and sets ``func`` (a
function ``args -> int`` exit status).  Helpers shared by the verbs live here: reading a source file,
parsing + verifying it, writing an output atomically, and the usage error (exit 2).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from typing import IO

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError


class UsageError(Exception):
    """A bad combination of command-line arguments: the CLI prints it and exits 2."""


def read_source(path: str) -> str:
    """The text of ``path`` (``-`` reads stdin); a file that cannot be read is an MpkError."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise MpkError(Diagnostic(f"cannot read {path}: {e.strerror or e}")) from None
    except UnicodeDecodeError:
        raise MpkError(Diagnostic(f"{path} is not UTF-8 text")) from None


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def load(path: str) -> tuple[ir.Module, str]:
    """Read and parse a file (raises MpkError carrying the source for caret rendering)."""
    from mpkir.parser import parse

    text = read_source(path)
    try:
        return parse(text, display_name(path)), text
    except MpkError as e:
        e.source = text
        raise


def load_verified(path: str):
    """Read, parse and verify a file: returns (module, analysis, source); raises MpkError with every error."""
    from mpkir.verify import analyze

    module, text = load(path)
    analysis = analyze(module)
    if not analysis.ok:
        raise MpkError(analysis.diagnostics, text)
    return module, analysis, text


def write_atomic(path: str, write: Callable[[IO], None], binary: bool = False,
                 mode: int | None = None) -> None:
    """Write ``path`` through a temp file in the same folder and an atomic rename (never half-written)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        if mode is not None:
            os.chmod(tmp, mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | None, text: str, mode: int | None = None) -> None:
    """Write text to ``path`` atomically, or to stdout when ``path`` is None or ``-``."""
    if path is None or path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        write_atomic(path, lambda f: f.write(text), mode=mode)
    except OSError as e:
        raise MpkError(Diagnostic(f"cannot write {path}: {e.strerror or e}")) from None
