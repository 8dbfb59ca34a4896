"""Source spans and diagnostics rendered as ``FILE:LINE:COL: error: msg`` with the line and a caret."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A 1-based source range."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class NodeSpan(Span):
    """A node's span plus the spans of named parts (an op's name, result names, a checkpoint string).

    The parser attaches these so diagnostics can point at the offending token; ``part`` falls back to
    the whole span.
    """

    parts: tuple[tuple[str, Span], ...] = ()

    def part(self, key: str, index: int = 0) -> Span:
        found = [s for k, s in self.parts if k == key]
        return found[index] if index < len(found) else self


def part(loc: Span | None, key: str, index: int = 0) -> Span | None:
    """The span of a named part of a node (see :class:`NodeSpan`), else the node's span."""
    return loc.part(key, index) if isinstance(loc, NodeSpan) else loc


def source_lines(source: str) -> list[str]:
    """Lines as the parser counts them (only ``\\n`` ends a line)."""
    return [ln[:-1] if ln.endswith("\r") else ln for ln in source.split("\n")]


MAX_SHOWN = 160
"""Longest source excerpt a rendered diagnostic shows (longer lines are cut around the caret)."""


@dataclass(frozen=True)
class Diagnostic:
    """One message about the input, optionally located."""

    message: str
    span: Span | None = None
    severity: str = "error"
    notes: tuple[str, ...] = field(default=())

    def render(self, source: str | None = None) -> str:
        """``file:line:col: error: message``, then the source line and a ``^~~`` caret."""
        where = f"{self.span}: " if self.span else ""
        out = [f"{where}{self.severity}: {self.message}"]
        if self.span is not None and source is not None:
            lines = source_lines(source)
            if 1 <= self.span.line <= len(lines):
                text = "".join(c if c.isprintable() else " " for c in lines[self.span.line - 1])
                col = self.span.col
                width = 1
                if self.span.end_line == self.span.line and self.span.end_col:
                    width = max(1, self.span.end_col - self.span.col)
                width = min(width, max(1, len(text) - col + 1))
                if len(text) > MAX_SHOWN:  # a window of a very long line around the caret
                    start = max(0, min(col - 1 - MAX_SHOWN // 2, len(text) - MAX_SHOWN))
                    text = ("..." if start else "") + text[start:start + MAX_SHOWN] + (
                        "..." if start + MAX_SHOWN < len(text) else "")
                    col = col - start + (3 if start else 0)
                    width = min(width, MAX_SHOWN // 2)
                gutter = f"{self.span.line:>5} | "
                out.append(gutter + text)
                caret = " " * (col - 1) + "^" + "~" * (width - 1)
                out.append(" " * (len(gutter) - 2) + "| " + caret)
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)


class MpkError(Exception):
    """Raised with one or more diagnostics; the CLI prints them and exits 1 (never a traceback)."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic, source: str | None = None):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        self.source = source
        super().__init__("\n".join(d.message for d in self.diagnostics))

    def render(self, source: str | None = None) -> str:
        src = source if source is not None else self.source
        return "\n".join(d.render(src) for d in self.diagnostics)


def error(message: str, span: Span | None = None, *notes: str) -> MpkError:
    """Shorthand: an :class:`MpkError` carrying one error diagnostic."""
    return MpkError(Diagnostic(message, span, notes=tuple(notes)))
