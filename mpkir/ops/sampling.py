"""Token sampling: ``sample`` (temperature, top-k, top-p) with counter-based randomness.

The draw for a row depends only on (seed, position, logits), never on the row index or on other rows,
so the same request samples the same token whether it is alone in a batch or not, on the CPU or in
the megakernel.  The algorithm, exactly (all integer arithmetic is uint64, wrapping):

1. ``temperature <= 0``: the result is argmax(logits) (first index on ties).  Otherwise
   ``z_i = float64(logit_i) / temperature``.
2. Order the vocabulary by descending z, ties by ascending index.  top-k: keep the first
   ``k = top_k`` (all when ``top_k == 0`` or ``top_k >= V``).
3. top-p (when ``top_p < 1``): over the kept tokens, ``p_j = exp(z_j - z_max) / Σ exp(z - z_max)``
   (float64, in sorted order); keep sorted entry j while ``c_{j-1} < top_p``, where ``c`` is the
   running float64 sum (``c_{-1} = 0``; so at least one token stays).
4. Gumbel-max: for every kept token index i,
   ``h = mix(mix(mix(seed) ^ pos) ^ i)`` with ``pos = uint64(position & 0xFFFFFFFF)`` and
   ``seed = seed mod 2**64``, where ``mix`` is the splitmix64 finaliser::

       mix(x): x += 0x9E3779B97F4A7C15
               x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
               x = (x ^ (x >> 27)) * 0x94D049BB133111EB
               return x ^ (x >> 31)

   ``u_i = (float64(h >> 11) + 0.5) · 2**-53`` (in (0, 1)), ``g_i = -log(-log(u_i))`` (float64).
   The result is the kept index i with the largest ``z_i + g_i`` (the smallest index on ties).
   This draws i with probability ∝ exp(z_i) over the kept set.
"""

from __future__ import annotations

import numpy as np

from mpkir.ir import DType, TensorType
from mpkir.ops.base import AttrSpec, OpDef, ShapeError, expect_float, expect_int, expect_rank, same_dim
from mpkir.ops.common import f32, f64

_M64 = (1 << 64) - 1
_C0 = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, np.uint64) + _C0
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, positions, indices) -> np.ndarray:
    """u[t, i] in (0, 1) for positions [T] and token indices [V] (float64), as in the module docstring."""
    s = mix64(np.array([seed & _M64], np.uint64))[0]
    pos = (np.asarray(positions).astype(np.int64) & 0xFFFFFFFF).astype(np.uint64)
    key = mix64(s ^ pos)[:, None]
    h = mix64(key ^ np.asarray(indices).astype(np.uint64)[None, :])
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0 ** -53)


def _sample_infer(ts, attrs):
    logits, pos = ts
    expect_float(logits, 0, "sample logits")
    expect_rank(logits, 2, 0, "sample logits [tokens, vocab]")
    expect_int(pos, 1, "sample positions")
    expect_rank(pos, 1, 1, "sample positions")
    if not same_dim(pos.shape[0], logits.shape[0]):
        raise ShapeError(f"sample: positions {pos} must have one entry per row of logits {logits}", 1)
    if attrs.get("temperature", 1.0) < 0:
        raise ShapeError(f"sample: temperature must be >= 0, got {attrs['temperature']}", attr="temperature")
    if attrs.get("top_k", 0) < 0:
        raise ShapeError(f"sample: top_k must be >= 0 (0 = off), got {attrs['top_k']}", attr="top_k")
    if not 0 < attrs.get("top_p", 1.0) <= 1:
        raise ShapeError(f"sample: top_p must be in (0, 1] (1 = off), got {attrs['top_p']}", attr="top_p")
    return (TensorType(DType.i32, (logits.shape[0],)),)


def sample_ref(logits, positions, temperature=1.0, top_k=0, top_p=1.0, seed=0) -> np.ndarray:
    """The ``sample`` operator on NumPy arrays: logits [T, V], positions [T] → int32 [T]."""
    x = np.asarray(logits)
    if temperature <= 0:
        return np.argmax(f32(x), axis=-1).astype(np.int32)
    z = np.ascontiguousarray(f64(x)) / temperature
    t, v = z.shape
    order = np.argsort(-z, axis=-1, kind="stable")
    zs = np.take_along_axis(z, order, axis=-1)
    k = v if top_k <= 0 or top_k >= v else top_k
    keep = np.zeros((t, v), bool)
    keep[:, :k] = True
    if top_p < 1.0:
        p = np.where(keep, np.exp(zs - zs[:, :1]), 0.0)
        p = p / np.sum(p, axis=-1, keepdims=True)
        c = np.cumsum(p, axis=-1)
        before = np.concatenate([np.zeros((t, 1)), c[:, :-1]], axis=-1)
        keep &= before < top_p
    kept = np.zeros((t, v), bool)
    np.put_along_axis(kept, order, keep, axis=-1)
    g = -np.log(-np.log(sample_uniforms(seed, positions, np.arange(v))))
    score = np.where(kept, z + g, -np.inf)
    return np.argmax(score, axis=-1).astype(np.int32)


def _sample_ref(xs, attrs, ctx):
    return (sample_ref(xs[0], xs[1], attrs.get("temperature", 1.0), attrs.get("top_k", 0),
                       attrs.get("top_p", 1.0), attrs.get("seed", 0)),)


SAMPLE = OpDef(
    "sample", ("logits", "positions"),
    (AttrSpec("temperature", "float", 1.0, doc="0 = greedy (argmax)"),
     AttrSpec("top_k", "int", 0, doc="keep the k most likely tokens; 0 = off"),
     AttrSpec("top_p", "float", 1.0, doc="keep the smallest prefix with probability >= top_p; 1 = off"),
     AttrSpec("seed", "int", 0)),
    _sample_infer, _sample_ref,
    "one token per row of logits [T, V]: temperature, top-k, top-p, then Gumbel-max with splitmix64 "
    "uniforms of (seed, position, index); deterministic for (seed, position)")

OPS = (SAMPLE,)
