"""Graph-level rewrite rules: each proved by Z3, tested in the finite field, fuzzed by Hypothesis in float64;
a deliberately wrong rule is rejected with a concrete counterexample."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpkir.passes.superopt.domains import Float
from mpkir.passes.superopt.rules import RULES, WRONG, check_ff, check_z3


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_proved_by_z3(rule):
    status, why = check_z3(rule)
    assert status == "proved", why
    assert check_z3(rule, 3, 2, 1)[0] == "proved"  # a second, uneven size
    assert check_ff(rule)[0]


def test_wrong_rule_rejected_with_counterexample(capsys):
    status, why = check_z3(WRONG)
    print(f"{WRONG.name}: {status}: {why}")
    assert status == "refuted" and "counterexample:" in why and "=" in why
    assert not check_ff(WRONG)[0]
    assert "counterexample" in capsys.readouterr().out


@given(
    st.sampled_from(RULES),
    st.sampled_from([1, 2, 3, 5, 8]),
    st.sampled_from([1, 2, 3, 5, 8]),
    st.sampled_from([1, 2, 3, 5, 8]),
    st.integers(0, 2**32 - 1),
)
def test_rules_fuzzed_float64(rule, m, k, n, seed):
    rng = np.random.default_rng(seed)
    ins = {name: rng.standard_normal(s) + 0.1 for name, s in rule.shapes(m, k, n).items()}
    a, b = rule.lhs(Float(), ins), rule.rhs(Float(), ins)
    assert a.shape == b.shape
    assert np.linalg.norm(a - b) <= 1e-9 * (1 + np.linalg.norm(b))
