"""Fuzzing `check`: mutated valid sources either check or raise MpkError with located diagnostics."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mpkir.diagnostics import MpkError, source_lines
from mpkir.parser import parse
from mpkir.printer import print_module
from mpkir.testing import strategies as S
from mpkir.verify import verify


def check_source(text: str) -> None:
    """What ``mpkir check`` does with a file: parse, then verify (raises MpkError).

    Whatever parses also prints back to text that parses to the same module.
    """
    m = parse(text, "fuzz.mpk")
    assert parse(print_module(m)) == m
    verify(m, text)


def _assert_located(e: MpkError, text: str) -> None:
    lines = source_lines(text)
    assert e.diagnostics
    for d in e.diagnostics:
        assert d.span is not None, d.message
        assert d.span.file == "fuzz.mpk"
        assert 1 <= d.span.line <= len(lines), (d.span, d.message)
        assert 1 <= d.span.col <= len(lines[d.span.line - 1]) + 1, (d.span, d.message)
        assert d.message and "Traceback" not in d.message
        assert "internal error" not in d.message, d.message
        rendered = d.render(text)
        assert rendered.startswith(f"fuzz.mpk:{d.span.line}:{d.span.col}: error: ")
        assert "^" in rendered.split("\n")[2]
    e.render(text)


@settings(max_examples=150)
@given(S.mutated_sources())
def test_check_never_crashes_on_mutated_sources(text):
    try:
        check_source(text)
    except MpkError as e:
        _assert_located(e, text)


@settings(max_examples=100)
@given(st.text(alphabet=st.sampled_from(list("graph(%x: f32[4]) -> {}=@w,linear return1.5e\"\n\t/ ")),
               max_size=80))
def test_check_never_crashes_on_random_text(text):
    try:
        check_source(text)
    except MpkError as e:
        _assert_located(e, text)
