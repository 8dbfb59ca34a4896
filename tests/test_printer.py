"""The printer: canonical text, minimal parentheses, and refusal of IR that has no text form."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpkir import ir
from mpkir.parser import parse
from mpkir.printer import print_expr, print_module

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.mpk"))

MESSY = """model   "m"   // a comment
const a=1
const b = (a+2)*3
dim B<=8
serve{max_tokens=8 mode=decode}
weight w[l<2]:f32[b,b]="l.{l}.w"
graph g(%x:f32[B,b])->(f32[B,b]){%y=for l in 0..2 carry(%h=%x){%z=linear(%h,@w[l])schedule(tasks=2):f32[B,b]
yield %z}
return %y}
"""

CANONICAL = """model "m"

const a = 1
const b = (a + 2) * 3

dim B <= 8

serve {
  max_tokens = 8
  mode = decode
}

weight w[l < 2] : f32[b, b] = "l.{l}.w"

graph g(%x: f32[B, b]) -> (f32[B, b]) {
  %y = for l in 0..2 carry(%h = %x) {
    %z = linear(%h, @w[l]) schedule(tasks=2) : f32[B, b]
    yield %z
  }
  return %y
}
"""


def test_canonical_text():
    assert print_module(parse(MESSY)) == CANONICAL
    assert print_module(parse(CANONICAL)) == CANONICAL


@pytest.mark.parametrize("e,text", [
    (ir.BinOp("-", ir.Name("a"), ir.BinOp("-", ir.Name("b"), ir.Name("c"))), "a - (b - c)"),
    (ir.BinOp("-", ir.BinOp("-", ir.Name("a"), ir.Name("b")), ir.Name("c")), "a - b - c"),
    (ir.BinOp("*", ir.BinOp("+", ir.Name("a"), ir.Num(1)), ir.Num(2)), "(a + 1) * 2"),
    (ir.BinOp("+", ir.Name("a"), ir.BinOp("*", ir.Num(1), ir.Num(2))), "a + 1 * 2"),
    (ir.BinOp("/", ir.Num(8), ir.BinOp("/", ir.Num(4), ir.Num(2))), "8 / (4 / 2)"),
    (ir.Neg(ir.Num(3)), "-(3)"),
    (ir.Neg(ir.Num(-3)), "-(-3)"),
    (ir.Num(-3), "-3"),
    (ir.Neg(ir.BinOp("+", ir.Name("a"), ir.Num(1))), "-(a + 1)"),
    (ir.Neg(ir.Neg(ir.Name("a"))), "--a"),
    (ir.BinOp("*", ir.Num(2), ir.Num(-1)), "2 * -1"),
    (ir.Num(1e-06), "1e-6"),
    (ir.Num(1e16), "1e16"),
    (ir.Num(-2.5e-300), "-2.5e-300"),
    (ir.Str('a"b\\é'), '"a\\"b\\\\\\u00e9"'),
    (ir.ListVal((ir.Num(1), ir.Bool(False), ir.ListVal(()))), "[1, false, []]"),
])
def test_expressions_print_and_reparse(e, text):
    assert print_expr(e) == text
    if not isinstance(e, (ir.Str, ir.ListVal)):
        (d,) = parse(f"const q = {text}\n").decls
        assert d.value == e


G = ir.GraphDecl("g", (ir.Param("x", ir.TypeExpr(ir.DType.f32, (ir.Num(4),))),), (), ())


@pytest.mark.parametrize("decl", [
    ir.ConstDecl("a", ir.Num(float("inf"))),
    ir.ConstDecl("a", ir.Num(float("nan"))),
    ir.ConstDecl("for", ir.Num(1)),
    ir.ConstDecl("a b", ir.Num(1)),
    ir.ConstDecl("a", ir.Name("true")),
    ir.ServeDecl((ir.Attr("9x", ir.Num(1)),)),
    ir.GraphDecl("g", (), (), (ir.OpStmt((), "silu", (ir.ValueRef("x"),)),)),
    ir.GraphDecl("g", (), (), (ir.OpStmt(("y",), "silu", (ir.ValueRef("a b"),)),)),
    ir.GraphDecl("g", (), (), (ir.ReturnStmt(()),)),
    ir.GraphDecl("g", (), (), (ir.ForStmt(("y",), "l", ir.Num(0), ir.Num(1), (), (ir.YieldStmt(()),)),)),
])
def test_unprintable_ir_is_refused(decl):
    with pytest.raises(ValueError, match="cannot print"):
        print_module(ir.Module((decl,)))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_print_to_a_fixpoint(path):
    m = parse(path.read_text(), str(path))
    text = print_module(m)
    assert parse(text) == m
    assert print_module(parse(text)) == text
