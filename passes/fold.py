"""The ``fold-constants`` pass: constant expressions and constant names become literals.

Shapes (``bf16[B, heads * head_dim]`` -> ``bf16[B, 2048]``), attributes, layer indices, loop bounds,
dim bounds and serve settings are folded; symbolic dims and loop variables stay as they are.  The
``const`` declarations themselves are kept.  Attributes are folded only where the operator's schema
says they are numbers, so an enum word (``style=neox``) is never taken for a constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from mpkir import ir
from mpkir.diagnostics import MpkError
from mpkir.ops.base import AttrSpec
from mpkir.ops.registry import OPS
from mpkir.passes.exprs import fold
from mpkir.semantics import build_env
from mpkir.serve import SCHEMA

_NUMERIC = ("int", "float", "ints", "floats", "shape")
Consts = Mapping[str, "int | float"]


class _Folder:
    def __init__(self, consts: Consts):
        self.consts = consts

    def e(self, x):
        return fold(x, self.consts) if x is not None else None

    def type(self, t: ir.TypeExpr) -> ir.TypeExpr:
        return dataclasses.replace(t, dims=tuple(self.e(d) for d in t.dims))

    def attrs(self, attrs: tuple[ir.Attr, ...], specs: Mapping[str, AttrSpec] | None) -> tuple[ir.Attr, ...]:
        out = []
        for a in attrs:
            spec = specs.get(a.key) if specs is not None else None
            # unknown schema (schedule hints, unknown ops): fold only what folds to a number
            numeric = spec.kind in _NUMERIC if spec is not None else self._numeric(a.value)
            out.append(dataclasses.replace(a, value=self.e(a.value)) if numeric else a)
        return tuple(out)

    def _numeric(self, v: ir.AttrValue) -> bool:
        v = self.e(v)
        if isinstance(v, ir.ListVal):
            return all(isinstance(x, ir.Num) for x in v.items)
        return isinstance(v, ir.Num)

    def operand(self, o: ir.Operand) -> ir.Operand:
        if isinstance(o, ir.GlobalRef) and o.index is not None:
            return dataclasses.replace(o, index=self.e(o.index))
        return o

    def stmt(self, s: ir.Stmt) -> ir.Stmt:
        if isinstance(s, ir.OpStmt):
            op = OPS.get(s.op)
            specs = {a.name: a for a in op.attrs} if op is not None else None
            return dataclasses.replace(
                s, operands=tuple(self.operand(o) for o in s.operands), attrs=self.attrs(s.attrs, specs),
                schedule=self.attrs(s.schedule, None), types=tuple(self.type(t) for t in s.types))
        if isinstance(s, ir.ForStmt):
            return dataclasses.replace(
                s, start=self.e(s.start), end=self.e(s.end),
                carries=tuple(dataclasses.replace(c, init=self.operand(c.init)) for c in s.carries),
                body=tuple(self.stmt(b) for b in s.body))
        return s

    def index(self, i: ir.LayerIndex | None) -> ir.LayerIndex | None:
        return None if i is None else dataclasses.replace(i, count=self.e(i.count))

    def decl(self, d: ir.Decl) -> ir.Decl:
        if isinstance(d, ir.DimDecl):
            return dataclasses.replace(d, bound=self.e(d.bound))
        if isinstance(d, ir.ServeDecl):
            return dataclasses.replace(d, items=self.attrs(d.items, {s.name: s for s in SCHEMA}))
        if isinstance(d, ir.WeightDecl | ir.StateDecl):
            return dataclasses.replace(d, index=self.index(d.index), type=self.type(d.type))
        if isinstance(d, ir.GraphDecl):
            return dataclasses.replace(
                d, params=tuple(dataclasses.replace(p, type=self.type(p.type)) for p in d.params),
                result_types=tuple(self.type(t) for t in d.result_types),
                body=tuple(self.stmt(s) for s in d.body))
        return d  # model and const declarations are kept as written


def fold_constants(m: ir.Module) -> ir.Module:
    """Fold constants everywhere outside the ``const`` declarations (raises MpkError on a bad const)."""
    env, diags = build_env(m)
    if diags:
        raise MpkError(diags)
    f = _Folder(env.consts)
    return dataclasses.replace(m, decls=tuple(f.decl(d) for d in m.decls))


@dataclass(frozen=True)
class FoldConstants:
    """Replace constant expressions and constant names in shapes, attributes and indices by literals."""

    name: ClassVar[str] = "fold-constants"

    def run(self, module: ir.Module) -> ir.Module:
        return fold_constants(module)
