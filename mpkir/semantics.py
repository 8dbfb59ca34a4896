"""Name resolution shared by the verifier, passes and interpreter: constants, dims, types, attributes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, part
from mpkir.ops.base import AttrSpec


@dataclass(frozen=True)
class Env:
    """Resolved module-level names: constants (numbers), symbolic dims (with bounds), loop variables."""

    consts: Mapping[str, int | float] = field(default_factory=dict)
    dims: Mapping[str, int] = field(default_factory=dict)
    loop_vars: Mapping[str, int | None] = field(default_factory=dict)
    broken: frozenset[str] = frozenset()
    """Names whose declaration has an error (already reported): uses fail without a second message."""

    def with_loop_var(self, name: str, value: int | None) -> Env:
        return Env(self.consts, self.dims, {**self.loop_vars, name: value}, self.broken)


def eval_expr(e: ir.Expr, env: Env, *, allow_dims: bool = False) -> int | float | str:
    """Evaluate a constant expression.  ``/`` of two ints that divide exactly stays an int.

    With ``allow_dims`` a bare symbolic dim evaluates to its name (for shapes).
    A loop variable whose value is unknown (``None``) raises.
    """
    if isinstance(e, ir.Num):
        return e.value
    if isinstance(e, ir.Name):
        if e.id in env.loop_vars:
            v = env.loop_vars[e.id]
            if v is None:
                raise MpkError(Diagnostic(f"loop variable '{e.id}' has no constant value here", e.loc))
            return v
        if e.id in env.consts:
            return env.consts[e.id]
        if e.id in env.broken:
            raise MpkError([])  # its declaration was already reported
        if e.id in env.dims:
            if allow_dims:
                return e.id
            raise MpkError(Diagnostic(f"symbolic dim '{e.id}' cannot be used in an expression", e.loc))
        raise MpkError(Diagnostic(f"undefined name '{e.id}'", e.loc))
    if isinstance(e, ir.Neg):
        v = eval_expr(e.operand, env)
        if isinstance(v, str):
            raise MpkError(Diagnostic("cannot negate a symbolic dim", e.loc))
        return _checked(-v, e)
    if isinstance(e, ir.BinOp):
        a, b = eval_expr(e.lhs, env), eval_expr(e.rhs, env)
        if isinstance(a, str) or isinstance(b, str):
            raise MpkError(Diagnostic("symbolic dims cannot take part in arithmetic", e.loc))
        return _checked(_arith(e, a, b), e)
    raise TypeError(f"not an expression: {e!r}")


_INT_LIMIT = 2**63


def _arith(e: ir.BinOp, a: int | float, b: int | float) -> int | float:
    try:
        if e.op == "+":
            return a + b
        if e.op == "-":
            return a - b
        if e.op == "*":
            return a * b
        if b == 0:
            raise MpkError(Diagnostic("division by zero", e.loc))
        if isinstance(a, int) and isinstance(b, int) and a % b == 0:
            return a // b
        return a / b
    except (OverflowError, ValueError):
        raise MpkError(Diagnostic("arithmetic overflow", e.loc)) from None


def _checked(v: int | float, e: ir.Expr) -> int | float:
    """Results stay in int64 range and finite (so every later use can print and convert them)."""
    if isinstance(v, int) and not -_INT_LIMIT <= v < _INT_LIMIT:
        raise MpkError(Diagnostic("integer overflow: the value does not fit in 64 bits", e.loc))
    if isinstance(v, float) and not math.isfinite(v):
        raise MpkError(Diagnostic("arithmetic overflow: the value is not a finite number", e.loc))
    return v


def eval_int(e: ir.Expr, env: Env, what: str) -> int:
    v = eval_expr(e, env)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int):
        raise MpkError(Diagnostic(f"{what} must be an integer, got {v}", e.loc))
    return v


def eval_dim(e: ir.Expr, env: Env) -> ir.Dim:
    """One dimension of a shape: a positive int or a symbolic dim name."""
    v = eval_expr(e, env, allow_dims=True)
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or v < 0:
        raise MpkError(Diagnostic(f"dimension must be a non-negative integer, got {v}", e.loc))
    return v


def resolve_type(t: ir.TypeExpr, env: Env) -> ir.TensorType:
    return ir.TensorType(t.dtype, tuple(eval_dim(d, env) for d in t.dims))


def build_env(m: ir.Module) -> tuple[Env, list[Diagnostic]]:
    """Evaluate constants (in order) and dims; returns the env and every problem found."""
    diags: list[Diagnostic] = []
    consts: dict[str, int | float] = {}
    dims: dict[str, int] = {}
    seen: dict[str, ir.Decl] = {}
    broken: set[str] = set()
    for d in m.decls:
        if isinstance(d, (ir.ConstDecl, ir.DimDecl)):
            if d.name in seen:
                prev = part(seen[d.name].loc, "name")
                diags.append(Diagnostic(f"'{d.name}' is already defined", part(d.loc, "name"),
                                        notes=(f"first defined at {prev}",) if prev else ()))
                continue
            seen[d.name] = d
            env = Env(consts, dims, broken=frozenset(broken))
            try:
                if isinstance(d, ir.ConstDecl):
                    consts[d.name] = eval_expr(d.value, env)
                else:
                    b = eval_int(d.bound, env, f"bound of dim '{d.name}'")
                    if b < 1:
                        raise MpkError(Diagnostic(f"bound of dim '{d.name}' must be at least 1, got {b}",
                                                  d.bound.loc))
                    dims[d.name] = b
            except MpkError as e:
                diags.extend(e.diagnostics)
                broken.add(d.name)
    return Env(consts, dims, broken=frozenset(broken)), diags


def resolve_attr(spec: AttrSpec, v: ir.AttrValue, env: Env, what: str = "attribute") -> Any:
    """Check one attribute value against its spec and return the Python value (raises MpkError).

    ``what`` names the kind of setting in messages (``attribute``, ``serve setting``).
    """

    def bad(msg: str, loc=None) -> MpkError:
        return MpkError(Diagnostic(f"{what} '{spec.name}': {msg}", loc or v.loc))

    k = spec.kind
    if k == "bool":
        if not isinstance(v, ir.Bool):
            raise bad("expected true or false")
        return v.value
    if k == "str":
        if not isinstance(v, ir.Str):
            raise bad("expected a string")
        return v.value
    if k in ("enum", "dtype"):
        choices = spec.choices if k == "enum" else tuple(d.value for d in ir.DType)
        if not isinstance(v, ir.Name) or v.id not in choices:
            raise bad(f"expected one of {', '.join(choices)}")
        return v.id if k == "enum" else ir.DType(v.id)
    if k in ("int", "float"):
        if isinstance(v, (ir.Str, ir.Bool, ir.ListVal)):
            raise bad(f"expected {'an integer' if k == 'int' else 'a number'}")
        x = eval_expr(v, env)
        if k == "int":
            if isinstance(x, float) and x.is_integer():
                x = int(x)
            if not isinstance(x, int):
                raise bad(f"expected an integer, got {x}")
            return x
        if isinstance(x, str):
            raise bad(f"expected a number, got symbolic dim '{x}'")
        return float(x)
    if k in ("ints", "floats", "shape"):
        if not isinstance(v, ir.ListVal):
            raise bad("expected a list [a, b, ...]")
        out = []
        for item in v.items:
            if isinstance(item, (ir.Str, ir.Bool, ir.ListVal)):
                raise bad("list items must be numbers" if k != "shape" else "list items must be dims",
                          item.loc)
            if k == "shape":
                x = eval_expr(item, env, allow_dims=True)
                if isinstance(x, float) and x.is_integer():
                    x = int(x)
                if not isinstance(x, (int, str)) or (isinstance(x, int) and x < -1):
                    raise bad(f"shape entries are dims, symbolic dims or -1, got {x}", item.loc)
                out.append(x)
            elif k == "ints":
                out.append(eval_int(item, env, f"item of '{spec.name}'"))
            else:
                out.append(float(eval_expr(item, env)))
        return tuple(out)
    raise ValueError(f"unknown attribute kind {k}")
