"""The parser: IR it builds, spans it attaches, and inputs it refuses."""

from __future__ import annotations

import pytest

from mpkir import ir
from mpkir.diagnostics import MpkError, NodeSpan
from mpkir.parser import parse, parse_file

TINY = """\
model "tiny"
const hidden = 64
dim B <= 8                                    // symbolic dim: tokens in flight
serve { max_tokens = 8  mode = decode }
weight w[l < 2] : bf16[hidden, hidden] = "layers.{l}.w"
state kc[l < 2] : bf16[4, 16, 2, 8]
graph main(%x: bf16[B, hidden]) -> (bf16[B, hidden]) {
  %y = for l in 0..2 carry(%h = %x) {
    %a = linear(%h, @w[l]) schedule(tasks=4)   // per-op overrides
    %b = add(%a, %h) : bf16[B, hidden]
    yield %b
  }
  return %y
}
"""


def expr(text: str) -> ir.Expr:
    (d,) = parse(f"const a = {text}\n").decls
    return d.value


def test_developers_example_builds_the_ir():
    m = parse(TINY, "tiny.mpk")
    assert m.model_name == "tiny"
    assert [c.name for c in m.consts] == ["hidden"] and m.consts[0].value == ir.Num(64)
    assert m.dims == [ir.DimDecl("B", ir.Num(8))]
    assert m.serve.items == (ir.Attr("max_tokens", ir.Num(8)), ir.Attr("mode", ir.Name("decode")))
    w = m.weight("w")
    assert w.index == ir.LayerIndex("l", ir.Num(2))
    assert w.type == ir.TypeExpr(ir.DType.bf16, (ir.Name("hidden"), ir.Name("hidden")))
    assert w.checkpoint_name(1) == "layers.1.w"
    g = m.graph()
    assert g.params == (ir.Param("x", ir.TypeExpr(ir.DType.bf16, (ir.Name("B"), ir.Name("hidden")))),)
    loop = g.body[0]
    assert isinstance(loop, ir.ForStmt) and loop.results == ("y",) and loop.var == "l"
    assert loop.carries == (ir.Carry("h", ir.ValueRef("x")),)
    a, b, y = loop.body
    assert a == ir.OpStmt(("a",), "linear", (ir.ValueRef("h"), ir.GlobalRef("w", ir.Name("l"))), (),
                          (ir.Attr("tasks", ir.Num(4)),))
    assert b.types == (ir.TypeExpr(ir.DType.bf16, (ir.Name("B"), ir.Name("hidden"))),)
    assert y == ir.YieldStmt((ir.ValueRef("b"),))
    assert g.body[1] == ir.ReturnStmt((ir.ValueRef("y"),))


def test_spans_point_at_tokens():
    m = parse(TINY, "tiny.mpk")
    a = m.graph().body[0].body[0]
    assert (a.loc.file, a.loc.line, a.loc.col) == ("tiny.mpk", 9, 5)
    assert isinstance(a.loc, NodeSpan)
    op = a.loc.part("name")
    assert (op.line, op.col, op.end_col) == (9, 10, 16)
    res = a.loc.part("result")
    assert (res.line, res.col, res.end_col) == (9, 5, 7)
    w = m.weight("w").loc.part("checkpoint")
    assert (w.line, w.col) == (5, 42)
    assert (a.operands[1].loc.line, a.operands[1].loc.col) == (9, 21)
    assert a.loc.part("missing") is a.loc  # unknown parts fall back to the whole span


@pytest.mark.parametrize("text,want", [
    ("3", ir.Num(3)),
    ("-3", ir.Num(-3)),
    ("-3.5", ir.Num(-3.5)),
    ("1e-6", ir.Num(1e-6)),
    ("-(3)", ir.Neg(ir.Num(3))),
    ("--3", ir.Num(3)),
    ("-(-3)", ir.Neg(ir.Num(-3))),
    ("-a", ir.Neg(ir.Name("a"))),
    ("a - -3", ir.BinOp("-", ir.Name("a"), ir.Num(-3))),
    ("1 - 2 - 3", ir.BinOp("-", ir.BinOp("-", ir.Num(1), ir.Num(2)), ir.Num(3))),
    ("1 - (2 - 3)", ir.BinOp("-", ir.Num(1), ir.BinOp("-", ir.Num(2), ir.Num(3)))),
    ("1 + 2 * 3", ir.BinOp("+", ir.Num(1), ir.BinOp("*", ir.Num(2), ir.Num(3)))),
    ("(1 + 2) / 3", ir.BinOp("/", ir.BinOp("+", ir.Num(1), ir.Num(2)), ir.Num(3))),
])
def test_expressions(text, want):
    assert expr(text) == want


def test_attribute_values():
    m = parse('graph g(%x: f32[4]) -> (f32[4]) {\n'
              '  %y = f(%x, a=true, b=false, c="s\\n\\u00e9", d=[1, -1, [x]], e=[])\n  return %y\n}\n')
    attrs = {a.key: a.value for a in m.graph().body[0].attrs}
    assert attrs == {"a": ir.Bool(True), "b": ir.Bool(False), "c": ir.Str("s\né"),
                     "d": ir.ListVal((ir.Num(1), ir.Num(-1), ir.ListVal((ir.Name("x"),)))),
                     "e": ir.ListVal(())}


def test_comments_and_whitespace_are_ignored():
    src = "// RUN: mpkir check %s\n\tconst   a=1 // trailing\r\n\x0cconst b = a\n"
    assert [c.name for c in parse(src).consts] == ["a", "b"]


def test_strings_use_json_escapes():
    m = parse('model "a\\"b\\\\c\\t\\u00e9"\n')
    assert m.model_name == 'a"b\\c\té'


@pytest.mark.parametrize("src", [
    "const for = 1\n",
    "dim true <= 4\n",
    'weight graph : f32[4] = "w"\n',
    "state return : f32[4]\n",
    "const a = yield\n",
    "graph in() -> () {\n}\n",
    "graph g(%x: f32[4]) -> () {\n  %y = carry(%x)\n}\n",
    "graph g(%x: f32[4]) -> () {\n  %y = f(%x, model=1)\n}\n",
    "graph g(%x: f32[4]) -> () {\n  %y = for serve in 0..1 carry(%h = %x) {\n    yield %h\n  }\n}\n",
])
def test_keywords_are_not_names(src):
    with pytest.raises(MpkError) as e:
        parse(src)
    assert "is a keyword and cannot be used as a name" in str(e.value)


def test_dtype_words_may_name_things():
    m = parse("const f32 = 2\ngraph g(%x: bf16[f32]) -> () {\n  %y = cast(%x, dtype=f32)\n  return %y\n}\n")
    assert m.graph().body[0].attrs[0].value == ir.Name("f32")


def test_expected_list_is_short_and_human():
    with pytest.raises(MpkError) as e:
        parse("serve { x = }\n")
    msg = e.value.diagnostics[0].message
    assert msg == ("syntax error: unexpected '}'; expected one of a name, a number, a string, '(', '-', "
                   "'[', ...")
    with pytest.raises(MpkError) as e:
        parse("const a = 3 4\n")
    assert e.value.diagnostics[0].message.endswith("an operator (+ - * /)")


def test_errors_carry_the_source_for_rendering():
    with pytest.raises(MpkError) as e:
        parse("const x 3\n", "f.mpk")
    assert e.value.source == "const x 3\n"
    assert e.value.render().splitlines()[1] == "    1 | const x 3"


def test_parse_file_errors(tmp_path):
    with pytest.raises(MpkError) as e:
        parse_file(str(tmp_path / "missing.mpk"))
    assert e.value.diagnostics[0].message.startswith(f"cannot read {tmp_path / 'missing.mpk'}")
    bad = tmp_path / "bad.mpk"
    bad.write_bytes(b"const a = \xff\n")
    with pytest.raises(MpkError) as e:
        parse_file(str(bad))
    assert e.value.diagnostics[0].message == f"{bad} is not UTF-8 text"
    good = tmp_path / "good.mpk"
    good.write_text("const a = 1\n")
    m, text = parse_file(str(good))
    assert m.consts[0].loc.file == str(good) and text == "const a = 1\n"
