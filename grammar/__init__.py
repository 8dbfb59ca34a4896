"""The .mpk grammar (``mpk.lark``), shipped as package data and loaded with :func:`load_grammar`."""

from __future__ import annotations

from importlib import resources


def grammar_text() -> str:
    """The Lark source of the .mpk grammar."""
    return resources.files(__name__).joinpath("mpk.lark").read_text(encoding="utf-8")
