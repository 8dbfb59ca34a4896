"""Abstract expressions with Z3 subexpression pruning, and the two equivalence checks (finite field, Z3).

Abstraction (over-approximating, as Mirage's): a tensor maps to one Z3 real term over one atom per
input; sums, loop accumulation and scaling by constants are index- and count-blind (identity), additive
constants are named symbols, exp/rsqrt/silu are uninterpreted.  ``cand ⊑ target`` holds when, for some
subterm ``s`` of the target and some product ``q`` of at most two of its factors (or 1),
``cand·q = s`` is valid — one Z3 query with the disjunction, in one shared context, memoised.
"""

from __future__ import annotations

import hashlib
import itertools
import time

import numpy as np

from mpkir.passes.superopt.domains import Field, P, Q, Symbolic, Untestable

_P = 2_147_483_647
# resource limit of one pruning query (Abstract.subexpr; 'unknown' keeps the candidate): the ~2,000 queries of
# the superopt tests consume at most 33,161 on Z3 5.4.1, 33,708 on 4.15.4, each under 0.05 s
SUBEXPR_RLIMIT = 400_000


class Abstract:
    """Abstract-expression domain for the interpreter-free search (values are Z3 terms)."""

    def __init__(self):
        import z3

        self.z3 = z3
        self.E = z3.Function("aexp", z3.RealSort(), z3.RealSort())
        self.R = z3.Function("arsqrt", z3.RealSort(), z3.RealSort())
        self.S = z3.Function("asilu", z3.RealSort(), z3.RealSort())
        self.M = z3.Function("amax", z3.RealSort(), z3.RealSort())
        self.rot = z3.Function("arot", z3.RealSort(), z3.RealSort())
        self.memo: dict[tuple[int, int], tuple] = {}
        self.queries = 0
        self._tcache: dict = {}

    def atom(self, name):
        return self.z3.Real(name)

    def apply(self, kind, args, attrs):
        z3 = self.z3
        a = args[0]
        if kind == "add":
            return a + args[1]
        if kind == "sub":
            return a - args[1]
        if kind in ("mul", "matmul", "matmul_nt"):
            return a * args[1]
        if kind == "div":
            return a / args[1]
        if kind == "square":
            return a * a
        if kind == "exp":
            return self.E(a)
        if kind == "silu":
            return self.S(a)
        if kind == "rsqrt":
            return self.R(a)
        if kind == "rot_half":
            return self.rot(a)
        if kind == "sum" or kind == "scale":
            return a
        if kind == "max":
            return self.M(a)
        if kind == "addc":
            return a + z3.Real(f"c_{attrs['c']!r}")
        if kind == "rsqrt_mean":
            return self.R(a + z3.Real(f"c_{attrs['eps']!r}"))
        raise ValueError(kind)

    def _subterms(self, t):
        z3 = self.z3
        seen, out, stack = set(), [], [t]
        while stack:
            x = stack.pop()
            k = x.get_id()
            if k in seen:
                continue
            seen.add(k)
            if not z3.is_rational_value(x):
                out.append(x)
            stack.extend(x.children())
        return out

    def _factors(self, t):
        z3 = self.z3
        fs = []
        for s in self._subterms(t):
            if z3.is_mul(s):
                fs.extend(c for c in s.children() if not z3.is_rational_value(c))
        uniq = {f.get_id(): f for f in fs}
        return list(uniq.values())

    def _val(self, e, memo):
        """``e`` evaluated mod P at a pseudo-random point (atoms and uninterpreted functions hashed)."""
        z3 = self.z3
        k = e.get_id()
        if k in memo:
            return memo[k]
        if z3.is_rational_value(e):
            f = e.as_fraction()
            v = f.numerator % _P * pow(f.denominator % _P, -1, _P) % _P
        elif z3.is_const(e):
            v = int.from_bytes(hashlib.sha256(str(e).encode()).digest()[:8], "little") % _P
        else:
            xs = [self._val(c, memo) for c in e.children()]
            kind = e.decl().kind()
            if kind == z3.Z3_OP_ADD:
                v = sum(xs) % _P
            elif kind == z3.Z3_OP_MUL:
                v = 1
                for x in xs:
                    v = v * x % _P
            elif kind == z3.Z3_OP_SUB:
                v = (xs[0] - sum(xs[1:])) % _P
            elif kind == z3.Z3_OP_UMINUS:
                v = -xs[0] % _P
            elif kind == z3.Z3_OP_DIV:
                v = xs[0] * pow(xs[1] or 1, -1, _P) % _P
            else:  # uninterpreted: a hash of (name, argument)
                h = hashlib.sha256(f"{e.decl().name()}:{xs}".encode()).digest()
                v = int.from_bytes(h[:8], "little") % _P
        memo[k] = v
        return v

    def subexpr(self, cand, target) -> bool:
        """cand ⊑ target.  Every (subterm s, quotient q) pair is first evaluated at a random point (a
        mismatch refutes ``cand·q = s`` outright); a pair that matches is proved by Z3 ('unknown'
        keeps the candidate: pruning stays sound)."""
        z3 = self.z3
        key = (cand.get_id(), target.get_id())
        if key in self.memo:
            return self.memo[key][0]
        if target.get_id() not in self._tcache:
            subs = self._subterms(target)
            fac = self._factors(target)
            qs = [z3.RealVal(1)] + fac + [a * b for a, b in itertools.combinations(fac, 2)]
            memo: dict = {}
            self._tcache[target.get_id()] = (
                [(s, self._val(s, memo)) for s in subs],
                [(q, self._val(q, memo)) for q in qs],
                target,
            )
        subs, qs, _ = self._tcache[target.get_id()]
        cv = self._val(cand, {})
        res = False
        for s, sv in subs:
            for q, qv in qs:
                if cv * qv % _P != sv:
                    continue
                solver = z3.Solver()
                solver.set("rlimit", SUBEXPR_RLIMIT)
                solver.set("timeout", 10_000)  # backstop only (see BACKSTOP_MS)
                solver.add(z3.Not(cand * q == s))
                self.queries += 1
                if solver.check() != z3.sat:
                    res = True
                    break
            if res:
                break
        self.memo[key] = (res, cand, target)  # keep the terms alive: Z3 ids are reused after collection
        return res


# --------------------------------------------------------------------------- equivalence
def ff_equal(run_a, run_b, make_inputs, trials: int = 3, seed: int = 0) -> tuple[bool, str]:
    """Random testing in Z_p × Z_q: ``run_x(inputs, dom) -> dict`` of outputs compared on ``trials`` draws."""
    for t in range(trials):
        rng = np.random.default_rng(seed * 1000 + t)
        dom = Field(salt=seed + t)
        for _attempt in range(5):
            ins = make_inputs(lambda shape, dom=dom, rng=rng: dom.random(rng, shape))
            try:
                a, b = run_a(ins, dom), run_b(ins, dom)
                break
            except ZeroDivisionError:
                continue
            except Untestable as e:
                return False, f"untestable: {e}"
        else:
            return False, "division by zero on every draw"
        for k in b:
            x, y = a[k], b[k]
            if x.shape != y.shape or not (
                np.array_equal(np.broadcast_to(x.p, x.shape), np.broadcast_to(y.p, y.shape))
                and np.array_equal(np.broadcast_to(x.q, x.shape), np.broadcast_to(y.q, y.shape))
            ):
                if x.shape != y.shape:
                    return False, f"output {k}: shape {x.shape} vs {y.shape} (trial {t})"
                xp, yp = np.broadcast_to(x.p, x.shape), np.broadcast_to(y.p, y.shape)
                xq, yq = np.broadcast_to(x.q, x.shape), np.broadcast_to(y.q, y.shape)
                at = tuple(int(i) for i in np.argwhere((xp != yp) | (xq != yq))[0])
                return False, (
                    f"counterexample: output {k}{list(at)} = ({xp[at]}, {xq[at]}) vs ({yp[at]}, {yq[at]}) in "
                    f"Z_{P}xZ_{Q} on the inputs of seed {seed * 1000 + t}, trial {t}"
                )
    return True, f"{trials} finite-field trials (p=2097143, q=1048571)"


# Z3's deterministic resource limit ("rlimit": a count of Z3's internal steps, the same on any machine and
# under any load, unlike a wall-clock timeout) for one attempt of :func:`z3_check`'s second round; the first
# round gives every attempt a tenth.  Measured on the proofs the superopt tests make (search, rules, paged),
# the deciding attempt consumes at most (Z3 5.4.1 / 4.15.8 / 4.15.4): decode_attention (2 tiles, online-
# softmax merge) 78,556 / ~454,000 / 962,504, its paged tiling 68,002 / ~48,700 / 581,115, the rest < 1,000.
# An attempt that gives up spends its whole budget: about 1-3 s per million, more where Z3 stalls (below).
RLIMIT = 10_000_000
# wall-clock backstop for one query, all attempts together: Z3's nonlinear core (nlsat) can run for tens of
# seconds between two resource-limit checks on polynomials with large coefficients.  The proofs the tests make
# never come near it (their outcome is decided by the rlimit alone); a query that reaches it is 'unknown'.
BACKSTOP_MS = 60_000

_PRE = ("simplify", "propagate-values", "solve-eqs")
# a small portfolio, tried in order: on nonlinear real arithmetic one strategy may give up where another
# answers at once
_STRATEGIES = (
    ("simplify+solve-eqs", lambda z3, c: z3.Then(*[z3.Tactic(t, c) for t in (*_PRE, "smt")]).solver()),
    ("default", lambda z3, c: z3.Solver(ctx=c)),
    ("QF_UFNRA", lambda z3, c: z3.SolverFor("QF_UFNRA", ctx=c)),
)


def _generalized(z3, formulas):
    """``formulas`` with every non-integer rational constant replaced by a symbol (one per value), or None
    when there is none.  Unsat of the generalization implies unsat of ``formulas`` (an instance of it); its
    polynomials no longer carry e.g. the 16-digit numerator of 32**-0.5, on which Z3's nonlinear core
    stalls."""
    consts, seen, stack = {}, set(), list(formulas)
    while stack:
        e = stack.pop()
        if e.get_id() in seen:
            continue
        seen.add(e.get_id())
        if z3.is_rational_value(e):
            if e.as_fraction().denominator != 1:
                consts.setdefault(e.as_fraction(), e)
        else:
            stack.extend(e.children())
    if not consts:
        return None
    subs = [(v, z3.Real(f"k!{i}")) for i, (_, v) in enumerate(sorted(consts.items()))]
    return [z3.substitute(f, *subs) for f in formulas]


def z3_check(formulas, rlimit: int = RLIMIT, backstop_ms: int = BACKSTOP_MS) -> tuple[str, str, str, int]:
    """Satisfiability of ``formulas`` (main-context Z3 booleans): ('unsat' | 'sat' | 'unknown', the deciding
    attempt, a model or why not, the rlimit that attempt consumed (or all attempts, when none decided)).

    Attempts: each strategy on the generalized query (:func:`_generalized`; a 'sat' there proves nothing and
    drops it), then on the query itself; all of them with ``rlimit // 10``, then the undecided ones again with
    ``rlimit``.  Which query and strategy a Z3 release finds easy differs (decode_attention: 5.4.1 and
    4.15.4 prove only the generalization, 4.15.8 the query itself too, in ~120,000 with every strategy), hence
    the portfolio, and the cheap round first.  Every attempt runs in a fresh ``z3.Context`` with the query
    translated into it: inside one context, term ids and with them Z3's internal orderings depend on every
    term made before, so the same query took another route (and gave up, or not) depending on what the
    process had asked Z3 earlier; in a fresh context it depends on the query alone."""
    import z3

    gen = _generalized(z3, formulas)
    attempts = [
        (label, query, name, make)
        for name, make in _STRATEGIES
        for label, query in (("generalized, ", gen), ("", formulas))
        if query is not None
    ]
    spent, why, gen_sat = 0, "", False
    deadline = time.monotonic() + backstop_ms / 1000
    for budget in (max(1, rlimit // 10), rlimit):
        for label, query, name, make in attempts:
            if label and gen_sat:
                continue
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return "unknown", "", f"wall-clock backstop ({backstop_ms} ms) reached", spent
            ctx = z3.Context()
            s = make(z3, ctx)
            s.set("rlimit", budget)
            s.set("timeout", left_ms)
            s.add(*[f.translate(ctx) for f in query])
            r = s.check()
            used = _rlimit_count(s)
            spent += used
            if r == z3.unsat:
                return "unsat", f"{label}{name}", "", used
            if r == z3.sat:
                if label:  # a model of the generalization need not be one of the query
                    gen_sat = True
                    continue
                m = s.model()
                return "sat", name, ", ".join(f"{d}={m[d]}" for d in list(m.decls())[:8]), used
            why = s.reason_unknown()
    return "unknown", "", why, spent


def _rlimit_count(s) -> int:
    """Resource count of ``s``'s context so far (Z3 lists no count before the context's first check)."""
    import z3

    try:
        return int(s.statistics().get_key_value("rlimit count"))
    except z3.Z3Exception:
        return 0


def z3_equal(run_a, run_b, make_inputs, rlimit: int = RLIMIT) -> tuple[str, str]:
    """Prove ``run_a == run_b`` on a symbolic instance.

    Returns 'proved', 'refuted' (with a counterexample) or 'unknown'.  Deterministic: the attempts are bounded
    by Z3's resource limit ``rlimit`` (:func:`z3_check`), not by time."""
    dom = Symbolic()
    z3 = dom.z3
    counter = itertools.count()
    ins = make_inputs(lambda shape: dom.symbols(f"v{next(counter)}", shape))
    a, b = run_a(ins, dom), run_b(ins, dom)
    eqs = []
    for k in b:
        x, y = np.asarray(a[k], dtype=object), np.asarray(b[k], dtype=object)
        if x.shape != y.shape:
            return "refuted", f"output {k}: shape {x.shape} vs {y.shape}"
        eqs += [xa == yb for xa, yb in zip(x.ravel(), y.ravel(), strict=True)]
    r, name, detail, used = z3_check([*dom.axioms, z3.Not(z3.And(*eqs))], rlimit)
    if r == "unsat":
        return "proved", f"Z3 ({name}, rlimit {used}): unsat of the negation over {len(eqs)} symbolic outputs"
    if r == "sat":
        return "refuted", f"counterexample: {detail}"
    return "unknown", f"Z3: unknown (every attempt gave up: {detail}; rlimit {used} in all)"
