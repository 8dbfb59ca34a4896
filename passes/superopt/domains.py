"""Number domains the block-program interpreter runs in: float64, a finite field, and Z3 reals.

* :class:`Float` — NumPy float64 (the numerical spec codegen must match).
* :class:`Field` — pairs (mod p, mod q) with p = 2q + 1 = 2,097,143 (Mirage's probabilistic method):
  + and × componentwise, division by inverses, exp(x) = g^(x mod q) in Z_p with ord(g) = q (so
  exp(a+b) = exp(a)·exp(b) exactly; the result's q part is poisoned and a second exp on it raises
  :class:`Untestable`); rsqrt, silu and max are random oracles keyed by the argument; float
  constants map to random field elements keyed by their value.
* :class:`Symbolic` — object arrays of Z3 real terms: exp/rsqrt/silu uninterpreted (positive where
  needed), exp of a sum rewritten to a product of exps of its terms, max a fresh symbol per
  argument (softmax and its online form are exact for any shift).
"""

from __future__ import annotations

import numpy as np

P = 2_097_143
Q = 1_048_571
G = 4  # a quadratic residue ≠ 1 mod p: order q


class Untestable(Exception):
    """The finite-field method cannot test this program (nested exp)."""


def _hash(a: np.ndarray, b: np.ndarray, salt: int, mod: int) -> np.ndarray:
    h = (a.astype(np.int64) * 1_000_003 + b.astype(np.int64) * 7_919 + salt) % 2_147_483_647
    h = (h * h + 12_345) % 2_147_483_647
    return h % (mod - 1) + 1


class Float:
    name = "float64"

    def const(self, c: float, like=None):
        return np.float64(c)

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        return a / b

    def exp(self, a):
        return np.exp(a)

    def silu(self, a):
        return a / (1.0 + np.exp(-a))

    def rsqrt(self, a):
        return 1.0 / np.sqrt(a)

    def matmul(self, a, b):
        return a @ b

    def sum(self, a, axis):
        return a.sum(axis=axis, keepdims=True)

    def max(self, a, axis):
        return a.max(axis=axis, keepdims=True)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def inv_int(self, n: int):
        return np.float64(1.0 / n)

    # array plumbing
    def take(self, a, sl):
        return a[sl]

    def transpose(self, a):
        if isinstance(a, FF):
            return FF(
                np.swapaxes(np.broadcast_to(a.p, a.shape), -1, -2),
                np.swapaxes(np.broadcast_to(a.q, a.shape), -1, -2),
                a.bad,
            )
        return np.swapaxes(a, -1, -2)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def neg(self, a):
        return -a

    def empty(self, shape):
        return np.full(shape, np.nan)

    def zeros(self, shape):
        return np.zeros(shape)

    def neg_inf(self, shape):
        return np.full(shape, -np.inf)


class FF:
    """A finite-field tensor: values mod P and mod Q (``bad`` marks a poisoned q part)."""

    __slots__ = ("bad", "p", "q")

    def __init__(self, p, q, bad=False):
        self.p, self.q, self.bad = np.asarray(p, np.int64), np.asarray(q, np.int64), bad

    @property
    def shape(self):
        return np.broadcast_shapes(self.p.shape, self.q.shape)

    def __getitem__(self, sl):
        return FF(np.broadcast_to(self.p, self.shape)[sl], np.broadcast_to(self.q, self.shape)[sl], self.bad)

    def reshape(self, *shape):
        return FF(
            np.broadcast_to(self.p, self.shape).reshape(*shape),
            np.broadcast_to(self.q, self.shape).reshape(*shape),
            self.bad,
        )

    @property
    def ndim(self):
        return len(self.shape)


class Field:
    name = "finite field"

    def __init__(self, salt: int = 0):
        self.salt = salt

    def random(self, rng: np.random.Generator, shape) -> FF:
        return FF(rng.integers(0, P, shape), rng.integers(0, Q, shape))

    def const(self, c: float, like=None) -> FF:
        if float(c).is_integer():
            return FF(int(c) % P, int(c) % Q)
        k = int(np.frombuffer(np.float64(c).tobytes(), np.int64)[0] % 1_000_000_007)
        a = np.array(k)
        return FF(_hash(a, a, 17 + self.salt, P), _hash(a, a, 29 + self.salt, Q))

    def inv_int(self, n: int) -> FF:
        return FF(pow(n, -1, P), pow(n, -1, Q))

    def add(self, a, b):
        return FF((a.p + b.p) % P, (a.q + b.q) % Q, a.bad or b.bad)

    def sub(self, a, b):
        return FF((a.p - b.p) % P, (a.q - b.q) % Q, a.bad or b.bad)

    def mul(self, a, b):
        return FF(a.p * b.p % P, a.q * b.q % Q, a.bad or b.bad)

    def _inv(self, x, m):
        if np.any(x % m == 0):
            raise ZeroDivisionError("division by zero in the finite field (resample)")
        return np.vectorize(lambda v: pow(int(v), m - 2, m), otypes=[np.int64])(x)

    def div(self, a, b):
        if b.bad:  # the q part of an exp result is meaningless: only Z_p is tested past it
            return FF(a.p * self._inv(b.p, P) % P, np.zeros_like(np.broadcast_to(a.q, a.shape)), True)
        return FF(a.p * self._inv(b.p, P) % P, a.q * self._inv(b.q, Q) % Q, a.bad)

    def exp(self, a):
        if a.bad:
            raise Untestable("exp of a value that depends on exp")
        e = np.vectorize(lambda v: pow(G, int(v), P), otypes=[np.int64])(a.q % Q)
        return FF(e, np.zeros_like(e), True)

    def _oracle(self, a, salt):
        return FF(_hash(a.p, a.q, salt + self.salt, P), _hash(a.p, a.q, salt + 7 + self.salt, Q), a.bad)

    def silu(self, a):
        return self._oracle(a, 101)

    def rsqrt(self, a):
        return self._oracle(a, 202)

    def matmul(self, a, b):
        return FF(np.matmul(a.p, b.p) % P, np.matmul(a.q, b.q) % Q, a.bad or b.bad)

    def sum(self, a, axis):
        return FF(a.p.sum(axis=axis, keepdims=True) % P, a.q.sum(axis=axis, keepdims=True) % Q, a.bad)

    def max(self, a, axis):
        # a random oracle of the multiset (order-independent): softmax is exact for any shift
        h = _hash(a.p, a.q, 303 + self.salt, P)
        hp = h.sum(axis=axis, keepdims=True)
        return FF(hp % P, (hp * 31 + 5) % Q, a.bad)

    def maximum(self, a, b):
        return FF((a.p * 3 + b.p * 5 + 11) % P, (a.q * 3 + b.q * 5 + 11) % Q, a.bad or b.bad)

    def take(self, a, sl):
        return a[sl]

    def transpose(self, a):
        if isinstance(a, FF):
            return FF(
                np.swapaxes(np.broadcast_to(a.p, a.shape), -1, -2),
                np.swapaxes(np.broadcast_to(a.q, a.shape), -1, -2),
                a.bad,
            )
        return np.swapaxes(a, -1, -2)

    def concat(self, xs, axis):
        return FF(
            np.concatenate([np.broadcast_to(x.p, x.shape) for x in xs], axis=axis),
            np.concatenate([np.broadcast_to(x.q, x.shape) for x in xs], axis=axis),
            any(x.bad for x in xs),
        )

    def neg(self, a):
        return FF((-a.p) % P, (-a.q) % Q, a.bad)

    def empty(self, shape):
        return FF(np.full(shape, -1), np.full(shape, -1))

    def zeros(self, shape):
        return FF(np.zeros(shape, np.int64), np.zeros(shape, np.int64))

    def neg_inf(self, shape):
        return FF(np.zeros(shape, np.int64), np.zeros(shape, np.int64))


class Symbolic:
    """Z3 real terms, built in Z3's global context (``prove.z3_equal`` copies each query into a fresh
    context before solving, so earlier queries do not change its outcome)."""

    name = "z3"

    def __init__(self):
        import z3

        self.z3 = z3
        self.E = z3.Function("exp", z3.RealSort(), z3.RealSort())
        self.R = z3.Function("rsqrt", z3.RealSort(), z3.RealSort())
        self.S = z3.Function("silu", z3.RealSort(), z3.RealSort())
        self.axioms: list = []
        self._max: dict[str, object] = {}
        self._seen: set[str] = set()

    def _arr(self, f, *xs):
        return np.vectorize(f, otypes=[object])(*xs)

    def symbols(self, name: str, shape):
        z3 = self.z3
        flat = [z3.Real(f"{name}_{i}") for i in range(int(np.prod(shape)) if shape else 1)]
        return np.array(flat, dtype=object).reshape(shape)

    def const(self, c: float, like=None):
        return self.z3.RealVal(float(c)) if not float(c).is_integer() else self.z3.RealVal(int(c))

    def inv_int(self, n: int):
        return self.z3.Q(1, n)

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        return a / b

    def _atom(self, f, t, positive):
        a = f(t)
        key = str(a)
        if positive and key not in self._seen:
            self._seen.add(key)
            self.axioms.append(a > 0)
        return a

    def _exp1(self, x):
        z3 = self.z3
        x = z3.simplify(x, som=True)
        terms = x.children() if z3.is_add(x) else [x]
        out = z3.RealVal(1)
        for t in terms:
            neg = False
            if z3.is_mul(t) and z3.is_rational_value(t.arg(0)) and t.arg(0).as_fraction() < 0:
                c = -t.arg(0).as_fraction()
                rest = t.arg(1) if t.num_args() == 2 else z3.Product(*t.children()[1:])
                t, neg = z3.simplify(c * rest, som=True), True
            e = self._atom(self.E, t, True)
            out = out / e if neg else out * e
        return out

    def exp(self, a):
        return self._arr(self._exp1, a)

    def silu(self, a):
        return self._arr(lambda t: self.S(self.z3.simplify(t, som=True)), a)

    def rsqrt(self, a):
        return self._arr(lambda t: self._atom(self.R, self.z3.simplify(t, som=True), True), a)

    def matmul(self, a, b):
        return np.matmul(a, b)

    def sum(self, a, axis):
        return a.sum(axis=axis, keepdims=True)

    def _fresh_max(self, *xs):
        key = "|".join(sorted(str(x) for x in xs))
        if key not in self._max:
            self._max[key] = self.z3.Real(f"max{len(self._max)}")
        return self._max[key]

    def max(self, a, axis):
        return np.apply_along_axis(lambda v: self._fresh_max(*v), axis, a)[
            tuple(slice(None) if i != (axis % a.ndim) else None for i in range(a.ndim))
        ]

    def maximum(self, a, b):
        return self._arr(self._fresh_max, a, b)

    def take(self, a, sl):
        return a[sl]

    def transpose(self, a):
        if isinstance(a, FF):
            return FF(
                np.swapaxes(np.broadcast_to(a.p, a.shape), -1, -2),
                np.swapaxes(np.broadcast_to(a.q, a.shape), -1, -2),
                a.bad,
            )
        return np.swapaxes(a, -1, -2)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def neg(self, a):
        return -a

    def empty(self, shape):
        return np.full(shape, None, dtype=object)

    def zeros(self, shape):
        return np.full(shape, self.z3.RealVal(0), dtype=object)

    def neg_inf(self, shape):
        return np.array(
            [self.z3.Real(f"minit{i}") for i in range(int(np.prod(shape)))], dtype=object
        ).reshape(shape)
