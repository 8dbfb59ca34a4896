"""Indexing and layout operators: embedding, reshape, split, concat, transpose, argmax."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from mpkir.ir import DType, TensorType
from mpkir.ops.base import AttrSpec, OpDef, ShapeError, expect_int, expect_rank, fmt_shape, same_dim
from mpkir.ops.common import f32, norm_axis


# ---- embedding
def _embedding_infer(ts, attrs):
    ids, table = ts
    expect_int(ids, 0, "embedding ids")
    expect_rank(table, 2, 1, "embedding table [vocab, hidden]")
    return (TensorType(table.dtype, (*ids.shape, table.shape[1])),)


def _embedding_ref(xs, attrs, ctx):
    ids, table = np.asarray(xs[0]), np.asarray(xs[1])
    v = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        bad = ids[(ids < 0) | (ids >= v)].reshape(-1)[0]
        raise ValueError(f"embedding: token id {int(bad)} is out of range 0..{v - 1}")
    return (f32(table[ids]),)


EMBEDDING = OpDef("embedding", ("ids", "table"), (), _embedding_infer, _embedding_ref,
                  "rows of table [vocab, hidden] selected by integer ids: [..., hidden]")


# ---- reshape
def _prod(xs) -> int:
    return math.prod(int(v) for v in xs)


def reshape_target(shape_in, spec) -> tuple:
    """The result shape of reshape (symbolic dims must map to themselves; one -1 allowed)."""
    x_str = fmt_shape(shape_in)
    if sum(1 for d in spec if d == -1) > 1:
        raise ShapeError(f"reshape: shape {fmt_shape(spec)} has more than one -1", attr="shape")
    in_syms = Counter(d for d in shape_in if isinstance(d, str))
    out_syms = Counter(d for d in spec if isinstance(d, str))
    extra = out_syms - in_syms
    if extra:
        name = next(iter(extra))
        raise ShapeError(f"reshape: symbolic dim '{name}' of target shape {fmt_shape(spec)} is not a dim of "
                         f"input shape {x_str} (symbolic dims must map to themselves)", attr="shape")
    rest = in_syms - out_syms
    n_in = _prod(d for d in shape_in if not isinstance(d, str))
    n_out = _prod(d for d in spec if not isinstance(d, str) and d != -1)
    if -1 not in spec:
        if rest:
            name = next(iter(rest))
            raise ShapeError(f"reshape: symbolic dim '{name}' of input shape {x_str} has no place in target "
                             f"shape {fmt_shape(spec)} (symbolic dims must map to themselves)", attr="shape")
        if n_in != n_out:
            raise ShapeError(f"reshape: input shape {x_str} ({n_in} elements per symbolic index) does not "
                             f"fit target shape {fmt_shape(spec)} ({n_out})", attr="shape")
        return tuple(spec)
    if rest:
        if sum(rest.values()) != 1 or n_in != n_out:
            raise ShapeError(f"reshape: cannot infer -1 in {fmt_shape(spec)} from input shape {x_str}: "
                             f"-1 may stand for one symbolic dim only when the numbers match", attr="shape")
        fill = next(iter(rest))
    else:
        if n_out == 0 or n_in % n_out:
            raise ShapeError(f"reshape: input shape {x_str} ({n_in} elements) cannot be split into target "
                             f"shape {fmt_shape(spec)}", attr="shape")
        fill = n_in // n_out
    return tuple(fill if d == -1 else d for d in spec)


def _reshape_infer(ts, attrs):
    return (TensorType(ts[0].dtype, reshape_target(ts[0].shape, attrs["shape"])),)


def _reshape_ref(xs, attrs, ctx):
    x = np.asarray(xs[0])
    shape = []
    for d in attrs["shape"]:
        if isinstance(d, str):
            if d not in ctx.dims:
                raise ValueError(f"reshape: symbolic dim '{d}' is not bound")
            d = ctx.dims[d]
        shape.append(int(d))
    return (x.reshape(shape),)


RESHAPE = OpDef("reshape", ("x",), (AttrSpec("shape", "shape"),), _reshape_infer, _reshape_ref,
                "x with a new shape (ints, symbolic dims that map to themselves, one -1)")


# ---- split
def _split_infer(ts, attrs):
    x = ts[0]
    ax = norm_axis(attrs.get("axis", -1), x.rank, "split")
    sizes = attrs["sizes"]
    if not sizes or any(s < 0 for s in sizes):
        raise ShapeError(f"split: sizes {list(sizes)} must be non-negative and non-empty", attr="sizes")
    d = x.shape[ax]
    if isinstance(d, str):
        raise ShapeError(f"split: axis {ax} of {x} is the symbolic dim '{d}'; split needs a fixed dim",
                         attr="axis")
    if sum(sizes) != d:
        raise ShapeError(f"split: sizes {list(sizes)} sum to {sum(sizes)} but axis {ax} of {x} is {d}",
                         attr="sizes")
    return tuple(TensorType(x.dtype, (*x.shape[:ax], s, *x.shape[ax + 1:])) for s in sizes)


def _split_ref(xs, attrs, ctx):
    x = np.asarray(xs[0])
    ax = attrs.get("axis", -1) % x.ndim
    cuts = np.cumsum(attrs["sizes"])[:-1]
    return tuple(np.split(x, cuts, axis=ax))


SPLIT = OpDef("split", ("x",), (AttrSpec("sizes", "ints"), AttrSpec("axis", "int", -1)), _split_infer,
              _split_ref, "x cut along axis into pieces of the given sizes (one result per size)")


# ---- concat
def _concat_infer(ts, attrs):
    first = ts[0]
    ax = norm_axis(attrs.get("axis", -1), first.rank, "concat")
    total = 0
    for i, t in enumerate(ts):
        if t.dtype != first.dtype:
            raise ShapeError(f"concat: dtype mismatch: {first} vs {t}", i)
        if t.rank != first.rank:
            raise ShapeError(f"concat: rank mismatch: {first} vs {t}", i)
        for j, (a, b) in enumerate(zip(first.shape, t.shape, strict=True)):
            if j != ax and not same_dim(a, b):
                raise ShapeError(f"concat: {first} and {t} differ in dim {j} ({a} vs {b}), "
                                 f"not only in the concat axis {ax}", i)
        d = t.shape[ax]
        if isinstance(d, str):
            if len(ts) > 1:
                raise ShapeError(f"concat: axis {ax} of {t} is the symbolic dim '{d}'; concat needs "
                                 "fixed dims along the axis", i)
            total = d
        else:
            total += d
    return (TensorType(first.dtype, (*first.shape[:ax], total, *first.shape[ax + 1:])),)


def _concat_ref(xs, attrs, ctx):
    arrs = [np.asarray(x) for x in xs]
    return (np.concatenate(arrs, axis=attrs.get("axis", -1) % arrs[0].ndim),)


CONCAT = OpDef("concat", ("xs*",), (AttrSpec("axis", "int", -1),), _concat_infer, _concat_ref,
               "operands joined along axis")


# ---- transpose
def _transpose_infer(ts, attrs):
    x = ts[0]
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"transpose: perm {list(perm)} is not a permutation of the {x.rank} axes of {x}",
                         attr="perm")
    return (TensorType(x.dtype, tuple(x.shape[p] for p in perm)),)


TRANSPOSE = OpDef("transpose", ("x",), (AttrSpec("perm", "ints"),), _transpose_infer,
                  lambda xs, at, c: (np.ascontiguousarray(np.transpose(np.asarray(xs[0]), at["perm"])),),
                  "axes of x permuted: result dim i is x dim perm[i]")


# ---- argmax
def _argmax_infer(ts, attrs):
    x = ts[0]
    if x.rank < 1:
        raise ShapeError(f"argmax input must have rank >= 1, got {x}", 0)
    ax = norm_axis(attrs.get("axis", -1), x.rank, "argmax")
    return (TensorType(DType.i32, x.shape[:ax] + x.shape[ax + 1:]),)


def _argmax_ref(xs, attrs, ctx):
    x = np.asarray(xs[0])
    if x.dtype.kind not in "iu":
        x = f32(x)
    return (np.argmax(x, axis=attrs.get("axis", -1)).astype(np.int32),)


ARGMAX = OpDef("argmax", ("x",), (AttrSpec("axis", "int", -1),), _argmax_infer, _argmax_ref,
               "index of the largest value along axis (the first one on ties), i32")

OPS = (EMBEDDING, RESHAPE, SPLIT, CONCAT, TRANSPOSE, ARGMAX)
