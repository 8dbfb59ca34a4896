"""The ``//`` comments of a ``.mpk`` source, so that formatting keeps them (``mpkir fmt``).

The parser drops comments; :func:`scan_comments` finds them again (a ``//`` inside a string literal, which
never spans lines, is not a comment), and :class:`CommentCursor` hands them to the printer by source line:
a comment belongs to the declaration or statement that follows it, or, written after code on the same
line, trails that code.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Comment:
    line: int            # 1-based source line
    text: str            # from ``//`` to the end of the line, trailing blanks removed
    own_line: bool       # nothing but blanks before it on its line


def _comment_start(line: str) -> int:
    """Column (0-based) of the ``//`` that starts a comment on this line, or -1."""
    in_string = False
    i = 0
    while i < len(line):
        c = line[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "/" and line.startswith("//", i):
            return i
        i += 1
    return -1


def scan_comments(source: str) -> list[Comment]:
    """Every comment of ``source``, in order."""
    lines = source.splitlines()
    out = []
    for n, line in enumerate(lines):
        col = _comment_start(line)
        if col < 0:
            continue
        out.append(Comment(n + 1, line[col:].rstrip(), not line[:col].strip()))
    return out


@dataclass(frozen=True)
class Layout:
    """What the printer keeps of a source besides the IR: its comments and where it had blank lines."""

    comments: tuple[Comment, ...] = ()
    blank_lines: frozenset[int] = frozenset()


def scan_layout(source: str) -> Layout:
    blank = frozenset(n + 1 for n, line in enumerate(source.splitlines()) if not line.strip())
    return Layout(tuple(scan_comments(source)), blank)


class CommentCursor:
    """The comments not printed yet, taken in source order by the printer."""

    def __init__(self, layout: Layout | None = None):
        self.active = layout is not None   # without a layout the printer prints no comments, no blank lines
        layout = layout or Layout()
        self._left = sorted(layout.comments, key=lambda c: c.line)
        self._blank = sorted(layout.blank_lines)
        self._blank_set = layout.blank_lines

    def blank_above(self, c: Comment) -> bool:
        """An own-line comment with a blank line right above it."""
        return c.own_line and c.line - 1 in self._blank_set

    def blank_below(self, c: Comment) -> bool:
        """An own-line comment with a blank line right below it."""
        return c.own_line and c.line + 1 in self._blank_set

    def blank_between(self, after: int | None, before: int | None) -> bool:
        """Whether the source had a blank line strictly between these two lines."""
        if after is None or before is None:
            return False
        i = bisect.bisect_right(self._blank, after)
        return i < len(self._blank) and self._blank[i] < before

    def before(self, line: int | None) -> list[Comment]:
        """Every comment above ``line`` (all that are left when ``line`` is None)."""
        if line is None:
            taken, self._left = self._left, []
            return taken
        n = 0
        while n < len(self._left) and self._left[n].line < line:
            n += 1
        taken, self._left = self._left[:n], self._left[n:]
        return taken

    def trailing(self, line: int) -> Comment | None:
        """The comment written after code on ``line``, if any."""
        if self._left and self._left[0].line == line and not self._left[0].own_line:
            return self._left.pop(0)
        return None

    def within(self, first: int, last: int) -> tuple[list[Comment], Comment | None]:
        """The comments inside lines ``first..last`` of a node printed on one line: (those printed above it,
        the one that trails it: the last one, if it was written after code)."""
        n = 0
        while n < len(self._left) and self._left[n].line <= last:
            n += 1
        inside = [c for c in self._left[:n] if c.line >= first]
        self._left = [c for c in self._left[:n] if c.line < first] + self._left[n:]
        if inside and not inside[-1].own_line:   # the last one, written after code, trails the node
            return inside[:-1], inside[-1]
        return inside, None
