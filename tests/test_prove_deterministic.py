"""Z3 proofs are deterministic: bounded by Z3's resource limit (not by time) and run in a fresh context,
the same query gives the same answer, deciding strategy and resource count whatever the process asked Z3
before."""

import re

import z3

from mpkir.passes.superopt import interp, prove
from mpkir.passes.superopt import search as S
from mpkir.passes.superopt.rules import RULES, WRONG, check_z3
from mpkir.passes.superopt.targets import Subgraph, inputs_of, target

# test_superopt_search's split-KV attention (head dim 32: the scale 32**-0.5 is a 16-digit rational); Z3 5.4.1
# and 4.15.4 prove only its generalization (in 78,556 and 962,504), 4.15.8 both
ATTN = Subgraph("decode_attention", ("attn",), (("G", 2), ("D", 32), ("N", 512)), (("scale", 32**-0.5),))


def _attention_proof(rlimit=prove.RLIMIT):
    g = ATTN.resized(**S._TINY_Z3["decode_attention"])
    f, t = S.attention_program(g, 2, 2, True), target(g)
    return prove.z3_equal(
        lambda ins, dom: {"y": interp.run_fused(f, ins, dom)["y"]},
        lambda ins, dom: interp.run_program(t, ins, dom),
        lambda mk: {n: mk(sh) for n, sh in inputs_of(g).items()},
        rlimit=rlimit,
    )


def _rlimit(why):
    return int(re.search(r"rlimit (\d+)", why).group(1))


def _attempt(why):
    return re.search(r"Z3 \((.*), rlimit", why).group(1)


def test_same_proof_same_strategy_and_rlimit_after_other_proofs():
    first = _attention_proof()
    assert first[0] == "proved", first[1]
    # unrelated proofs and terms in the shared main context between the two runs
    for rule in RULES:
        assert check_z3(rule)[0] == "proved"
    assert check_z3(WRONG)[0] == "refuted"
    x, y = z3.Reals("x y")
    s = z3.Solver()
    s.add(x * x + y * y < 0)
    assert s.check() == z3.unsat
    again = _attention_proof()
    assert again[0] == first[0] and _attempt(again[1]) == _attempt(first[1])
    # the same count (Z3 5.4.1 and 4.15.4 exactly; 4.15.8's vary by ~0.5% between fresh contexts); in the
    # shared main context the same attempt took 56,813 and then 49,640 (the query itself: gave up, then not)
    a, b = _rlimit(first[1]), _rlimit(again[1])
    assert a > 0 and abs(a - b) <= 0.02 * a, (first, again)


def test_proofs_stay_well_inside_the_budget():
    # the margin RLIMIT was chosen with: a proof that needs more than a tenth of it is one Z3 change away
    # from 'unknown'
    for status, why in [_attention_proof(), *(check_z3(r) for r in RULES)]:
        assert status == "proved" and _rlimit(why) * 10 <= prove.RLIMIT, why


def test_resource_limit_decides_unknown_deterministically():
    a = _attention_proof(rlimit=2000)
    assert a[0] == "unknown" and "canceled" in a[1], a  # stopped by the resource limit, not by time
    assert _attention_proof(rlimit=2000) == a
    # every attempt ran to its limit: 3 strategies x 2 queries, with 200 and then with 2000
    assert _rlimit(a[1]) >= 6 * 2200


def test_generalized_constant_falls_back_to_the_query_itself():
    def eq(lhs, rhs):
        return prove.z3_equal(
            lambda ins, dom: {"y": lhs(dom, ins["x"])},
            lambda ins, dom: {"y": rhs(dom, ins["x"])},
            lambda mk: {"x": mk((2,))},
        )

    # true only for c = 1/2: the generalization (c·x + c·x = x) has a model, the query itself is proved
    status, why = eq(lambda d, x: x * d.const(0.5) + x * d.const(0.5), lambda d, x: x)
    assert status == "proved" and "generalized" not in why, why
    # true for every c: proved on the generalization
    status, why = eq(lambda d, x: (x + x) * d.const(0.25), lambda d, x: x * d.const(0.25) * d.const(2))
    assert status == "proved" and "generalized" in why, why
    # false: a counterexample of the query itself (not of its generalization)
    status, why = eq(lambda d, x: x * d.const(0.5), lambda d, x: x * d.const(0.25))
    assert status == "refuted" and "counterexample" in why, why
    assert "k!" not in why


def test_generalized_replaces_fractions_only():
    x = z3.Real("x")
    f = [x * z3.Q(1, 3) + 2 == x * z3.Q(1, 3) * z3.Q(2, 7)]
    (g,) = prove._generalized(z3, f)
    # one symbol per value, numbered in the order of the values (1/3 > 2/7); integers kept
    assert str(g) == "x*k!1 + 2 == x*k!1*k!0"
    assert prove._generalized(z3, [x * 2 + 1 == 3]) is None
