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
            lines = source.splitlines()
            if 1 <= self.span.line <= len(lines):
                text = lines[self.span.line - 1].expandtabs(1)
                gutter = f"{self.span.line:>5} | "
                out.append(gutter + text)
                width = 1
                if self.span.end_line == self.span.line and self.span.end_col:
                    width = max(1, self.span.end_col - self.span.col)
                width = min(width, max(1, len(text) - self.span.col + 1))
                out.append(" " * (len(gutter) - 2) + "| " + " " * (self.span.col - 1) + "^" + "~" * (width - 1))
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
