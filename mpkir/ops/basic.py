"""A first family of operators (the pattern every family follows)."""

from __future__ import annotations

import numpy as np

from mpkir.ir import DType, TensorType
from mpkir.ops.base import AttrSpec, OpDef, ShapeError, expect_float, expect_rank, fmt_shape, same_dim


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


# ---- linear: y = x · Wᵀ (+ b)
def _linear_infer(ts, attrs):
    x, w = ts[0], ts[1]
    expect_float(x, 0, "linear input")
    expect_rank(w, 2, 1, "linear weight")
    if not same_dim(x.shape[-1], w.shape[1]):
        raise ShapeError(f"linear: input {x} has inner dim {x.shape[-1]} but weight {w} expects "
                         f"{w.shape[1]} (weight is [out, in])", 1)
    if len(ts) > 2 and (ts[2].rank != 1 or not same_dim(ts[2].shape[0], w.shape[0])):
        raise ShapeError(f"linear: bias {ts[2]} must be [{w.shape[0]}]", 2)
    return (TensorType(x.dtype, (*x.shape[:-1], w.shape[0])),)


def _linear_ref(xs, attrs, ctx):
    y = _f32(xs[0]) @ _f32(xs[1]).T
    if len(xs) > 2:
        y = y + _f32(xs[2])
    return (y,)


LINEAR = OpDef("linear", ("x", "weight", "bias?"), (), _linear_infer, _linear_ref,
               "x · weightᵀ (+ bias); weight is [out, in] as in HuggingFace checkpoints")


# ---- add
def _broadcast(a: TensorType, b: TensorType) -> tuple:
    ra, rb = list(a.shape), list(b.shape)
    n = max(len(ra), len(rb))
    ra = [1] * (n - len(ra)) + ra
    rb = [1] * (n - len(rb)) + rb
    out = []
    for da, db in zip(ra, rb):
        if same_dim(da, db) or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise ShapeError(f"shapes {fmt_shape(a.shape)} and {fmt_shape(b.shape)} do not broadcast", 1)
    return tuple(out)


def _add_infer(ts, attrs):
    a, b = ts
    if a.dtype != b.dtype:
        raise ShapeError(f"dtype mismatch: {a} vs {b}", 1)
    return (TensorType(a.dtype, _broadcast(a, b)),)


ADD = OpDef("add", ("a", "b"), (), _add_infer, lambda xs, at, c: (_f32(xs[0]) + _f32(xs[1]),),
            "elementwise a + b with NumPy broadcasting")


OPS = (LINEAR, ADD)
_ = (DType,)
