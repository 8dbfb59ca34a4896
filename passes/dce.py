"""The ``dce`` pass: drop ops (and whole loops) whose results are never used.

Ops that mutate state (``OpDef.mutates``, e.g. the KV-cache append of ``paged_attention``) and ops
the registry does not know are always kept, as are ``yield`` and ``return``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mpkir import ir
from mpkir.ops.registry import OPS


def _has_effects(s: ir.Stmt) -> bool:
    if isinstance(s, ir.OpStmt):
        op = OPS.get(s.op)
        return op is None or bool(op.mutates)
    if isinstance(s, ir.ForStmt):
        return any(_has_effects(b) for b in s.body)
    return False


def _uses(body: tuple[ir.Stmt, ...], acc: set[str]) -> set[str]:
    for s in body:
        if isinstance(s, ir.OpStmt):
            acc.update(o.name for o in s.operands if isinstance(o, ir.ValueRef))
        elif isinstance(s, ir.ForStmt):
            acc.update(c.init.name for c in s.carries if isinstance(c.init, ir.ValueRef))
            _uses(s.body, acc)
        elif isinstance(s, (ir.YieldStmt, ir.ReturnStmt)):
            acc.update(v.name for v in s.values)
    return acc


def _prune(body: tuple[ir.Stmt, ...], used: set[str]) -> tuple[ir.Stmt, ...]:
    out: list[ir.Stmt] = []
    for s in body:
        if isinstance(s, ir.OpStmt):
            if not _has_effects(s) and not any(r in used for r in s.results):
                continue
        elif isinstance(s, ir.ForStmt):
            inner = _prune(s.body, used)
            if inner != s.body:
                s = dataclasses.replace(s, body=inner)
            if not _has_effects(s) and not any(r in used for r in s.results):
                continue
        out.append(s)
    return tuple(out)


def dce_graph(g: ir.GraphDecl) -> ir.GraphDecl:
    """The graph without dead ops, iterated to a fixed point."""
    body = g.body
    while True:
        pruned = _prune(body, _uses(body, set()))
        if pruned == body:
            break
        body = pruned
    return g if body is g.body else dataclasses.replace(g, body=body)


def dce(m: ir.Module) -> ir.Module:
    decls = tuple(dce_graph(d) if isinstance(d, ir.GraphDecl) else d for d in m.decls)
    return dataclasses.replace(m, decls=decls)


@dataclass(frozen=True)
class DeadCodeElimination:
    """Remove ops whose results are unused (never ops that mutate state, never returns)."""

    name: ClassVar[str] = "dce"

    def run(self, module: ir.Module) -> ir.Module:
        return dce(module)
