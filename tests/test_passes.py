"""The pass manager and the IR passes: unroll, dce, fold-constants, infer-shapes, verify."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpkir import ir
from mpkir.diagnostics import MpkError
from mpkir.ops.base import OpDef
from mpkir.ops.registry import OPS
from mpkir.parser import parse
from mpkir.passes import manager
from mpkir.passes.dce import dce
from mpkir.passes.fold import fold_constants
from mpkir.passes.infer_shapes import infer_shapes
from mpkir.passes.manager import (
    PASSES,
    PipelineError,
    PrintIRAfterAll,
    Timing,
    VerifyEach,
    parse_pipeline,
    pipeline_spec,
    run_passes,
)
from mpkir.passes.unroll import unroll
from mpkir.printer import print_module
from mpkir.verify import analyze, verify

LOOPED = """
model "loops"
const hidden = 16
const layers = 3
const inner = 2
dim B <= 4
weight w[l < layers] : bf16[hidden, hidden] = "layers.{l}.w"
weight v[l < layers] : bf16[hidden, hidden] = "layers.{l}.v"
graph main(%x: bf16[B, hidden]) -> (bf16[B, hidden], bf16[B, hidden]) {
  %y, %z = for l in 0..layers carry(%h = %x, %g = %x) {
    %a = linear(%h, @w[l]) schedule(tasks=4)
    %q = for j in 0..inner carry(%k = %a) {
      %c = linear(%k, @v[l])
      yield %c
    }
    %b = add(%q, %g) : bf16[B, hidden]
    yield %b, %h
  }
  %o = add(%y, %z)
  return %o, %y
}
"""


def _ops(m: ir.Module) -> list[ir.OpStmt]:
    out: list[ir.OpStmt] = []

    def walk(body):
        for s in body:
            if isinstance(s, ir.OpStmt):
                out.append(s)
            elif isinstance(s, ir.ForStmt):
                walk(s.body)

    for g in m.graphs:
        walk(g.body)
    return out


def _by_result(m: ir.Module) -> dict[str, ir.OpStmt]:
    return {r: s for s in _ops(m) for r in s.results}


def _operands(s: ir.OpStmt) -> list[str]:
    return [f"%{o.name}" if isinstance(o, ir.ValueRef) else f"@{o.name}[{o.index.value}]" for o in s.operands]


# ------------------------------------------------------------------------------------------ unroll


def test_unroll_renames_and_rewires():
    m = parse(LOOPED)
    verify(m)
    u = unroll(m)
    verify(u)  # the unrolled module is valid IR
    g = u.graph()
    assert not any(isinstance(s, ir.ForStmt) for s in g.body)
    ops = _by_result(u)
    # 3 iterations x (1 + 2 inner + 1) ops, plus the final add
    assert len(_ops(u)) == 3 * 4 + 1
    assert set(ops) == {f"a.{i}" for i in range(3)} | {f"c.{i}.{j}" for i in range(3) for j in range(2)} \
        | {f"b.{i}" for i in range(3)} | {"o"}
    # @w[l] becomes a literal index; carried %h is the previous iteration's yield
    assert _operands(ops["a.0"]) == ["%x", "@w[0]"]
    assert _operands(ops["a.1"]) == ["%b.0", "@w[1]"]
    assert _operands(ops["a.2"]) == ["%b.1", "@w[2]"]
    # nested loop: inner carry chains through the inner iterations, names get both indices
    assert _operands(ops["c.1.0"]) == ["%a.1", "@v[1]"]
    assert _operands(ops["c.1.1"]) == ["%c.1.0", "@v[1]"]
    assert _operands(ops["b.1"])[0] == "%c.1.1"
    # %g carries the previous %h: x, x, b.0
    assert [_operands(ops[f"b.{i}"])[1] for i in range(3)] == ["%x", "%x", "%b.0"]
    # loop results are the last iteration's yields: %y = b.2, %z = h of the last iteration = b.1
    assert _operands(ops["o"]) == ["%b.2", "%b.1"]
    ret = g.body[-1]
    assert isinstance(ret, ir.ReturnStmt) and [v.name for v in ret.values] == ["o", "b.2"]
    # schedule hints and type annotations survive
    assert print_module(u).count("schedule(tasks=4)") == 3
    assert ops["b.2"].types


def test_unroll_keeps_locations_and_is_identity_without_loops():
    m = parse(LOOPED, "looped.mpk")
    u = unroll(m)
    a1 = _by_result(u)["a.1"]
    assert a1.loc is not None and a1.loc.line == 11  # the source line of %a
    assert a1.operands[0].loc is not None  # uses keep the location of the reference they replace
    assert unroll(u) == u
    straight = parse(print_module(u))
    assert unroll(straight) == straight


def test_unroll_loop_variable_expressions_and_global_carry():
    src = """
const n = 4
dim B <= 2
weight w[l < n] : f32[8, 8] = "w.{l}"
weight w0 : f32[B, 8] = "w0"
graph main(%x: f32[B, 8]) -> (f32[B, 8]) {
  %y = for i in 1..n carry(%h = %x) {
    %a = linear(%h, @w[i])
    yield %a
  }
  return %y
}
"""
    # weights may not have symbolic dims: use a fixed-size carry init instead
    src = src.replace("weight w0 : f32[B, 8]", "weight w0 : f32[8, 8]")
    m = parse(src)
    verify(m)
    u = unroll(m)
    verify(u)
    ops = _ops(u)
    assert [s.results[0] for s in ops] == ["a.1", "a.2", "a.3"]
    assert [_operands(s)[1] for s in ops] == ["@w[1]", "@w[2]", "@w[3]"]


def test_unroll_name_clash_is_a_diagnostic():
    src = """
dim B <= 2
weight w : f32[8, 8] = "w"
graph main(%x: f32[B, 8]) -> (f32[B, 8]) {
  %a.0 = linear(%x, @w)
  %y = for i in 0..2 carry(%h = %a.0) {
    %a = linear(%h, @w)
    yield %a
  }
  return %y
}
"""
    m = parse(src, "clash.mpk")
    verify(m)
    with pytest.raises(MpkError) as e:
        unroll(m)
    d = e.value.diagnostics[0]
    assert "'%a.0'" in d.message and "clashes" in d.message
    assert d.span is not None and d.span.line == 7


def _interp():
    return pytest.importorskip("mpkir.interpreter")


def _as_list(outs):
    if isinstance(outs, dict):
        return list(outs.values())
    if isinstance(outs, np.ndarray):
        return [outs]
    return list(outs)


def test_unroll_preserves_outputs():
    interp = _interp()
    m = parse(LOOPED)
    a = verify(m)
    u = unroll(m)
    au = verify(u)
    rng = np.random.default_rng()
    weights = interp.random_weights(m, a, seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((3, 16)).astype(ir.DType.bf16.numpy)
    ref = _as_list(interp.run_graph(m, {"x": x}, weights, interp.init_state(m, a), analysis=a))
    got = _as_list(interp.run_graph(u, {"x": x}, weights, interp.init_state(u, au), analysis=au))
    assert len(ref) == len(got) == 2
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape == (3, 16)
        assert np.all(np.isfinite(np.asarray(r, np.float32)))
        np.testing.assert_array_equal(np.asarray(r, np.float32), np.asarray(g, np.float32))


# ------------------------------------------------------------------------------------------ dce

DEAD = """
const hidden = 8
dim B <= 2
weight w : f32[hidden, hidden] = "w"
graph main(%x: f32[B, hidden]) -> (f32[B, hidden]) {
  %dead1 = linear(%x, @w)
  %dead2 = add(%dead1, %dead1)
  %live = linear(%x, @w)
  %unused = for l in 0..2 carry(%h = %x) {
    %t = linear(%h, @w)
    yield %t
  }
  %y = for l2 in 0..2 carry(%k = %live) {
    %s = add(%k, %k)
    %inner_dead = linear(%k, @w)
    yield %s
  }
  return %y
}
"""


def test_dce_drops_dead_ops_and_loops_transitively():
    m = parse(DEAD)
    verify(m)
    d = dce(m)
    verify(d)
    names = set(_by_result(d))
    assert names == {"live", "s"}
    g = d.graph()
    assert [type(s).__name__ for s in g.body] == ["OpStmt", "ForStmt", "ReturnStmt"]
    assert dce(d) == d


def test_dce_keeps_mutating_and_unknown_ops(monkeypatch):
    def infer(ts, attrs):
        return (ts[0],)

    touch = OpDef("touch_state", ("x", "cache"), (), infer, lambda xs, at, c: (xs[0],), "test op",
                  mutates=(1,))
    monkeypatch.setitem(OPS, "touch_state", touch)
    src = """
dim B <= 2
weight w : f32[4, 4] = "w"
state cache : f32[4, 4]
graph main(%x: f32[B, 4]) -> (f32[B, 4]) {
  %ignored = touch_state(%x, @cache)
  %dead = linear(%x, @w)
  return %x
}
"""
    m = parse(src)
    verify(m)
    d = dce(m)
    assert set(_by_result(d)) == {"ignored"}
    # an operator the registry does not know is kept (its effects are unknown)
    monkeypatch.delitem(OPS, "touch_state")
    assert set(_by_result(dce(m))) == {"ignored"}


# ------------------------------------------------------------------------------------------ fold

FOLD = """
model "fold"
const hidden = 8
const twice = hidden * 2
const half = hidden / 2
const scale = 1 / 4
const layers = 2
dim B <= twice - 12
serve {
  max_tokens = twice / 4
  max_requests = 2
  mode = decode
}
weight w[l < layers] : f32[twice, hidden] = "w.{l}"
weight u : f32[hidden, twice] = "u"
graph main(%x: f32[B, hidden]) -> (f32[B, hidden]) {
  %y = for l in 0..layers - 1 carry(%h = %x) {
    %a = linear(%h, @w[l]) schedule(tasks=half, mode=fast)
    %b = linear(%a, @u) : f32[B, hidden * 1]
    yield %b
  }
  return %y
}
"""


def test_fold_constants_inlines_literals_everywhere_but_consts():
    m = parse(FOLD)
    verify(m)
    f = fold_constants(m)
    verify(f)
    text = print_module(f)
    assert "const twice = hidden * 2" in text  # const declarations are kept as written
    assert "dim B <= 4" in text
    assert "max_tokens = 4" in text and "mode = decode" in text
    assert "weight w[l < 2] : f32[16, 8]" in text
    assert "weight u : f32[8, 16]" in text
    assert "for l in 0..1 carry" in text
    assert "@w[l]" in text  # loop variables stay
    assert "schedule(tasks=4, mode=fast)" in text  # enum-like words are not constants
    assert ": f32[B, 8]" in text  # symbolic dims stay, the constant part folds
    assert "graph main(%x: f32[B, 8]) -> (f32[B, 8])" in text
    assert fold_constants(f) == f
    assert parse(text) == f


def test_fold_keeps_division_exactness_and_floats():
    from mpkir.passes.exprs import fold

    e = parse("const a = 7 / 2\nconst b = 8 / 2\nconst c = 1e-6 * 2").consts
    assert fold(e[0].value, {}) == ir.Num(3.5)
    assert fold(e[1].value, {}) == ir.Num(4) and isinstance(fold(e[1].value, {}).value, int)
    assert fold(e[2].value, {}) == ir.Num(2e-6)
    zero = parse("const z = 1 / 0").consts[0].value
    assert fold(zero, {}) == zero  # left for the verifier to report


# ------------------------------------------------------------------------------------------ infer-shapes


def test_infer_shapes_annotates_every_op():
    m = parse(LOOPED)
    s = infer_shapes(m)
    assert all(op.types for op in _ops(s))
    text = print_module(s)
    assert "%a = linear(%h, @w[l]) schedule(tasks=4) : bf16[B, 16]" in text
    assert "%b = add(%q, %g) : bf16[B, 16]" in text  # the verified annotation is replaced
    verify(parse(text))
    kept = print_module(infer_shapes(m, keep_written=True))
    assert "%b = add(%q, %g) : bf16[B, hidden]" in kept


def test_infer_shapes_rejects_invalid_modules():
    bad = LOOPED.replace("%o = add(%y, %z)", "%o = add(%y, %nope)")
    with pytest.raises(MpkError) as e:
        infer_shapes(parse(bad))
    assert "undefined value '%nope'" in str(e.value)


def test_verify_pass_raises_with_every_error():
    bad = LOOPED.replace("%o = add(%y, %z)", "%o = add(%y, %nope)").replace("@v[l]", "@missing[l]")
    with pytest.raises(MpkError) as e:
        run_passes(parse(bad), "verify")
    msgs = [d.message for d in e.value.diagnostics]
    assert any("%nope" in x for x in msgs) and any("@missing" in x for x in msgs)


# ------------------------------------------------------------------------------------------ manager


@manager.register
@dataclass(frozen=True)
class _Options:
    """A test pass with options of every kind."""

    name: ClassVar[str] = "test-options"
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    label: str = "x"
    sizes: tuple[int, ...] = ()

    def run(self, module: ir.Module) -> ir.Module:
        return module


def test_registry_lists_builtin_passes():
    for name in ("verify", "infer-shapes", "unroll", "dce", "fold-constants"):
        assert name in PASSES
        cls = PASSES[name]
        assert cls.name == name and dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen


def test_importing_the_manager_imports_no_pass_or_solver():
    code = ("import sys, mpkir.passes.manager as m; "
            "print(sorted(k for k in sys.modules if k == 'z3' or k.startswith('mpkir.passes.') "
            "or k.startswith('cupy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mpkir.passes.manager']"


def test_pipeline_options_parse():
    (p,) = parse_pipeline("test-options{count=3,ratio=0.25,flag,label=hello,sizes=1:2:3}")
    assert p == _Options(count=3, ratio=0.25, flag=True, label="hello", sizes=(1, 2, 3))
    (q,) = parse_pipeline("test-options{flag=false, count=0x10}")
    assert q.flag is False and q.count == 16
    ps = parse_pipeline(" unroll , dce,test-options{count=2} ")
    assert [x.name for x in ps] == ["unroll", "dce", "test-options"]
    assert pipeline_spec(ps) == "unroll,dce,test-options{count=2}"
    assert parse_pipeline(pipeline_spec(ps)) == ps
    assert parse_pipeline("") == ()


@pytest.mark.parametrize("spec, words", [
    ("unroll,bogus", ["unknown pass 'bogus'", "valid passes:", "dce", "fold-constants", "unroll"]),
    ("test-options{nope=1}", ["has no option 'nope'", "count", "ratio", "flag"]),
    ("test-options{count=abc}", ["option 'count'", "expects an integer", "'abc'"]),
    ("test-options{ratio=x}", ["expects a number"]),
    ("test-options{flag=maybe}", ["expects true or false"]),
    ("test-options{count}", ["needs a value"]),
    ("unroll{", ["unbalanced '{'"]),
    ("unroll}", ["unbalanced '}'"]),
    ("unroll,,dce", ["empty pass name"]),
    ("un roll", ["not a pass name"]),
])
def test_pipeline_errors(spec, words):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(spec)
    text = e.value.render()
    for w in words:
        assert w in text, (w, text)


def test_print_ir_after_all_and_timing():
    stream = io.StringIO()
    timing = Timing()
    out = run_passes(parse(LOOPED), "unroll,dce,infer-shapes", [PrintIRAfterAll(stream), timing])
    text = stream.getvalue()
    banners = [line for line in text.splitlines() if line.startswith("// -----// IR Dump After")]
    assert banners == [f"// -----// IR Dump After {n} //----- //" for n in ("unroll", "dce", "infer-shapes")]
    # each dump is the module after that pass; the last one is the result
    assert text.rsplit("//----- //\n", 1)[1] == print_module(out)
    assert [n for n, _ in timing.times] == ["unroll", "dce", "infer-shapes"]
    report = timing.report()
    assert "Execution time report" in report and "unroll" in report and "Total" in report


@manager.register
@dataclass(frozen=True)
class _Breaks:
    """A broken test pass that drops the graph's return."""

    name: ClassVar[str] = "test-breaks"

    def run(self, module: ir.Module) -> ir.Module:
        g = module.graph()
        return dataclasses.replace(module, decls=tuple(
            dataclasses.replace(d, body=d.body[:-1]) if d is g else d for d in module.decls))


def test_verify_each_names_the_pass_that_broke_the_ir():
    m = parse(LOOPED)
    broken = run_passes(m, "test-breaks")  # without the instrument nothing notices
    assert not analyze(broken).ok
    with pytest.raises(MpkError) as e:
        run_passes(m, "unroll,test-breaks,dce", [VerifyEach()])
    assert "after pass 'test-breaks'" in e.value.render()


def test_passes_are_pure():
    m = parse(LOOPED)
    before = print_module(m)
    run_passes(m, "fold-constants,unroll,dce,infer-shapes,verify")
    assert print_module(m) == before


# ------------------------------------------------------------------------------------------ property

_COUNT = 4


@st.composite
def _looped_programs(draw):
    """Random nests of loops with carries over linear/add; returns (source, expected op count)."""
    fresh = iter(range(10_000))
    lines: list[str] = []

    def block(avail: list[str], loop_vars: list[str], depth: int, indent: str) -> tuple[list[str], int]:
        ops = 0
        avail = list(avail)
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["linear", "add", "loop"] if depth < 2 else ["linear", "add"]))
            name = f"v{next(fresh)}"
            if kind == "linear":
                idx = draw(st.sampled_from([*loop_vars, *map(str, range(_COUNT))]))
                lines.append(f"{indent}%{name} = linear(%{draw(st.sampled_from(avail))}, @w[{idx}])")
                ops += 1
                avail.append(name)
            elif kind == "add":
                a, b = draw(st.sampled_from(avail)), draw(st.sampled_from(avail))
                lines.append(f"{indent}%{name} = add(%{a}, %{b})")
                ops += 1
                avail.append(name)
            else:
                lo = draw(st.integers(0, _COUNT - 1))
                hi = draw(st.integers(lo + 1, _COUNT))
                var = f"i{depth}"
                n = draw(st.integers(1, 2))
                carries = [f"c{next(fresh)}" for _ in range(n)]
                inits = [draw(st.sampled_from(avail)) for _ in range(n)]
                results = [f"r{next(fresh)}" for _ in range(n)]
                lines.append(f"{indent}{', '.join('%' + r for r in results)} = for {var} in {lo}..{hi} carry("
                             + ", ".join(f"%{c} = %{i}" for c, i in zip(carries, inits, strict=True)) + ") {")
                inner, inner_ops = block(avail + carries, [*loop_vars, var], depth + 1, indent + "  ")
                ys = [draw(st.sampled_from(inner)) for _ in range(n)]
                lines.append(f"{indent}  yield {', '.join('%' + y for y in ys)}")
                lines.append(f"{indent}}}")
                ops += (hi - lo) * inner_ops
                avail.extend(results)
        return avail, ops

    avail, ops = block(["x"], [], 0, "  ")
    head = f"dim B <= 3\nweight w[l < {_COUNT}] : f32[4, 4] = \"w.{{l}}\"\n"
    body = "\n".join(lines)
    src = f"{head}graph main(%x: f32[B, 4]) -> (f32[B, 4]) {{\n{body}\n  return %{avail[-1]}\n}}\n"
    return src, ops


@settings(deadline=None)  # example counts come from the HYPOTHESIS_PROFILE
@given(_looped_programs())
def test_unroll_property(program):
    src, expected_ops = program
    m = parse(src)
    assert analyze(m).ok, src
    u = unroll(m)
    assert analyze(u).ok
    assert not any(isinstance(s, ir.ForStmt) for s in u.graph().body)
    assert len(_ops(u)) == expected_ops
    assert unroll(u) == u
    assert parse(print_module(u)) == u
    try:
        import mpkir.interpreter as interp
    except ImportError:
        return
    a, au = analyze(m), analyze(u)
    weights = interp.random_weights(m, a, seed=1)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    ref = _as_list(interp.run_graph(m, {"x": x}, weights, interp.init_state(m, a), analysis=a))
    got = _as_list(interp.run_graph(u, {"x": x}, weights, interp.init_state(u, au), analysis=au))
    np.testing.assert_array_equal(np.asarray(ref[0]), np.asarray(got[0]))
