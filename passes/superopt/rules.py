"""Graph-level algebraic rewrite rules, each declared once: name, precondition, both sides, shapes.

Both sides are functions ``(dom, ins) -> tensor`` over any interpreter domain, so one declaration is
checked three ways: Z3 on a symbolic instance (:func:`check_z3`), the finite field, and float64 /
Hypothesis fuzzing through the NumPy domain (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mpkir.passes.superopt.interp import apply_op
from mpkir.passes.superopt.prove import ff_equal, z3_equal


@dataclass(frozen=True)
class Rule:
    name: str
    precondition: str
    lhs: Callable
    rhs: Callable
    shapes: Callable  # (m, k, n) -> {input name: shape}


def _mm(d, a, b):
    return apply_op(d, "matmul", [a, b], {})


def _mmt(d, a, b):
    return apply_op(d, "matmul_nt", [a, b], {})


def _rms(d, x, k, eps=1e-6):
    return apply_op(d, "rsqrt_mean", [apply_op(d, "sum", [d.mul(x, x)], {"axis": -1})], {"n": k, "eps": eps})


RULES: tuple[Rule, ...] = (
    Rule(
        "reassociate-matmul",
        "shapes chain: a[m,k] b[k,n] c[n,m]",
        lambda d, i: _mm(d, _mm(d, i["a"], i["b"]), i["c"]),
        lambda d, i: _mm(d, i["a"], _mm(d, i["b"], i["c"])),
        lambda m, k, n: {"a": (m, k), "b": (k, n), "c": (n, m)},
    ),
    Rule(
        "row-scale-commutes-with-matmul",
        "s is constant along the contracted dim (s[m,1])",
        lambda d, i: _mm(d, d.mul(i["s"], i["a"]), i["b"]),
        lambda d, i: d.mul(i["s"], _mm(d, i["a"], i["b"])),
        lambda m, k, n: {"s": (m, 1), "a": (m, k), "b": (k, n)},
    ),
    Rule(
        "merge-matmuls-sharing-input",
        "both linears read the same x; weights concatenated along N",
        lambda d, i: d.concat([_mmt(d, i["x"], i["w1"]), _mmt(d, i["x"], i["w2"])], -1),
        lambda d, i: _mmt(d, i["x"], d.concat([i["w1"], i["w2"]], 0)),
        lambda m, k, n: {"x": (m, k), "w1": (n, k), "w2": (n + 1, k)},
    ),
    Rule(
        "fold-norm-weight-into-next-weight",
        "the norm's output feeds only linears",
        lambda d, i: _mmt(d, d.mul(d.mul(i["x"], _rms(d, i["x"], i["x"].shape[-1])), i["g"]), i["w"]),
        lambda d, i: d.mul(_mmt(d, i["x"], d.mul(i["w"], i["g"])), _rms(d, i["x"], i["x"].shape[-1])),
        lambda m, k, n: {"x": (m, k), "g": (k,), "w": (n, k)},
    ),
    Rule(
        "rmsnorm-after-matmul",
        "the rms factor is per row (Mirage's RMSNorm→MatMul)",
        lambda d, i: _mmt(d, d.mul(i["x"], _rms(d, i["x"], i["x"].shape[-1])), i["w"]),
        lambda d, i: d.mul(_mmt(d, i["x"], i["w"]), _rms(d, i["x"], i["x"].shape[-1])),
        lambda m, k, n: {"x": (m, k), "w": (n, k)},
    ),
)

# deliberately wrong (tests must reject it with a counterexample): the norm weight is dropped
WRONG = Rule(
    "WRONG-norm-after-matmul-drops-weight",
    "none (unsound)",
    RULES[3].lhs,
    lambda d, i: d.mul(_mmt(d, i["x"], i["w"]), _rms(d, i["x"], i["x"].shape[-1])),
    RULES[3].shapes,
)


def check_z3(rule: Rule, m=2, k=3, n=2) -> tuple[str, str]:
    shapes = rule.shapes(m, k, n)
    return z3_equal(
        lambda ins, dom: {"y": rule.lhs(dom, ins)},
        lambda ins, dom: {"y": rule.rhs(dom, ins)},
        lambda mk: {name: mk(s) for name, s in shapes.items()},
    )


def check_ff(rule: Rule, m=3, k=5, n=2, seed=0) -> tuple[bool, str]:
    shapes = rule.shapes(m, k, n)
    return ff_equal(
        lambda ins, dom: {"y": rule.lhs(dom, ins)},
        lambda ins, dom: {"y": rule.rhs(dom, ins)},
        lambda mk: {name: mk(s) for name, s in shapes.items()},
        seed=seed,
    )
