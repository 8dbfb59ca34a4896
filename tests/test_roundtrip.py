"""Print/parse round-trip over random valid modules (mpkir.testing.strategies.modules)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mpkir import ir
from mpkir.parser import parse
from mpkir.printer import print_module
from mpkir.testing import strategies as S
from mpkir.verify import analyze


def _render(a, text):
    return "\n".join(d.render(text) for d in a.diagnostics)


@given(S.modules())
def test_generated_modules_verify_clean(m):
    text = print_module(m)
    a = analyze(parse(text, "gen.mpk"))
    assert a.diagnostics == [], _render(a, text)
    # the analysis of the built IR (no locations) agrees
    assert analyze(m).ok


@settings(max_examples=30)
@given(S.runnable_modules())
def test_runnable_modules_are_small_float_graphs(m):
    a = analyze(m)
    assert a.ok, _render(a, print_module(m))
    for g in m.graphs:
        for p in g.params:
            t = a.graphs[g.name].types[p.name]
            assert t.dtype.is_float
            for d in t.shape:
                assert (a.env.dims[d] if isinstance(d, str) else d) <= 16
    for t in a.globals.values():
        assert all(d <= 16 for d in t.shape)


@given(S.modules())
def test_print_parse_roundtrip(m):
    """parse(print(m)) == m, printing is a fixpoint, and the parsed statements are located."""
    text = print_module(m)
    m2 = parse(text)
    assert m2 == m
    assert print_module(m2) == text
    # every statement of the parsed module is located inside the text
    lines = text.split("\n")

    def check(loc):
        assert loc is not None
        assert 1 <= loc.line <= len(lines) and 1 <= loc.col <= len(lines[loc.line - 1]) + 1

    for g in m2.graphs:
        check(g.loc)
        stack = list(g.body)
        while stack:
            s = stack.pop()
            check(s.loc)
            if isinstance(s, ir.ForStmt):
                stack.extend(s.body)
            if isinstance(s, ir.OpStmt):
                for o in s.operands:
                    check(o.loc)


def test_strategy_follows_the_registered_operators():
    """Catalogue-valid calls the strategy made were never rejected by a registered ``infer``."""
    S.DISAGREEMENTS.clear()

    @settings(max_examples=40, derandomize=True, database=None)
    @given(S.modules())
    def draw(m):
        pass

    draw()
    assert S.DISAGREEMENTS == []


def test_strategy_covers_the_catalogue():
    """Every registered catalogue operator (but paged_attention) shows up in some drawn module."""
    seen: set[str] = set()

    @settings(max_examples=60, derandomize=True, database=None)
    @given(S.modules())
    def draw(m):
        stack = [s for g in m.graphs for s in g.body]
        while stack:
            s = stack.pop()
            if isinstance(s, ir.OpStmt):
                seen.add(s.op)
            elif isinstance(s, ir.ForStmt):
                seen.add("for")
                stack.extend(s.body)

    draw()
    # rope and sample need i32 positions of the right length: drawn, but rarely
    want = set(S.available_ops()) - {"rope", "sample", "attention", "head_rmsnorm"}
    assert want <= seen, want - seen
    assert "for" in seen


@given(st.data())
def test_neg_of_number_roundtrips(data):
    v = data.draw(st.one_of(st.integers(-5, 5), st.floats(-4, 4, allow_nan=False)))
    m = ir.Module((ir.ConstDecl("a", ir.Neg(ir.Num(v))),
                   ir.ConstDecl("b", ir.BinOp("-", ir.Num(1), ir.Num(v))),
                   ir.ConstDecl("c", ir.Neg(ir.Neg(ir.Num(v))))))
    assert parse(print_module(m)) == m


@settings(max_examples=20)
@given(S.runnable_modules(), st.integers(0, 2**16))
def test_runnable_modules_run_in_the_interpreter(m, seed):
    import numpy as np

    from mpkir.interpreter import init_state, random_weights, run_graph

    a = analyze(m)
    g = m.graph()
    rng = np.random.default_rng(seed)
    inputs = {}
    for p in g.params:
        t = a.graphs[g.name].types[p.name]
        shape = [a.env.dims[d] if isinstance(d, str) else d for d in t.shape]
        inputs[p.name] = rng.standard_normal(shape).astype(t.dtype.numpy)
    outs = run_graph(m, inputs, random_weights(m, a, seed=seed), init_state(m, a), analysis=a)
    assert len(outs) == len(g.result_types)
