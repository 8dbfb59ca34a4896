"""Normalisation operators: rmsnorm, layernorm, head_rmsnorm.

Each row (last axis) is normalised on its own, in float64, and rounded to float32 once.
"""

from __future__ import annotations

import numpy as np

from mpkir.ir import TensorType
from mpkir.ops.base import AttrSpec, OpDef, ShapeError, expect_float, expect_rank, same_dim
from mpkir.ops.common import contig64, f64, out32


def _vector_for(x: TensorType, w: TensorType, op: str, what: str, i: int) -> None:
    expect_float(w, i, f"{op} {what}")
    if w.rank != 1 or not same_dim(w.shape[0], x.shape[-1]):
        raise ShapeError(f"{op}: {what} {w} must be [{x.shape[-1]}] to match the last dim of input {x}", i)


def _norm_infer(op):
    def infer(ts, attrs):
        x = ts[0]
        expect_float(x, 0, f"{op} input")
        if op == "head_rmsnorm":
            expect_rank(x, 3, 0, "head_rmsnorm input [tokens, heads, head_dim]")
        elif x.rank < 1:
            raise ShapeError(f"{op} input must have rank >= 1, got {x}", 0)
        _vector_for(x, ts[1], op, "weight", 1)
        if len(ts) > 2:
            _vector_for(x, ts[2], op, "bias", 2)
        if attrs.get("eps", 0.0) < 0:
            raise ShapeError(f"{op}: eps must be >= 0, got {attrs['eps']}", attr="eps")
        return (x,)
    return infer


def rmsnorm64(x64: np.ndarray, w, eps: float) -> np.ndarray:
    """x · 1/sqrt(mean(x²) + eps) · w over the last axis, float64."""
    ms = np.sum(x64 * x64, axis=-1, keepdims=True) / x64.shape[-1]
    return x64 * (1.0 / np.sqrt(ms + eps)) * f64(w)


def _rmsnorm_ref(xs, attrs, ctx):
    return (out32(rmsnorm64(contig64(xs[0]), xs[1], attrs.get("eps", 1e-6))),)


def _layernorm_ref(xs, attrs, ctx):
    x = contig64(xs[0])
    n = x.shape[-1]
    mean = np.sum(x, axis=-1, keepdims=True) / n
    d = np.ascontiguousarray(x - mean)
    var = np.sum(d * d, axis=-1, keepdims=True) / n
    y = d * (1.0 / np.sqrt(var + attrs.get("eps", 1e-5))) * f64(xs[1])
    if len(xs) > 2:
        y = y + f64(xs[2])
    return (out32(y),)


RMSNORM = OpDef("rmsnorm", ("x", "weight"), (AttrSpec("eps", "float", 1e-6),), _norm_infer("rmsnorm"),
                _rmsnorm_ref, "x · rsqrt(mean(x²) + eps) · weight over the last axis")
LAYERNORM = OpDef("layernorm", ("x", "weight", "bias?"), (AttrSpec("eps", "float", 1e-5),),
                  _norm_infer("layernorm"), _layernorm_ref,
                  "(x - mean) · rsqrt(var + eps) · weight (+ bias) over the last axis (biased variance)")
HEAD_RMSNORM = OpDef("head_rmsnorm", ("x", "weight"), (AttrSpec("eps", "float", 1e-6),),
                     _norm_infer("head_rmsnorm"), _rmsnorm_ref,
                     "rmsnorm of each head of x: [tokens, heads, head_dim] over head_dim "
                     "(Qwen3 q_norm/k_norm)")

OPS = (RMSNORM, LAYERNORM, HEAD_RMSNORM)
