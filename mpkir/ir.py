"""The .mpk IR: frozen dataclasses that the parser builds, passes transform and the printer prints.

Every node carries a ``loc`` (source span) that is excluded from equality, so
``parse(print(m)) == m`` compares structure only.  Passes never mutate nodes: they
build new ones (``dataclasses.replace``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from mpkir.diagnostics import Span

# --------------------------------------------------------------------------- dtypes


class DType(enum.Enum):
    """Storage dtypes of tensors."""

    bf16 = "bf16"
    f16 = "f16"
    f32 = "f32"
    i32 = "i32"
    i64 = "i64"
    u8 = "u8"

    @property
    def itemsize(self) -> int:
        return {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "i64": 8, "u8": 1}[self.value]

    @property
    def is_float(self) -> bool:
        return self in (DType.bf16, DType.f16, DType.f32)

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype used to store values of this type (bf16 through ml-dtypes)."""
        if self is DType.bf16:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype({"f16": np.float16, "f32": np.float32, "i32": np.int32,
                         "i64": np.int64, "u8": np.uint8}[self.value])

    def __str__(self) -> str:
        return self.value


# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Num:
    """An integer or float literal."""

    value: int | float
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Name:
    """A reference to a constant, a symbolic dim, a loop variable or an enum word."""

    id: str
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BinOp:
    """``lhs op rhs`` with op in + - * /."""

    op: str
    lhs: Expr
    rhs: Expr
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Neg:
    """Unary minus."""

    operand: Expr
    loc: Span | None = field(default=None, compare=False, repr=False)


Expr = Num | Name | BinOp | Neg


@dataclass(frozen=True)
class Str:
    """A string literal attribute."""

    value: str
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Bool:
    """``true`` / ``false``."""

    value: bool
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ListVal:
    """``[a, b, ...]`` attribute."""

    items: tuple[AttrValue, ...]
    loc: Span | None = field(default=None, compare=False, repr=False)


AttrValue = Num | Name | BinOp | Neg | Str | Bool | ListVal

# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class TypeExpr:
    """A tensor type as written: dtype and dims that are expressions (``bf16[B, heads*128]``)."""

    dtype: DType
    dims: tuple[Expr, ...]
    loc: Span | None = field(default=None, compare=False, repr=False)


Dim = int | str
"""A resolved dimension: a number, or the name of a symbolic dim (``"B"``)."""


@dataclass(frozen=True)
class TensorType:
    """A resolved tensor type: dims are ints or symbolic dim names."""

    dtype: DType
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)


# --------------------------------------------------------------------------- operands


@dataclass(frozen=True)
class ValueRef:
    """``%name``: an SSA value."""

    name: str
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GlobalRef:
    """``@name`` or ``@name[index]``: a weight or state tensor (indexed per layer)."""

    name: str
    index: Expr | None = None
    loc: Span | None = field(default=None, compare=False, repr=False)


Operand = ValueRef | GlobalRef


@dataclass(frozen=True)
class Attr:
    """``key=value`` on an op or in a schedule."""

    key: str
    value: AttrValue
    loc: Span | None = field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------- statements


@dataclass(frozen=True)
class OpStmt:
    """``%r1, %r2 = op(operands..., key=value...) schedule(k=v) : type1, type2``."""

    results: tuple[str, ...]
    op: str
    operands: tuple[Operand, ...]
    attrs: tuple[Attr, ...] = ()
    schedule: tuple[Attr, ...] = ()
    types: tuple[TypeExpr, ...] = ()
    loc: Span | None = field(default=None, compare=False, repr=False)

    def attr(self, key: str) -> AttrValue | None:
        for a in self.attrs:
            if a.key == key:
                return a.value
        return None


@dataclass(frozen=True)
class Carry:
    """``%inner = init`` in a for loop's carry list."""

    name: str
    init: Operand
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ForStmt:
    """``%out = for l in start..end carry(%h = %x0) { ... yield %h2 }``.

    The body runs for l = start, ..., end-1; carried values enter as the carry names and
    leave through ``yield``; after the loop ``results`` hold the last yielded values.
    """

    results: tuple[str, ...]
    var: str
    start: Expr
    end: Expr
    carries: tuple[Carry, ...]
    body: tuple[Stmt, ...]
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class YieldStmt:
    """``yield %a, %b`` at the end of a loop body."""

    values: tuple[ValueRef, ...]
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ReturnStmt:
    """``return %a, %b`` at the end of a graph."""

    values: tuple[ValueRef, ...]
    loc: Span | None = field(default=None, compare=False, repr=False)


Stmt = OpStmt | ForStmt | YieldStmt | ReturnStmt

# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class ModelDecl:
    """``model "qwen3-0.6b"``."""

    name: str
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ConstDecl:
    """``const hidden = 1024``."""

    name: str
    value: Expr
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DimDecl:
    """``dim B <= 64``: a symbolic dimension with its upper bound."""

    name: str
    bound: Expr
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LayerIndex:
    """``[l < layers]`` on a weight/state: one tensor per layer index."""

    var: str
    count: Expr
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Shard:
    """``shard(axis=0, parts=2, index=1)`` after a weight's checkpoint name: the declared type is slice
    ``index`` of ``parts`` equal contiguous slices of the checkpoint tensor along ``axis`` (tensor parallel:
    one rank's part; the checkpoint tensor's ``axis`` is ``parts`` times the declared one)."""

    axis: Expr
    parts: Expr
    index: Expr
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class WeightDecl:
    """``weight wq[l < layers] : bf16[q_dim, hidden] = "model.layers.{l}.self_attn.q_proj.weight"``.

    ``shard`` (optional, printed after the checkpoint name) says which slice of the checkpoint tensor the
    weight is (see :class:`Shard`); None: the whole tensor.
    """

    name: str
    index: LayerIndex | None
    type: TypeExpr
    checkpoint: str
    loc: Span | None = field(default=None, compare=False, repr=False)
    shard: Shard | None = None

    def checkpoint_name(self, layer: int | None = None) -> str:
        """The checkpoint key for one layer (the index variable substituted)."""
        if self.index is None or layer is None:
            return self.checkpoint
        return self.checkpoint.replace("{" + self.index.var + "}", str(layer))


@dataclass(frozen=True)
class StateDecl:
    """``state k_cache[l < layers] : bf16[...]``: zero-initialised, mutable (KV caches)."""

    name: str
    index: LayerIndex | None
    type: TypeExpr
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ServeDecl:
    """``serve { key = value ... }``; meaning and validation live in :mod:`mpkir.serve`."""

    items: tuple[Attr, ...]
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Param:
    """``%tokens: i32[B]`` in a graph signature."""

    name: str
    type: TypeExpr
    loc: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GraphDecl:
    """``graph decode(%a: T, ...) -> (T, ...) { stmts }``."""

    name: str
    params: tuple[Param, ...]
    result_types: tuple[TypeExpr, ...]
    body: tuple[Stmt, ...]
    loc: Span | None = field(default=None, compare=False, repr=False)


Decl = ModelDecl | ConstDecl | DimDecl | ServeDecl | WeightDecl | StateDecl | GraphDecl


@dataclass(frozen=True)
class Module:
    """A whole .mpk file: declarations in source order."""

    decls: tuple[Decl, ...]
    path: str = field(default="<input>", compare=False, repr=False)

    def _of(self, kind: type) -> list:
        return [d for d in self.decls if isinstance(d, kind)]

    @property
    def model_name(self) -> str | None:
        m = self._of(ModelDecl)
        return m[0].name if m else None

    @property
    def consts(self) -> list[ConstDecl]:
        return self._of(ConstDecl)

    @property
    def dims(self) -> list[DimDecl]:
        return self._of(DimDecl)

    @property
    def weights(self) -> list[WeightDecl]:
        return self._of(WeightDecl)

    @property
    def states(self) -> list[StateDecl]:
        return self._of(StateDecl)

    @property
    def graphs(self) -> list[GraphDecl]:
        return self._of(GraphDecl)

    @property
    def serve(self) -> ServeDecl | None:
        s = self._of(ServeDecl)
        return s[0] if s else None

    def weight(self, name: str) -> WeightDecl | None:
        return next((w for w in self.weights if w.name == name), None)

    def state(self, name: str) -> StateDecl | None:
        return next((s for s in self.states if s.name == name), None)

    def graph(self, name: str | None = None) -> GraphDecl:
        """The named graph, or the entry graph (the first one) when no name is given."""
        gs = self.graphs
        if name is None:
            if not gs:
                raise KeyError("module has no graph")
            return gs[0]
        for g in gs:
            if g.name == name:
                return g
        raise KeyError(name)
