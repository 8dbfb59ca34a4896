"""Expression helpers shared by the passes: substitute names, fold constant sub-expressions."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

from mpkir import ir


def map_expr(e: ir.AttrValue, fn: Callable[[ir.AttrValue], ir.AttrValue | None]) -> ir.AttrValue:
    """Rebuild ``e`` bottom-up; ``fn(node)`` may return a replacement for each rebuilt node (or None)."""
    if isinstance(e, ir.BinOp):
        lhs, rhs = map_expr(e.lhs, fn), map_expr(e.rhs, fn)
        if lhs is not e.lhs or rhs is not e.rhs:
            e = dataclasses.replace(e, lhs=lhs, rhs=rhs)
    elif isinstance(e, ir.Neg):
        operand = map_expr(e.operand, fn)
        if operand is not e.operand:
            e = dataclasses.replace(e, operand=operand)
    elif isinstance(e, ir.ListVal):
        items = tuple(map_expr(x, fn) for x in e.items)
        if any(a is not b for a, b in zip(items, e.items, strict=True)):
            e = dataclasses.replace(e, items=items)
    new = fn(e)
    return e if new is None else new


def _literal(value: int | float, loc) -> ir.Num | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return ir.Num(value, loc)


def fold_node(e: ir.AttrValue, consts: Mapping[str, int | float]) -> ir.AttrValue | None:
    """One folding step on a node whose children are already folded (None: leave it)."""
    if isinstance(e, ir.Name) and e.id in consts:
        return _literal(consts[e.id], e.loc)
    if isinstance(e, ir.Neg) and isinstance(e.operand, ir.Num):
        return _literal(-e.operand.value, e.loc)
    if isinstance(e, ir.BinOp) and isinstance(e.lhs, ir.Num) and isinstance(e.rhs, ir.Num):
        a, b = e.lhs.value, e.rhs.value
        if e.op == "+":
            return _literal(a + b, e.loc)
        if e.op == "-":
            return _literal(a - b, e.loc)
        if e.op == "*":
            return _literal(a * b, e.loc)
        if b == 0:
            return None  # left for the verifier to report
        if isinstance(a, int) and isinstance(b, int) and a % b == 0:
            return _literal(a // b, e.loc)
        return _literal(a / b, e.loc)
    return None


def fold(e: ir.AttrValue, consts: Mapping[str, int | float]) -> ir.AttrValue:
    """Replace every constant sub-expression of ``e`` by its literal value (symbolic parts stay)."""
    return map_expr(e, lambda n: fold_node(n, consts))


def mentions(e: ir.AttrValue, names: Mapping[str, object]) -> bool:
    """Whether ``e`` refers to any of ``names``."""
    if isinstance(e, ir.Name):
        return e.id in names
    if isinstance(e, ir.BinOp):
        return mentions(e.lhs, names) or mentions(e.rhs, names)
    if isinstance(e, ir.Neg):
        return mentions(e.operand, names)
    if isinstance(e, ir.ListVal):
        return any(mentions(x, names) for x in e.items)
    return False


def substitute(e: ir.AttrValue, values: Mapping[str, int | float],
               consts: Mapping[str, int | float] | None = None) -> ir.AttrValue:
    """Replace the names in ``values`` (loop variables) by literals.

    An expression that mentioned one of them is then folded (with ``consts`` inlined), so
    ``@w[l + 1]`` becomes ``@w[4]``; expressions that did not are returned unchanged.
    """
    if not mentions(e, values):
        return e
    return fold(e, {**(consts or {}), **values})
