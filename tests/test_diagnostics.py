"""Every diagnostic category of `check`: exact message, location (line:col) and the rendered caret."""

from __future__ import annotations

import pytest

from mpkir.diagnostics import Diagnostic, MpkError, Span
from mpkir.parser import parse
from mpkir.verify import analyze

HEAD = 'const n = 4\ndim B <= 8\nweight w : f32[8, 4] = "w"\nweight wl[l < 2] : f32[4, 4] = "layers.{l}.w"\n'
IDENT = "graph g(%x: f32[4]) -> (f32[4]) {\n  return %x\n}\n"


def G(body: str) -> str:
    """A module whose graph body starts on line 6."""
    return HEAD + "graph main(%x: f32[B, 4]) -> (f32[B, 4]) {\n" + body + "}\n"


def diagnostics(src: str) -> list[Diagnostic]:
    try:
        m = parse(src, "t.mpk")
    except MpkError as e:
        return e.diagnostics
    return analyze(m).diagnostics


def located(src: str) -> list[tuple[int, int, str]]:
    out = []
    for d in diagnostics(src):
        assert d.span is not None and d.span.file == "t.mpk", d
        out.append((d.span.line, d.span.col, d.message))
    return out


CASES = {
    # ---- syntax errors, with what was expected
    "missing '=' in const": ("const x 3\n", [
        (1, 9, "syntax error: unexpected '3': missing '=' in a constant declaration (const NAME = VALUE)")]),
    "missing '=' after results": (G("  %y silu(%x)\n  return %y\n"), [
        (6, 6, "syntax error: unexpected 'silu': missing '=' after the result names (%r = op(...))")]),
    "unclosed brace": (G("  %y = silu(%x)\n  return %y\n")[:-2], [
        (5, 42, "syntax error: '{' is never closed: expected '}' before the end of file")]),
    "missing ')'": (G("  %y = silu(%x\n  return %y\n"), [
        (7, 3, "syntax error: unexpected 'return'; expected ')' or ','")]),
    "unexpected character": ("const a = 3 $ 4\n", [(1, 13, "syntax error: unexpected character '$'")]),
    "unexpected end of file": ("const a = 3 +\n", [
        (1, 14, "syntax error: unexpected end of file; expected a name, a number, '(' or '-'")]),
    "bare name as operand": (G("  %y = add(x, %x)\n  return %y\n"), [
        (6, 12, "syntax error: expected '=' after 'x': attributes and settings are written key=value; "
                "operands are %values or @weights")]),
    "missing ','": (G("  %y = add(%x %x)\n  return %y\n"), [
        (6, 15, "syntax error: unexpected '%x': missing ',' between arguments")]),
    "bad dtype": ('weight w : f64[4] = "w"\n', [
        (1, 12, "syntax error: unexpected 'f64'; expected a dtype (bf16, f16, f32, i32, i64, u8)")]),
    "misspelt declaration": ('wieght w : f32[4] = "w"\n', [
        (1, 1, "syntax error: unexpected 'wieght'; expected end of file or a declaration (model, const, dim, "
               "serve, weight, state or graph)")]),
    "unterminated string": ('model "abc\n', [
        (1, 7, "syntax error: unterminated string (strings end on the same line with '\"')")]),
    "lone %": (G("  % = silu(%x)\n  return %x\n"), [
        (6, 3, "syntax error: '%' must be followed by the name of a value")]),
    "operand after attribute": (G("  %y = add(%x, k=1, %x)\n  return %y\n"), [
        (6, 21, "operand after keyword attribute: operands come first, then key=value attributes")]),
    "missing ':'": ('weight w f32[4] = "w"\n', [
        (1, 10, "syntax error: unexpected 'f32': missing ':' before the type")]),
    "dim with '='": ("dim B = 8\n", [
        (1, 7, "syntax error: unexpected '=': missing '<=' in a dim declaration (dim NAME <= BOUND)")]),
    "graph without results": ("graph g(%x: f32[4]) {\n}\n", [
        (1, 21, "syntax error: unexpected '{': a graph needs a result list: -> (TYPE, ...)")]),
    "type without shape": ("graph g(%x: f32) -> () {\n}\n", [
        (1, 16, "syntax error: unexpected ')': a tensor type needs a shape in brackets, e.g. f32[4, n]")]),
    "statement without result": (G("  silu(%x)\n  return %x\n"), [
        (6, 3, "syntax error: unexpected 'silu': statements must start with a result (%name = ...), 'return' "
               "or 'yield'")]),
    "keyword as name": ("const model = 1\n", [(1, 7, "'model' is a keyword and cannot be used as a name")]),
    "integer too large": ("const a = 99999999999999999999\n", [
        (1, 11, "integer 99999999999999999999 is too large (at most 9223372036854775807)")]),
    "float out of range": ("const a = 1e999\n" + IDENT, [(1, 11, "number 1e999 is out of range")]),
    "bad string escape": ('model "a\\qb"\n', [
        (1, 9, 'invalid escape in string: use \\" \\\\ \\/ \\b \\f \\n \\r \\t or \\uXXXX')]),
    # ---- operators
    "unknown operator": (G("  %y = linaer(%x, @w)\n  return %y\n"), [(6, 8, "unknown operator 'linaer'")]),
    "too few operands": (G("  %y = add(%x)\n  return %y\n"), [
        (6, 8, "'add' takes 2 operand(s) (a, b), got 1")]),
    "too many operands": (G("  %y = silu(%x, %x)\n  return %y\n"), [
        (6, 17, "'silu' takes 1 operand(s) (x), got 2")]),
    "unknown attribute": (G("  %y = silu(%x, alpha=1)\n  return %y\n"), [
        (6, 17, "'silu' has no attribute 'alpha'")]),
    "ill-typed attribute": (G("  %y = softmax(%x, axis=1.5)\n  return %y\n"), [
        (6, 25, "attribute 'axis': expected an integer, got 1.5")]),
    "bad enum attribute": (G("  %y = gelu(%x, approximate=exact)\n  return %y\n"), [
        (6, 29, "attribute 'approximate': expected one of none, tanh")]),
    "missing attribute": (G("  %y = reshape(%x)\n  return %y\n"), [
        (6, 8, "'reshape' needs attribute 'shape'")]),
    "attribute twice": (G("  %y = softmax(%x, axis=0, axis=1)\n  return %y\n"), [
        (6, 28, "attribute 'axis' given twice")]),
    # ---- values
    "undefined value": (G("  %y = add(%x, %z)\n  return %y\n"), [(6, 16, "undefined value '%z'")]),
    "redefined value": (G("  %y = silu(%x)\n  %y = silu(%x)\n  return %y\n"), [
        (7, 3, "value '%y' is already defined")]),
    "undefined weight": (G("  %y = linear(%x, @nope)\n  return %y\n"), [
        (6, 19, "undefined weight or state '@nope'")]),
    "per-layer weight without index": (G("  %y = linear(%x, @wl)\n  return %y\n"), [
        (6, 19, "'@wl' is one tensor per layer: write @wl[l]")]),
    "layer index out of range": (G("  %y = linear(%x, @wl[2])\n  return %y\n"), [
        (6, 23, "index 2 of '@wl' is out of range 0..1")]),
    "loop beyond layer count": (
        G("  %y = for l in 0..3 carry(%h = %x) {\n    %a = linear(%h, @wl[l])\n    yield %a\n  }\n"
          "  return %y\n"),
        [(7, 21, "loop runs l over 0..3 but '@wl' has 2 layer(s)")]),
    # ---- shapes and dtypes (both shapes named)
    "annotation mismatch": (G("  %y = silu(%x) : f32[B, 5]\n  return %y\n"), [
        (6, 19, "'silu' result '%y' has type f32[B, 4] but is annotated f32[B, 5]")]),
    "return type mismatch": (G("  %y = linear(%x, @w)\n  return %y\n"), [
        (7, 10, "graph 'main' result 0 has type f32[B, 8] but the signature says f32[B, 4]")]),
    "yield type mismatch": (
        G("  %y = for l in 0..2 carry(%h = %x) {\n    %a = linear(%h, @w)\n    yield %a\n  }\n  return %y\n"),
        [(8, 11, "loop yields f32[B, 8] for carried '%h' of type f32[B, 4]")]),
    "symbolic dim in arithmetic": ("dim B <= 4\ngraph g(%x: f32[B * 2]) -> (f32[4]) {\n  return %x\n}\n", [
        (2, 17, "symbolic dim 'B' cannot be used in an expression")]),
    "undefined name in shape": ("graph g(%x: f32[m]) -> (f32[4]) {\n  return %x\n}\n", [
        (1, 17, "undefined name 'm'")]),
    "one error, no cascade": (
        "const a = 1 / 0\ndim B <= a\n"
        "graph g(%x: f32[B, a]) -> (f32[B]) {\n  %y = silu(%x)\n  return %y\n}\n",
        [(1, 11, "division by zero")]),
    "integer overflow": ("const a = 4294967296 * 4294967296\n" + IDENT, [
        (1, 11, "integer overflow: the value does not fit in 64 bits")]),
    "no graph": ("const a = 1\n", [
        (1, 1, "module has no graph: write graph NAME(%x: TYPE, ...) -> (TYPE, ...) { ... }")]),
    # ---- unbound weight names
    "placeholder without layer index": ('weight w : f32[4] = "a.{l}.w"\n' + IDENT, [
        (1, 21, "unbound name '{l}' in checkpoint name \"a.{l}.w\": the weight has no layer index")]),
    "placeholder that is not the index": ('weight w[l < 2] : f32[4] = "a.{i}.w"\n' + IDENT, [
        (1, 28, "unbound name '{i}' in checkpoint name \"a.{i}.w\": the layer index is 'l'"),
        (1, 28, "weight 'w' is indexed by 'l' but its checkpoint name \"a.{i}.w\" does not contain '{l}': "
                "every layer would bind the same tensor")]),
    "indexed weight without placeholder": ('weight w[l < 2] : f32[4] = "a.w"\n' + IDENT, [
        (1, 28, "weight 'w' is indexed by 'l' but its checkpoint name \"a.w\" does not contain '{l}': "
                "every layer would bind the same tensor")]),
    # ---- serve configurations that cannot work
    "page size does not divide max_seq_len": ("serve {\n  max_seq_len = 100\n  page_size = 16\n}\n" + IDENT, [
        (3, 15, "serve: page_size 16 does not divide max_seq_len 100")]),
    "too few pages": ("serve {\n  max_seq_len = 128\n  page_size = 16\n  num_pages = 4\n}\n" + IDENT, [
        (4, 15, "serve: 4 pages of 16 positions cannot hold one sequence of max_seq_len 128")]),
    "fewer pages than requests": ("serve {\n  max_requests = 8\n  max_seq_len = 16\n  page_size = 16\n"
                                  "  num_pages = 4\n}\n" + IDENT, [
        (5, 15, "serve: num_pages 4 is fewer than max_requests 8: every request needs at least one page")]),
    "max_tokens < max_requests": ("serve {\n  max_requests = 4\n  max_tokens = 2\n}\n" + IDENT, [
        (3, 16, "serve: max_tokens 2 is fewer than max_requests 4")]),
    "speculative decode tokens": ("serve {\n  speculative = ngram\n  max_requests = 2\n  max_tokens = 4\n}\n"
                                  + IDENT, [
        (4, 16, "serve: max_tokens 4 is fewer than max_requests 2 x 5 token(s) per request per "
                "decode step")]),
    "every independent serve error": (
        "serve {\n  page_size = 0\n  top_p = 1.5\n  max_tokens = 0\n  mode = fast\n  max_sequence = 4\n"
        "  gpus = 3\n  temperature = -1\n  sampling = sample\n  speculative = ngram\n}\n" + IDENT, [
            (2, 15, "serve: page_size must be at least 1, got 0"),
            (3, 11, "serve: top_p must be in (0, 1], got 1.5"),
            (4, 16, "serve: max_tokens must be at least 1, got 0"),
            (5, 10, "serve setting 'mode': expected one of decode, prefill, mixed"),
            (6, 3, "unknown serve setting 'max_sequence'"),
            (7, 10, "serve: gpus must be a power of two, got 3"),
            (8, 17, "serve: temperature must not be negative, got -1.0"),
            (10, 17, "serve: speculative = ngram needs sampling = greedy (greedy acceptance)")]),
    "serve setting twice": ("serve {\n  seed = 1\n  seed = 2\n}\n" + IDENT, [
        (3, 3, "serve setting 'seed' given twice")]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_diagnostic(name):
    src, want = CASES[name]
    assert located(src) == want


def test_notes_point_back_and_suggest():
    (d,) = diagnostics(G("  %y = silu(%x)\n  %y = silu(%x)\n  return %y\n"))
    assert d.notes == ("first defined at t.mpk:6:3",)
    (d,) = diagnostics(G("  %y = linaer(%x, @w)\n  return %y\n"))
    assert d.notes == ("did you mean 'linear'?",)
    (d,) = diagnostics("serve {\n  max_sequence = 4\n}\n" + IDENT)
    assert d.notes == ("did you mean 'max_seq_len'?",)
    (d,) = diagnostics(G("  %y = silu(%x, alpha=1)\n  return %y\n"))
    assert d.notes == ("'silu' takes no attributes",)


def test_render_shows_line_and_caret():
    src = G("  %y = linaer(%x, @w)\n  return %y\n")
    (d,) = diagnostics(src)
    assert d.render(src) == (
        "t.mpk:6:8: error: unknown operator 'linaer'\n"
        "    6 |   %y = linaer(%x, @w)\n"
        "      |        ^~~~~~\n"
        "note: did you mean 'linear'?")


def test_render_syntax_error_caret_and_note():
    src = "const x 3\n"
    (d,) = diagnostics(src)
    assert d.render(src) == (
        "t.mpk:1:9: error: syntax error: unexpected '3': missing '=' in a constant declaration "
        "(const NAME = VALUE)\n"
        "    1 | const x 3\n"
        "      |         ^\n"
        "note: expected '='")


def test_render_counts_lines_like_the_parser():
    # a form feed is whitespace to the parser but a line break to str.splitlines
    src = "const a = 1 \x0c const c = 2\nconst b = 1 / 0\n" + IDENT
    (d,) = diagnostics(src)
    assert (d.span.line, d.span.col) == (2, 11)
    assert d.render(src).split("\n")[1] == "    2 | const b = 1 / 0"


def test_render_without_source_or_span():
    assert Diagnostic("boom").render() == "error: boom"
    assert Diagnostic("boom", Span("f", 3, 2)).render() == "f:3:2: error: boom"
    assert Diagnostic("boom", Span("f", 9, 1)).render("one line\n") == "f:9:1: error: boom"


def test_mpkerror_render_joins_all():
    src = G("  %y = add(%x, %z)\n  %q = nope(%x)\n  return %y\n")
    with pytest.raises(MpkError) as ei:
        from mpkir.verify import verify
        verify(parse(src, "t.mpk"), src)
    text = ei.value.render()
    assert text.count("error:") == 2
    assert "t.mpk:6:16: error: undefined value '%z'" in text
    assert "t.mpk:7:8: error: unknown operator 'nope'" in text


def test_cli_check_prints_every_error(tmp_path, capsys):
    from mpkir.cli import main

    f = tmp_path / "bad.mpk"
    f.write_text(G("  %y = add(%x, %z)\n  %q = nope(%x)\n  return %y\n"))
    assert main(["check", str(f)]) == 1
    err = capsys.readouterr().err
    assert ":6:16: error: undefined value '%z'" in err
    assert ":7:8: error: unknown operator 'nope'" in err
    assert "Traceback" not in err


def test_long_lines_are_cut_around_the_caret():
    src = "const a = " + " + ".join(["1"] * 400) + " + $\n"
    (d,) = diagnostics(src)
    _, line, caret = d.render(src).split("\n")
    assert line.startswith("    1 | ...") and len(line) < 200
    assert line[caret.index("^")] == "$"


def test_deep_nesting_is_an_error_not_a_recursion_crash():
    (d,) = diagnostics("const a = " + "-" * 5000 + "b\n")
    assert d.message == "nested too deeply (more than 200 levels)"
    assert (d.span.line, d.span.col) == (1, 210)
