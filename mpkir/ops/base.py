"""What an operator is: operands, attribute schema, shape/dtype inference and NumPy reference semantics.

An operator is ONE :class:`OpDef` value; adding an operator means adding one entry to
``mpkir.ops.registry.OPS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpkir.ir import Dim, DType, TensorType

REQUIRED = object()
"""Default marker for an attribute that must be given."""

ATTR_KINDS = ("int", "float", "bool", "str", "enum", "ints", "floats", "shape", "dtype")


@dataclass(frozen=True)
class AttrSpec:
    """One keyword attribute: its kind, default (or REQUIRED) and, for enums, the allowed words."""

    name: str
    kind: str
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


class ShapeError(Exception):
    """Raised by ``infer`` for operands/attributes that do not fit; ``operand``/``attr`` locate it."""

    def __init__(self, message: str, operand: int | None = None, attr: str | None = None):
        super().__init__(message)
        self.operand = operand
        self.attr = attr


@dataclass(frozen=True)
class RefCtx:
    """What a reference implementation may know beyond its operands: the bound symbolic dims."""

    dims: Mapping[str, int] = field(default_factory=dict)


InferFn = Callable[[Sequence[TensorType], Mapping[str, Any]], tuple[TensorType, ...]]
RefFn = Callable[[Sequence[np.ndarray], Mapping[str, Any], RefCtx], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class OpDef:
    """An operator.

    ``operands`` names the operands in order; a name ending in ``?`` is optional (may be
    omitted from the end), one ending in ``*`` takes one or more operands (last position only).
    ``infer`` maps operand types and resolved attributes to result types (raise ShapeError).
    ``reference`` maps NumPy operands (storage dtypes: bf16 through ml-dtypes) to results computed in
    float32 (the interpreter casts them to the inferred result dtype); operands listed in
    ``mutates`` are updated in place (the KV-cache append of attention).
    """

    name: str
    operands: tuple[str, ...]
    attrs: tuple[AttrSpec, ...]
    infer: InferFn
    reference: RefFn
    doc: str
    mutates: tuple[int, ...] = ()

    @property
    def min_operands(self) -> int:
        return sum(1 for o in self.operands if not o.endswith("?"))

    @property
    def max_operands(self) -> int | None:
        return None if self.operands and self.operands[-1].endswith("*") else len(self.operands)

    def attr_spec(self, key: str) -> AttrSpec | None:
        return next((a for a in self.attrs if a.name == key), None)


# ---------------------------------------------------------------- helpers for infer functions


def same_dim(a: Dim, b: Dim) -> bool:
    """Two dims are equal when both are the same number or the same symbolic name."""
    return a == b


def fmt_shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def expect_rank(t: TensorType, rank: int | tuple[int, ...], operand: int, what: str) -> None:
    ranks = (rank,) if isinstance(rank, int) else rank
    if t.rank not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ShapeError(f"{what} must have rank {want}, got {t}", operand)


def expect_float(t: TensorType, operand: int, what: str) -> None:
    if not t.dtype.is_float:
        raise ShapeError(f"{what} must be a float tensor, got {t}", operand)


def expect_int(t: TensorType, operand: int, what: str) -> None:
    if t.dtype not in (DType.i32, DType.i64):
        raise ShapeError(f"{what} must be an i32 or i64 tensor, got {t}", operand)
