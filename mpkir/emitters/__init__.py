"""mpkir.emitters: output formats of ``mpkir opt`` (``--emit NAME`` / ``--emit-NAME``).

Each module in this package defines ``EMITTER = Emitter(name=..., help=..., emit=fn)`` where
``fn(module, analysis, args) -> str``; it is found automatically.  ``add_arguments(parser)`` may add
options of its own to ``opt``.  The canonical ``.mpk`` text (``mpk``) is built in.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Emitter:
    """One output format: ``emit(module, analysis, args)`` returns the text to write."""

    name: str
    help: str
    emit: Callable[[Any, Any, Any], str]
    add_arguments: Callable[[Any], None] | None = None


def _emit_mpk(module, analysis, args) -> str:
    from mpkir.printer import print_module

    return print_module(module)


MPK = Emitter("mpk", "canonical .mpk text (the default)", _emit_mpk)


def _broken(name: str, exc: BaseException) -> Emitter:
    def emit(module, analysis, args) -> str:
        raise RuntimeError(f"emitter module mpkir.emitters.{name} failed to import: "
                           f"{type(exc).__name__}: {exc}") from exc

    return Emitter(name, f"(unavailable: {type(exc).__name__} on import)", emit)


def discover() -> dict[str, Emitter]:
    """Every emitter: the built-in ``mpk`` and one per module of this package (sorted by name)."""
    found: dict[str, Emitter] = {MPK.name: MPK}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:  # a broken emitter must not take the whole CLI down
            found.setdefault(info.name, _broken(info.name, e))
            continue
        em = getattr(mod, "EMITTER", None)
        if isinstance(em, Emitter):
            found[em.name] = em
    return found
