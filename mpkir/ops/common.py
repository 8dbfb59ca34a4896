"""Helpers shared by the operator families (not a family: it registers nothing).

Numerical conventions of every reference (see also :mod:`mpkir.interpreter`):

* operands arrive in their storage dtype (bf16 via ml-dtypes, f16, f32) and are widened to float64;
* every reduction (dot products, sums, maxima) runs in float64 along the LAST axis of a C-contiguous
  array, so a row's result does not depend on how many other rows are in the call (a task-by-task
  simulator that slices rows/heads gets the same bits);
* results are rounded to float32 once, at the end; the interpreter then rounds them to the declared
  result dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from mpkir.ir import Dim, TensorType
from mpkir.ops.base import ShapeError, fmt_shape, same_dim


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def f64(x) -> np.ndarray:
    """Widen to float64 (bf16/f16 go through float32, which is exact)."""
    a = np.asarray(x)
    if a.dtype == np.float64:
        return a
    if a.dtype.kind in "fc" and a.dtype.itemsize >= 4:
        return a.astype(np.float64)
    if a.dtype.kind in "iub":
        return a.astype(np.float64)
    return a.astype(np.float32).astype(np.float64)


def contig64(x) -> np.ndarray:
    return np.ascontiguousarray(f64(x))


def out32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def row_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis, keepdims; x must be C-contiguous float64."""
    return np.sum(np.ascontiguousarray(x), axis=-1, keepdims=True)


def concrete(shape: Sequence[Dim], dims: Mapping[str, int]) -> tuple[int, ...]:
    """A shape with symbolic dims replaced by their bound values."""
    out = []
    for d in shape:
        if isinstance(d, str):
            if d not in dims:
                raise ValueError(f"symbolic dim '{d}' is not bound")
            out.append(int(dims[d]))
        else:
            out.append(int(d))
    return tuple(out)


def norm_axis(axis: int, rank: int, what: str, attr: str = "axis") -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"{what}: axis {axis} is out of range for rank {rank}", attr=attr)
    return axis % rank


def broadcast_shapes(a: TensorType, b: TensorType, op: str) -> tuple[Dim, ...]:
    ra, rb = list(a.shape), list(b.shape)
    n = max(len(ra), len(rb))
    ra = [1] * (n - len(ra)) + ra
    rb = [1] * (n - len(rb)) + rb
    out: list[Dim] = []
    for da, db in zip(ra, rb, strict=True):
        if same_dim(da, db) or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise ShapeError(f"{op}: shapes {a} and {b} do not broadcast "
                             f"({fmt_shape(a.shape)} vs {fmt_shape(b.shape)}: {da} vs {db})", 1)
    return tuple(out)


def same_dtype(ts: Sequence[TensorType], op: str) -> None:
    for i, t in enumerate(ts[1:], 1):
        if t.dtype != ts[0].dtype:
            raise ShapeError(f"{op}: dtype mismatch: {ts[0]} vs {t}", i)


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise erf in float64 (``math.erf``; chunked so memory stays small)."""
    x = np.asarray(x, np.float64)
    vec = np.frompyfunc(math.erf, 1, 1)
    out = np.empty_like(x)
    flat, res = x.reshape(-1), out.reshape(-1)
    for i in range(0, flat.size, 65536):
        res[i:i + 65536] = vec(flat[i:i + 65536]).astype(np.float64)
    return out
