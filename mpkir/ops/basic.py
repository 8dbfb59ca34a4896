"""Dense and elementwise operators (linear, matmul, add, mul, silu, gelu, silu_mul, softmax, cast) and the
collectives (allreduce, allgather, allreduce_argmax).

Products and sums run in float64 and are rounded to float32 once (see :mod:`mpkir.ops.common`): a
linear's output row or column block computed alone (a tile, a split-K partial sum added in float64)
gives the same float32 bits as the whole op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpkir.ir import DType, TensorType
from mpkir.ops.base import AttrSpec, OpDef, ShapeError, expect_float, expect_rank, same_dim
from mpkir.ops.common import broadcast_shapes, contig64, erf, f32, f64, norm_axis, out32


def dot_f64(x64: np.ndarray, w) -> np.ndarray:
    """``x64 · wᵀ`` (x: [M, K] float64, w: [N, K] any float dtype) accumulated in float64."""
    return (f64(w) @ x64.T).T


# ---- linear: y = x · Wᵀ (+ b)
def _linear_infer(ts, attrs):
    x, w = ts[0], ts[1]
    expect_float(x, 0, "linear input")
    expect_float(w, 1, "linear weight")
    expect_rank(w, 2, 1, "linear weight")
    if x.rank < 1:
        raise ShapeError(f"linear input must have rank >= 1, got {x}", 0)
    if not same_dim(x.shape[-1], w.shape[1]):
        raise ShapeError(f"linear: input {x} has inner dim {x.shape[-1]} but weight {w} expects "
                         f"{w.shape[1]} (weight is [out, in])", 1)
    if len(ts) > 2:
        b = ts[2]
        expect_float(b, 2, "linear bias")
        if b.rank != 1 or not same_dim(b.shape[0], w.shape[0]):
            raise ShapeError(f"linear: bias {b} must be [{w.shape[0]}] to match weight {w}", 2)
    return (TensorType(x.dtype, (*x.shape[:-1], w.shape[0])),)


def _linear_ref(xs, attrs, ctx):
    x, w = np.asarray(xs[0]), np.asarray(xs[1])
    lead = x.shape[:-1]
    y = dot_f64(contig64(x).reshape(-1, x.shape[-1]), w)
    if len(xs) > 2:
        y = y + f64(xs[2])
    return (out32(y).reshape(*lead, w.shape[0]),)


LINEAR = OpDef("linear", ("x", "weight", "bias?"), (), _linear_infer, _linear_ref,
               "x · weightᵀ (+ bias); weight is [out, in] as in HuggingFace checkpoints;"
               " float64 accumulation")


# ---- matmul: batched a @ b
def _matmul_infer(ts, attrs):
    a, b = ts
    expect_float(a, 0, "matmul a")
    expect_float(b, 1, "matmul b")
    if a.rank < 2:
        raise ShapeError(f"matmul: a must have rank >= 2, got {a}", 0)
    if b.rank < 2:
        raise ShapeError(f"matmul: b must have rank >= 2, got {b}", 1)
    if not same_dim(a.shape[-1], b.shape[-2]):
        raise ShapeError(f"matmul: a {a} has inner dim {a.shape[-1]} but b {b} has {b.shape[-2]} rows", 1)
    if a.dtype != b.dtype:
        raise ShapeError(f"matmul: dtype mismatch: {a} vs {b}", 1)
    batch = broadcast_shapes(TensorType(a.dtype, a.shape[:-2]), TensorType(b.dtype, b.shape[:-2]), "matmul")
    return (TensorType(a.dtype, (*batch, a.shape[-2], b.shape[-1])),)


def _matmul_ref(xs, attrs, ctx):
    return (out32(np.matmul(f64(xs[0]), f64(xs[1]))),)


MATMUL = OpDef("matmul", ("a", "b"), (), _matmul_infer, _matmul_ref,
               "a @ b over the last two axes, batch dims broadcast; float64 accumulation")


# ---- add, mul
def _binary_infer(name):
    def infer(ts, attrs):
        a, b = ts
        if a.dtype != b.dtype:
            raise ShapeError(f"{name}: dtype mismatch: {a} vs {b}", 1)
        return (TensorType(a.dtype, broadcast_shapes(a, b, name)),)
    return infer


ADD = OpDef("add", ("a", "b"), (), _binary_infer("add"), lambda xs, at, c: (f32(xs[0]) + f32(xs[1]),),
            "elementwise a + b with NumPy broadcasting (float32, correctly rounded)")
MUL = OpDef("mul", ("a", "b"), (), _binary_infer("mul"), lambda xs, at, c: (f32(xs[0]) * f32(xs[1]),),
            "elementwise a · b with NumPy broadcasting (float32, correctly rounded)")


# ---- activations
def _unary_float_infer(name):
    def infer(ts, attrs):
        expect_float(ts[0], 0, f"{name} input")
        return (ts[0],)
    return infer


def silu64(x: np.ndarray) -> np.ndarray:
    """x · sigmoid(x) in float64, written so no overflow warning is raised."""
    e = np.exp(-np.abs(x))
    sig = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return x * sig


SILU = OpDef("silu", ("x",), (), _unary_float_infer("silu"), lambda xs, at, c: (out32(silu64(f64(xs[0]))),),
             "x · sigmoid(x)")


def _gelu_ref(xs, attrs, ctx):
    x = f64(xs[0])
    if attrs.get("approximate", "tanh") == "tanh":
        y = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    else:
        y = 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    return (out32(y),)


GELU = OpDef("gelu", ("x",), (AttrSpec("approximate", "enum", "tanh", ("none", "tanh"),
                                       "tanh: 0.5x(1+tanh(√(2/π)(x+0.044715x³))); none: 0.5x(1+erf(x/√2))"),),
             _unary_float_infer("gelu"), _gelu_ref, "GELU activation")


def _silu_mul_infer(ts, attrs):
    if len(ts) == 1:
        x = ts[0]
        expect_float(x, 0, "silu_mul input")
        if x.rank < 1:
            raise ShapeError(f"silu_mul: input must have rank >= 1, got {x}", 0)
        d = x.shape[-1]
        if isinstance(d, str) or d % 2:
            raise ShapeError(f"silu_mul: one operand {x} must have an even last dim (gate and up halves)", 0)
        return (TensorType(x.dtype, (*x.shape[:-1], d // 2)),)
    g, u = ts
    expect_float(g, 0, "silu_mul gate")
    if g.dtype != u.dtype or g.rank != u.rank or \
            not all(same_dim(a, b) for a, b in zip(g.shape, u.shape, strict=True)):
        raise ShapeError(f"silu_mul: gate {g} and up {u} must have the same type", 1)
    return (g,)


def _silu_mul_ref(xs, attrs, ctx):
    if len(xs) == 1:
        x = f64(xs[0])
        f = x.shape[-1] // 2
        g, u = x[..., :f], x[..., f:]
    else:
        g, u = f64(xs[0]), f64(xs[1])
    return (out32(silu64(g) * u),)


SILU_MUL = OpDef("silu_mul", ("gate", "up?"), (), _silu_mul_infer, _silu_mul_ref,
                 "silu(gate) · up; with one operand [..., 2F] the first half is gate, the second up")


# ---- softmax
def _softmax_infer(ts, attrs):
    x = ts[0]
    expect_float(x, 0, "softmax input")
    norm_axis(attrs.get("axis", -1), x.rank, "softmax")
    return (x,)


def softmax64(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of a float64 array (max-subtracted, float64 sums)."""
    x = np.ascontiguousarray(x)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def _softmax_ref(xs, attrs, ctx):
    x = f64(xs[0])
    ax = attrs.get("axis", -1) % x.ndim
    y = softmax64(np.moveaxis(x, ax, -1))
    return (out32(np.moveaxis(y, -1, ax)),)


SOFTMAX = OpDef("softmax", ("x",), (AttrSpec("axis", "int", -1),), _softmax_infer, _softmax_ref,
                "exp(x - max) / Σ exp(x - max) along axis (float64)")


# ---- cast
def _cast_infer(ts, attrs):
    return (TensorType(attrs["dtype"], ts[0].shape),)


def _cast_ref(xs, attrs, ctx):
    x = np.asarray(xs[0])
    dt: DType = attrs["dtype"]
    if dt.is_float:
        return (f32(x),)
    if x.dtype.kind in "iu":
        return (x.astype(dt.numpy),)
    return (np.trunc(f32(x)).astype(dt.numpy),)  # float -> int truncates toward zero


CAST = OpDef("cast", ("x",), (AttrSpec("dtype", "dtype"),), _cast_infer, _cast_ref,
             "x converted to dtype (float → int truncates toward zero)")


# ---- collectives (tensor parallel).  On one GPU each is its single-rank case; ``combine`` gives the
# cross-rank meaning that the N-GPU simulator (runtime/multi_sim.py) and the CUDA tasks implement.


@dataclass(frozen=True)
class CollectiveDef(OpDef):
    """A collective operator: ``combine(per_rank_operands, per_rank_attrs)`` is every rank's result when
    rank r holds operands ``per_rank_operands[r]``; the single-GPU reference is ``combine`` of one rank."""

    combine: Callable[[Sequence[Sequence[np.ndarray]], Sequence[Mapping[str, Any]]], tuple[np.ndarray, ...]] \
        = field(default=lambda xs, attrs: tuple(xs[0]))


def allreduce_combine(xs, attrs):
    """Sum over ranks in float32, in rank order (acc = x0; acc += x1; ...): every rank gets the same bits."""
    acc = f32(xs[0][0]).copy()
    for r in range(1, len(xs)):
        acc = acc + f32(xs[r][0])
    return (acc,)


ALLREDUCE = CollectiveDef(
    "allreduce", ("x",), (), lambda ts, at: (ts[0],), lambda xs, at, c: allreduce_combine([xs], [at]),
    "sum over tensor-parallel ranks in float32, rank order 0..N-1 (identity on one GPU)",
    combine=allreduce_combine)


def _allgather_infer(ts, attrs):
    x = ts[0]
    if x.rank < 1:
        raise ShapeError(f"allgather input must have rank >= 1, got {x}", 0)
    ax = norm_axis(attrs.get("axis", -1), x.rank, "allgather")
    parts = attrs["parts"]
    if parts < 1:
        raise ShapeError(f"allgather: parts must be at least 1, got {parts}", attr="parts")
    d = x.shape[ax]
    if isinstance(d, str) and parts != 1:
        raise ShapeError(f"allgather: axis {ax} of {x} is the symbolic dim '{d}'; gather a fixed dim", 0)
    shape = list(x.shape)
    shape[ax] = d if parts == 1 else d * parts
    return (TensorType(x.dtype, tuple(shape)),)


def allgather_combine(xs, attrs):
    """Rank slices concatenated along ``axis`` in rank order."""
    ax = attrs[0].get("axis", -1)
    return (np.concatenate([np.asarray(x[0]) for x in xs], axis=ax),)


ALLGATHER = CollectiveDef(
    "allgather", ("x",), (AttrSpec("axis", "int", -1), AttrSpec("parts", "int", 1, doc="number of ranks")),
    _allgather_infer, lambda xs, at, c: allgather_combine([xs], [at]),
    "the ranks' x concatenated along axis in rank order (parts = ranks; identity on one GPU)",
    combine=allgather_combine)


def _argmax_ar_infer(ts, attrs):
    x = ts[0]
    expect_float(x, 0, "allreduce_argmax input")
    if x.rank < 1:
        raise ShapeError(f"allreduce_argmax input must have rank >= 1, got {x}", 0)
    if attrs.get("offset", 0) < 0:
        raise ShapeError(f"allreduce_argmax: offset must not be negative, got {attrs['offset']}",
                         attr="offset")
    return (TensorType(DType.i32, x.shape[:-1]),)


def argmax_partial(x, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """One rank's (max value as float32, global index = local first-max index + offset) per row."""
    x64 = f64(x)
    idx = np.argmax(x64, axis=-1)
    return f32(np.take_along_axis(x64, idx[..., None], axis=-1)[..., 0]), (idx + offset).astype(np.int32)


def argmax_merge(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Merge per-rank (max, index) pairs in rank order: a strictly larger max wins, so ties keep the lower
    rank, i.e. the lowest global index (NumPy's first-occurrence argmax over the whole axis)."""
    best, idx = (np.array(a, copy=True) for a in pairs[0])
    for m, i in pairs[1:]:
        take = m > best
        best = np.where(take, m, best)
        idx = np.where(take, i, idx)
    return idx.astype(np.int32)


def argmax_ar_combine(xs, attrs):
    return (argmax_merge([argmax_partial(x[0], a.get("offset", 0)) for x, a in zip(xs, attrs, strict=True)]),)


ALLREDUCE_ARGMAX = CollectiveDef(
    "allreduce_argmax", ("x",),
    (AttrSpec("offset", "int", 0, doc="global index of this rank's first column"),),
    _argmax_ar_infer, lambda xs, at, c: argmax_ar_combine([xs], [at]),
    "argmax over the last axis when each rank holds a slice of it (vocabulary-parallel lm_head): per-rank "
    "(max, index + offset) pairs merged across ranks, ties to the lowest index; i32",
    combine=argmax_ar_combine)

OPS = (LINEAR, MATMUL, ADD, MUL, SILU, GELU, SILU_MUL, SOFTMAX, CAST, ALLREDUCE, ALLGATHER, ALLREDUCE_ARGMAX)
