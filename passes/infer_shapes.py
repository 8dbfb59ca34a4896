"""The ``infer-shapes`` pass: write every op's inferred result types into the IR (``: bf16[B, 1024]``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mpkir import ir
from mpkir.verify import GraphInfo, verify


def type_expr(t: ir.TensorType) -> ir.TypeExpr:
    """A resolved type as text-level type: numbers become literals, symbolic dims their names."""
    return ir.TypeExpr(t.dtype, tuple(ir.Num(d) if isinstance(d, int) else ir.Name(d) for d in t.shape))


def _annotate(body: tuple[ir.Stmt, ...], info: GraphInfo, keep: bool) -> tuple[ir.Stmt, ...]:
    out: list[ir.Stmt] = []
    for s in body:
        if isinstance(s, ir.OpStmt) and not (keep and s.types):
            s = dataclasses.replace(s, types=tuple(type_expr(info.types[r]) for r in s.results))
        elif isinstance(s, ir.ForStmt):
            s = dataclasses.replace(s, body=_annotate(s.body, info, keep))
        out.append(s)
    return tuple(out)


def infer_shapes(m: ir.Module, keep_written: bool = False) -> ir.Module:
    """Annotate every op with its result types (raises MpkError if the module does not verify).

    With ``keep_written`` an annotation already in the text (e.g. ``bf16[B, hidden]``) is kept as written.
    """
    analysis = verify(m)
    decls = tuple(
        dataclasses.replace(d, body=_annotate(d.body, analysis.graphs[d.name], keep_written))
        if isinstance(d, ir.GraphDecl) else d
        for d in m.decls)
    return dataclasses.replace(m, decls=decls)


@dataclass(frozen=True)
class InferShapes:
    """Annotate every op with its inferred result types (``keep-written`` keeps annotations as written)."""

    name: ClassVar[str] = "infer-shapes"
    keep_written: bool = False

    def run(self, module: ir.Module) -> ir.Module:
        return infer_shapes(module, self.keep_written)
