"""Hypothesis properties of the superoptimizer's pruner and verifier (issue 5, `ci` profile, small sizes).

* Pruner soundness: random small target expressions, rewritten into equivalent programs by valid
  rewrites (operand order, square↔mul, the norm or a scale moved after the matmul, the norm weight folded
  into the matmul weight).  Each rewrite is first checked equal to its target by the finite-field test;
  then every value it computes (every prefix of the program) must pass the abstract-expression pruner —
  the pruner never cuts a valid candidate.
* Verifier mutation: random single mutations of found programs (operands swapped or replaced, an op kind
  changed, a reduction dropped, a tiling changed).  Each mutant is either statically invalid, or refuted
  with a concrete counterexample (finite field; Z3 as well where cheap), or — if it is in fact the same
  function (e.g. the operands of a commutative op swapped, a tiling that covers the tensor the same way)
  — proved equal by both the finite field and Z3, which is the correct answer for an equivalent program.
"""

from __future__ import annotations

import dataclasses
import functools

from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from mpkir.passes.superopt import interp
from mpkir.passes.superopt import search as S
from mpkir.passes.superopt.program import Input, Op, Output, Program, ProgramError, validate
from mpkir.passes.superopt.prove import Abstract, ff_equal
from mpkir.passes.superopt.targets import Subgraph, inputs_of, target

M, K, N = 2, 4, 3
# the `ci` profile keeps these fast; `dev`/`nightly` profiles run their own, larger counts
N_EXAMPLES = 40 if settings.default.max_examples <= 60 else settings.default.max_examples
SHAPES = {"x": (M, K), "y": (M, K), "g": (K,), "w": (N, K)}
STEPS = ("exp", "silu", "square", "mul_y", "add_y", "mul_g", "scale", "norm")
TAIL = ("norm", "scale", "mul_g")  # row- or column-scalings that may move across the final matmul


def _op(res, kind, *args, **attrs):
    return Op((res,), kind, tuple(args), tuple(attrs.items()))


def _ref(name):
    return name if name in SHAPES else "%" + name


class _Builder:
    def __init__(self):
        self.ops: list[Op] = []

    def add(self, kind, *args, **attrs):
        name = f"v{len(self.ops)}"
        self.ops.append(_op(name, kind, *(_ref(a) for a in args), **attrs))
        return name


def _emit_step(b: _Builder, a: str, step: str, flip: bool, as_mul: bool) -> str:
    """One step of the expression on ``a``; ``flip``/``as_mul`` pick equivalent spellings."""
    if step in ("exp", "silu"):
        return b.add(step, a)
    if step == "square":
        return b.add("mul", a, a) if as_mul else b.add("square", a)
    if step in ("mul_y", "add_y", "mul_g"):
        other = "g" if step == "mul_g" else "y"
        kind = "add" if step == "add_y" else "mul"
        return b.add(kind, other, a) if flip else b.add(kind, a, other)
    if step == "scale":
        return b.add("scale", a, c=0.5)
    r = _norm_factor(b, a, as_mul)
    return b.add("mul", r, a) if flip else b.add("mul", a, r)


def _norm_factor(b: _Builder, a: str, as_mul: bool) -> str:
    sq = b.add("mul", a, a) if as_mul else b.add("square", a)
    return b.add("rsqrt_mean", b.add("sum", sq, axis=-1), n=K, eps=1e-5)


def _program(name, ops, out, matmul) -> Program:
    ins = tuple(Input(n, s, (), -1) for n, s in SHAPES.items())
    shape = (M, N) if matmul else (M, K)
    return Program(name, (), 1, ins, tuple(ops), (), (), (Output("y", shape, "%" + out, ()),))


def build(steps, matmul, flips, spellings, move) -> tuple[Program, Program]:
    """(target, an equivalent rewrite): the rewrite uses other operand orders/spellings and, when the last
    step is a scaling and ``move``, applies it after the matmul (norm, scale) or folds it into w (mul_g)."""
    t = _Builder()
    a = "x"
    for s in steps:
        a = _emit_step(t, a, s, False, False)
    if matmul:
        a = t.add("matmul_nt", a, "w")
    tgt = _program("target", t.ops, a, matmul)

    r = _Builder()
    a = "x"
    moved = matmul and move and steps and steps[-1] in TAIL
    body = steps[:-1] if moved else steps
    for i, s in enumerate(body):
        a = _emit_step(r, a, s, flips[i % len(flips)], spellings[i % len(spellings)])
    if moved:
        last = steps[-1]
        if last == "norm":
            rr = _norm_factor(r, a, spellings[0])
            a = r.add("mul", r.add("matmul_nt", a, "w"), rr)
        elif last == "scale":
            a = r.add("scale", r.add("matmul_nt", a, "w"), c=0.5)
        else:
            a = r.add("matmul_nt", a, r.add("mul", "w", "g"))
    elif matmul:
        a = r.add("matmul_nt", a, "w")
    return tgt, _program("rewrite", r.ops, a, matmul)


def _abstract_values(prog: Program, ab: Abstract) -> dict:
    env = {i.name: ab.atom(i.name) for i in prog.inputs}
    for o in prog.body:
        env[o.results[0]] = ab.apply(o.kind, [env[x.lstrip("%")] for x in o.args], dict(o.attrs))
    return env


def _ff(prog_a, prog_b, seed=0):
    return ff_equal(
        lambda ins, dom: interp.run_program(prog_a, ins, dom),
        lambda ins, dom: interp.run_program(prog_b, ins, dom),
        lambda mk: {n: mk(s) for n, s in SHAPES.items()},
        trials=3,
        seed=seed,
    )


@settings(max_examples=N_EXAMPLES)
@given(
    steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=4).filter(
        lambda s: sum(x == "exp" for x in s) <= 1 and not ("exp" in s and "silu" in s[s.index("exp") :])
    ),
    matmul=st.booleans(),
    flips=st.lists(st.booleans(), min_size=1, max_size=4),
    spellings=st.lists(st.booleans(), min_size=1, max_size=4),
    move=st.booleans(),
)
def test_pruner_never_cuts_a_prefix_of_a_valid_program(steps, matmul, flips, spellings, move):
    tgt, rw = build(steps, matmul, flips, spellings, move)
    ok, why = _ff(rw, tgt)
    assume("untestable" not in why)
    assert ok, f"the rewrite itself is wrong: {why}"
    event(f"{len(rw.body)} ops, moved={rw.body != tgt.body and matmul and move}")
    ab = Abstract()
    T = _abstract_values(tgt, ab)[tgt.outputs[0].value.lstrip("%")]
    vals = _abstract_values(rw, ab)
    for o in rw.body:
        v = vals[o.results[0]]
        assert ab.subexpr(v, T), f"pruner cuts prefix %{o.results[0]} = {o.kind}{o.args} = {v} of target {T}"


def test_a_known_non_subexpression_is_pruned():
    ab = Abstract()
    tgt, _ = build(["mul_y"], True, [False], [False], False)
    T = _abstract_values(tgt, ab)[tgt.outputs[0].value.lstrip("%")]
    assert not ab.subexpr(ab.apply("exp", [ab.atom("x")], {}), T)
    assert not ab.subexpr(ab.apply("add", [ab.atom("x"), ab.atom("y")], {}), T)


# ------------------------------------------------------------------ verifier mutation
KINDS = {
    "norm_linear": Subgraph("norm_linear", (), (("M", 2), ("K", 8), ("N", 4)), (("eps", 1e-5),)),
    "act_down": Subgraph("act_down", (), (("M", 2), ("F", 8), ("H", 4))),
    "decode_attention": Subgraph("decode_attention", (), (("G", 2), ("D", 2), ("N", 8)), (("scale", 0.5),)),
}


@functools.cache
def _structure(kind):
    p = S.search(KINDS[kind]).program.programs[0]
    return p.body, p.accs, p.epilogue, p.outputs[0].value


def _make(kind):
    if kind == "decode_attention":
        return lambda g: S.attention_program(g, 2, 2)
    return lambda g: S._concretize(g, _structure(kind), 2, 2)


def _regions(p):
    return [("body", p.body), ("accs", p.accs), ("epilogue", p.epilogue)]


def mutate(f, m):
    """Apply mutation ``m`` = (kind, program, a, b, c) to a Fused (deterministic, size-independent)."""
    what, pi, a, b, c = m
    progs = list(f.programs)
    p = progs[pi % len(progs)]
    ops = [(rn, i, o) for rn, reg in _regions(p) for i, o in enumerate(reg)]
    if what in ("swap", "rearg", "kind", "drop"):
        rn, i, o = ops[a % len(ops)]
        reg = list(getattr(p, rn))
        names = [x.name for x in p.inputs] + ["%" + r for _, _, q in ops[: a % len(ops)] for r in q.results]
        if what == "swap":
            assume(len(o.args) == 2 and o.args[0] != o.args[1])
            reg[i] = dataclasses.replace(o, args=o.args[::-1])
        elif what == "rearg":
            new = names[b % len(names)]
            assume(new != o.args[c % len(o.args)])
            args = list(o.args)
            args[c % len(args)] = new
            reg[i] = dataclasses.replace(o, args=tuple(args))
        elif what == "kind":
            alt = {
                "mul": "add",
                "add": "mul",
                "sub": "add",
                "div": "mul",
                "sum": "max",
                "max": "sum",
                "exp": "silu",
                "silu": "exp",
                "square": "exp",
                "rsqrt_mean": "square",
                "scale": "square",
            }
            assume(o.kind in alt)
            reg[i] = dataclasses.replace(o, kind=alt[o.kind], attrs=o.attrs if o.kind != "rsqrt_mean" else ())
        else:  # drop a reduction: its result becomes its operand
            assume(o.kind in ("sum", "max") and rn != "accs")
            del reg[i]
            src = o.args[0]

            def sub(x, r=o.results[0], src=src):
                return src if x == "%" + r else x

            p = dataclasses.replace(p, **{rn: tuple(reg)})
            p = dataclasses.replace(
                p,
                **{
                    r2: tuple(dataclasses.replace(q, args=tuple(map(sub, q.args))) for q in getattr(p, r2))
                    for r2, _ in _regions(p)
                },
                outputs=tuple(dataclasses.replace(q, value=sub(q.value)) for q in p.outputs),
            )
            progs[pi % len(progs)] = p
            return dataclasses.replace(f, programs=tuple(progs))
        p = dataclasses.replace(p, **{rn: tuple(reg)})
    elif what in ("imap", "fmap"):
        inp = p.inputs[a % len(p.inputs)]
        if what == "imap":
            new = tuple(((d + 1 + b) % (len(inp.shape) + 1)) - 1 for d in inp.imap)
            assume(new != inp.imap)
            inp2 = dataclasses.replace(inp, imap=new)
        else:
            new = ((inp.fmap + 1 + b) % (len(inp.shape) + 1)) - 1
            assume(new != inp.fmap)
            inp2 = dataclasses.replace(inp, fmap=new)
        ins = list(p.inputs)
        ins[a % len(ins)] = inp2
        p = dataclasses.replace(p, inputs=tuple(ins))
    else:  # omap
        o = p.outputs[0]
        new = tuple(((d + 1 + b) % (len(o.shape) + 1)) - 1 for d in o.omap)
        assume(new != o.omap)
        p = dataclasses.replace(p, outputs=(dataclasses.replace(o, omap=new), *p.outputs[1:]))
    progs[pi % len(progs)] = p
    return dataclasses.replace(f, programs=tuple(progs))


BIGGER = {
    "norm_linear": dict(M=3, K=12, N=6),
    "act_down": dict(M=3, F=12, H=6),
    "decode_attention": dict(G=3, D=3, N=12),
}


def _ff_fused(sg, f, seed):
    t = target(sg)
    return ff_equal(
        lambda ins, dom: {"y": interp.run_fused(f, ins, dom)["y"]},
        lambda ins, dom: interp.run_program(t, ins, dom),
        lambda mk: {n: mk(s) for n, s in inputs_of(sg).items()},
        trials=3,
        seed=seed,
    )


@settings(max_examples=N_EXAMPLES)
@example(kind="norm_linear", m=("swap", 0, 1, 0, 0))  # mul(x, g) -> mul(g, x): equal
@example(kind="act_down", m=("swap", 0, 1, 0, 0))  # mul(up, silu) -> mul(silu, up): equal
@example(kind="norm_linear", m=("drop", 0, 2, 0, 0))  # the sum of squares dropped
@example(kind="norm_linear", m=("imap", 0, 2, 1, 0))  # w split over K across the grid
@example(kind="norm_linear", m=("fmap", 0, 2, 1, 0))  # w no longer walked by the loop
@example(kind="act_down", m=("omap", 0, 0, 1, 0))  # block tiles written along the wrong dim
@example(kind="decode_attention", m=("drop", 1, 0, 0, 0))  # merge without the max: no rescale
@example(kind="decode_attention", m=("swap", 1, 1, 0, 0))  # exp(M - m_i) instead of exp(m_i - M)
@example(kind="decode_attention", m=("rearg", 1, 5, 0, 0))  # l rescaled by the wrong partial
@given(
    kind=st.sampled_from(sorted(KINDS)),
    m=st.tuples(
        st.sampled_from(["swap", "rearg", "kind", "drop", "imap", "fmap", "omap"]),
        st.integers(0, 3),
        st.integers(0, 20),
        st.integers(0, 20),
        st.integers(0, 3),
    ),
)
def test_mutants_are_refuted_or_proved_equal(kind, m):
    sg = KINDS[kind]
    make = _make(kind)

    def mutant(g):
        return mutate(make(g), m)

    try:
        for dims in (S._SMALL[kind], S._TINY_Z3[kind], BIGGER[kind]):
            for p in mutant(sg.resized(**dims)).programs:
                validate(p)
        proof = S.verify(sg, mutant, [S._SMALL[kind]], S._TINY_Z3[kind])
    except (ProgramError, ValueError, KeyError, IndexError, ZeroDivisionError):
        event("statically invalid")
        return  # statically invalid (bad map, shape or name): rejected before any proof
    whys = [x["why"] for x in proof["finite_field"]] + [proof["z3"]["why"]]
    assume(not any("untestable" in w for w in whys))
    event(f"{kind} {m[0]}: {'proved equal' if proof['proved'] else 'refuted'}")
    if not proof["proved"]:
        assert any("counterexample" in w or "shape" in w for w in whys), (m, whys)
    else:  # proved equal: the mutant must be the same function, also at a third, uneven size
        big = sg.resized(**BIGGER[kind])
        ok, why = _ff_fused(big, mutant(big), seed=7)
        assert ok, f"verifier accepted a mutant that differs at {BIGGER[kind]}: {m}: {why}"
