"""``mpkir fmt`` keeps comments and blank lines: nothing a user wrote is lost, printing stays a fixpoint,
and the IR read back is the IR of the input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpkir.comments import scan_comments, scan_layout
from mpkir.parser import parse
from mpkir.printer import print_module
from mpkir.testing.strategies import sources

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.mpk"))


def fmt(text: str) -> str:
    return print_module(parse(text, "t.mpk"), scan_layout(text))


def comment_texts(text: str) -> list[str]:
    return [c.text for c in scan_comments(text)]


def check_kept(text: str) -> str:
    out = fmt(text)
    assert comment_texts(out) == comment_texts(text)
    assert parse(out, "out.mpk") == parse(text, "t.mpk")
    assert fmt(out) == out
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_in_canonical_form_with_their_comments(path):
    text = path.read_text()
    assert comment_texts(text), "the examples document themselves"
    assert check_kept(text) == text


def test_a_double_slash_inside_a_string_is_not_a_comment():
    text = 'weight w : f32[2] = "a//b"  // real\n'
    assert comment_texts(text) == ["// real"]
    assert fmt(text) == text


CASES = {
    "trailing comments of consecutive lines line up; a blank line ends the run": (
        "const a = 1 // one\nconst bbbb = 2   // two\n\nconst c = 3 // three\n",
        "const a = 1     // one\nconst bbbb = 2  // two\n\nconst c = 3  // three\n"),
    "several blank lines become one; comment blocks keep their blank lines": (
        "// head\n\n\nmodel \"m\"\n// about a\n\n// more\nconst a = 1\n\n\n\nconst b = 2\n// tail\n",
        "// head\n\nmodel \"m\"\n\n// about a\n\n// more\nconst a = 1\n\nconst b = 2\n// tail\n"),
    "comments inside an op that spans lines: the last trailing one stays, the rest go above": (
        "dim B <= 4\nconst h = 8\ngraph g(%x: f32[B, h]) -> (f32[B, h]) {\n"
        "  %y = add(%x, // first\n   // own line\n    %x) // last\n  return %y\n}\n",
        "dim B <= 4\n\nconst h = 8\n\ngraph g(%x: f32[B, h]) -> (f32[B, h]) {\n  // first\n  // own line\n"
        "  %y = add(%x, %x)  // last\n  return %y\n}\n"),
    "no blank line right after a block's opening line, with or without its trailing comment": (
        "serve { // c\n\n  max_tokens = 8\n}\nserve {\n\n  mode = decode\n}\n",
        "serve {  // c\n  max_tokens = 8\n}\n\nserve {\n  mode = decode\n}\n"),
    "serve items, a header, a closing brace and the end of the block keep theirs": (
        "serve { // the config\n  max_tokens = 8 // tokens\n  // left inside\n} // done\n",
        "serve {           // the config\n  max_tokens = 8  // tokens\n  // left inside\n}  // done\n"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layout_cases(name):
    text, want = CASES[name]
    assert check_kept(text) == want


_COMMA = re.compile(r'"(?:\\.|[^"\\\n])*"|, ')   # a string, or a comma outside strings


def _reflow(line: str, breaks: list[bool]) -> list[str]:
    """Break a line after some of its commas (outside strings): the grammar ignores whitespace."""
    parts, start, k = [], 0, 0
    for m in _COMMA.finditer(line):
        if m.group() != ", ":
            continue
        if k < len(breaks) and breaks[k]:
            parts.append(line[start:m.end()].rstrip())
            start = m.end()
        k += 1
    parts.append(line[start:])
    return [parts[0]] + ["      " + p for p in parts[1:]]


@settings(max_examples=40, deadline=None)
@given(src=sources(), data=st.data())
def test_fmt_keeps_every_comment_of_random_sources_in_order(src, data):
    """Random valid modules, lines broken after commas, comments on lines of their own (with or without
    blank lines around) and after code, texts holding quotes and slashes: every comment survives, in
    order; the IR is unchanged; the output is a fixpoint."""
    lines: list[str] = []
    word = st.text(alphabet='ab "/{}%', max_size=8)
    for n, line in enumerate(src.splitlines()):
        if data.draw(st.booleans(), label="comment above"):
            if data.draw(st.booleans(), label="blank above"):
                lines.append("")
            lines.append(" " * data.draw(st.integers(0, 4)) + f"// c{n}a {data.draw(word)}")
        pieces = _reflow(line, data.draw(st.lists(st.booleans(), max_size=6), label="breaks"))
        for k, piece in enumerate(pieces):
            if piece.strip() and data.draw(st.integers(0, 3), label="trailing") == 0:
                piece += f"  // c{n}t{k} {data.draw(word)}"
            lines.append(piece)
    text = "\n".join(lines) + "\n"
    check_kept(text)
