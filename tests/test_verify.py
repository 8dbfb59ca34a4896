"""The verifier: what `analyze` records (types, attributes, env) and the structural checks."""

from __future__ import annotations

import pytest

from mpkir import ir
from mpkir.diagnostics import MpkError
from mpkir.ops.base import OpDef
from mpkir.ops.registry import OPS
from mpkir.parser import parse
from mpkir.verify import analyze, verify

SRC = """\
const hidden = 8
const half = hidden / 2
const eps = 1e-5
dim B <= 4
weight w[l < 2] : f32[hidden, hidden] = "layers.{l}.w"
weight norm : f32[hidden] = "norm"
state cache[l < 2] : bf16[2, hidden]
graph main(%x: f32[B, hidden]) -> (f32[B, half], f32[B, half], i32[B]) {
  %y = for l in 0..2 carry(%h = %x) {
    %a = linear(%h, @w[l])
    yield %a
  }
  %n = rmsnorm(%y, @norm, eps=eps)
  %r = reshape(%n, shape=[B, 2, -1])
  %p, %q = split(%n, sizes=[half, half])
  %i = argmax(%p)
  return %p, %q, %i
}
"""


def msgs(src: str) -> list[str]:
    return [d.message for d in analyze(parse(src, "t.mpk")).diagnostics]


def test_analysis_records_env_types_and_attributes():
    m = parse(SRC)
    a = verify(m)
    assert a.ok and a.diagnostics == []
    assert a.env.consts == {"hidden": 8, "half": 4, "eps": 1e-5} and isinstance(a.env.consts["half"], int)
    assert a.env.dims == {"B": 4}
    assert a.globals["w"] == ir.TensorType(ir.DType.f32, (8, 8))
    assert a.globals["cache"] == ir.TensorType(ir.DType.bf16, (2, 8))
    t = a.graphs["main"].types
    assert t["x"] == t["h"] == t["a"] == t["y"] == ir.TensorType(ir.DType.f32, ("B", 8))
    assert t["r"] == ir.TensorType(ir.DType.f32, ("B", 2, 4))
    assert t["p"] == t["q"] == ir.TensorType(ir.DType.f32, ("B", 4))
    assert t["i"] == ir.TensorType(ir.DType.i32, ("B",))
    body = m.graph().body
    assert a.graphs["main"].attrs[id(body[1])] == {"eps": 1e-5}
    assert a.graphs["main"].attrs[id(body[2])] == {"shape": ("B", 2, -1)}
    assert a.graphs["main"].attrs[id(body[3])] == {"sizes": (4, 4), "axis": -1}
    assert a.serve.max_tokens == 1  # no serve block: defaults


def test_verify_raises_with_every_error():
    src = SRC.replace("%a = linear(%h, @w[l])", "%a = linear(%h, @w)").replace("argmax(%p)", "argmax(%zz)")
    with pytest.raises(MpkError) as e:
        verify(parse(src, "t.mpk"), src)
    assert [d.message for d in e.value.diagnostics] == [
        "'@w' is one tensor per layer: write @w[l]", "undefined value '%zz'"]
    assert e.value.source == src


@pytest.mark.parametrize("body,want", [
    ("  yield %x\n", ["'yield' cannot end a graph body (use 'return')"]),
    ("  return %x\n  %y = silu(%x)\n", ["statements after 'return' are unreachable"]),
    ("  %y = silu(%x)\n", ["graph 'g' does not end with 'return'"]),
    ("  %y = for l in 0..2 carry(%h = %x) {\n    return %h\n  }\n  return %y\n",
     ["'return' cannot end a loop body (use 'yield')"]),
    ("  %y = for l in 0..2 carry(%h = %x) {\n    %a = silu(%h)\n  }\n  return %y\n",
     ["loop body does not end with 'yield'"]),
    ("  %y = for l in 2..2 carry(%h = %x) {\n    yield %h\n  }\n  return %y\n", ["loop range 2..2 is empty"]),
    ("  %y = for n in 0..2 carry(%h = %x) {\n    yield %h\n  }\n  return %y\n",
     ["loop variable 'n' shadows another name"]),
    ("  %y = for l in 0..2 carry(%h = %x) {\n    %z = for l in 0..2 carry(%k = %h) {\n      yield %k\n    }\n"
     "    yield %z\n  }\n  return %y\n", ["loop variable 'l' shadows another name"]),
    ("  %y, %z = for l in 0..2 carry(%h = %x) {\n    yield %h\n  }\n  return %y\n",
     ["loop binds 2 result(s) but carries 1"]),
    ("  %y = for l in 0..2 carry(%h = %x) {\n    yield %h, %h\n  }\n  return %y\n",
     ["loop yields 2 value(s) but carries 1"]),
    ("  %y = for l in 0..2 carry(%h = %x) {\n    yield %h\n  }\n  return %h\n", ["undefined value '%h'"]),
    ("  %a, %b = silu(%x)\n  return %a\n", ["'silu' produces 1 result(s) but 2 name(s) are bound"]),
    ("  %a = silu(%x) : f32[4], f32[4]\n  return %a\n", ["2 type(s) annotated for 1 result(s)"]),
    ("  return %x, %x\n", ["graph 'g' returns 2 value(s) but declares 1"]),
])
def test_structure(body, want):
    assert msgs(f"const n = 1\ngraph g(%x: f32[4]) -> (f32[4]) {{\n{body}}}\n") == want


def test_declaration_checks():
    src = ('model "a"\nmodel "b"\nserve {\n}\nserve {\n}\nconst a = 1\ndim a <= 2\nweight a : f32[2] = "x"\n'
           'weight v : f32[2] = "v"\nweight v : f32[2] = "v"\nweight s : f32[B] = "s"\ndim B <= 2\n'
           'weight c[l < 0] : f32[2] = "{l}"\n'
           'graph g(%x: f32[2], %x: f32[2]) -> () {\n  return %x\n}\ngraph g() -> () {\n}\n')
    assert msgs(src) == [
        "more than one 'model' declaration",
        "more than one 'serve' block",
        "'a' is already defined",
        "weight 'a' has the name of a constant or dim",
        "weight 'v' is already defined",
        "weight 's' has symbolic dim 'B': weights need fixed shapes",
        "layer count of 'c' must be at least 1, got 0",
        "parameter '%x' is already defined",
        "graph 'g' returns 1 value(s) but declares 0",
        "graph 'g' is already defined",
    ]


def test_built_ir_without_locations_is_checked_too():
    m = ir.Module((ir.GraphDecl("g", (), (ir.TypeExpr(ir.DType.f32, (ir.Num(2),)),),
                                (ir.ReturnStmt((ir.ValueRef("nope"),)),)),))
    (d,) = analyze(m).diagnostics
    assert d.message == "undefined value '%nope'" and d.span is None


def test_an_operator_bug_is_a_diagnostic_not_a_crash(monkeypatch):
    def boom(types, attrs):
        raise IndexError("tuple index out of range")

    monkeypatch.setitem(OPS, "boom", OpDef("boom", ("x",), (), boom, lambda *a: (), "crashes"))
    (d,) = analyze(parse("graph g(%x: f32[]) -> (f32[]) {\n  %y = boom(%x)\n  return %y\n}\n")).diagnostics
    assert d.message == ("'boom': operands f32[] are not accepted (internal error in shape inference: "
                         "IndexError: tuple index out of range)")


def test_attribute_expressions_use_constants():
    src = ("const ax = 0 - 1\ndim B <= 2\ngraph g(%x: f32[B, 4]) -> (f32[B, 2, 2]) {\n"
           "  %y = reshape(%x, shape=[B, 2, 4 / 2])\n  %z = softmax(%y, axis=ax)\n  return %z\n}\n")
    assert msgs(src) == []
    bad = src.replace("shape=[B, 2, 4 / 2]", "shape=[B, -2, 2]")
    assert msgs(bad) == ["attribute 'shape': shape entries are dims, symbolic dims or -1, got -2"]
