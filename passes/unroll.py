"""Loop unrolling: every ``for`` loop becomes straight-line code.

Inside iteration ``L`` a value ``%x`` defined in the body is renamed ``%x.L`` (nested loops:
``%x.L1.L2``); loop variables in expressions become literals (``@w[l]`` → ``@w[3]``); a carried
value is replaced by what the previous iteration yielded (the carry's init in the first one), and
the loop's results by what the last iteration yielded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError
from mpkir.passes.exprs import substitute
from mpkir.passes.manager import register
from mpkir.semantics import Env, build_env, eval_int


class _Unroller:
    def __init__(self, env: Env, taken: set[str]):
        self.env = env
        self.taken = taken  # every value name of the graph before unrolling (collision check)
        self.made: set[str] = set()

    def fresh(self, name: str, suffix: str, loc) -> str:
        if not suffix:
            return name
        new = name + suffix
        if new in self.taken or new in self.made:
            raise MpkError(Diagnostic(f"cannot unroll: the copy '%{new}' of '%{name}' clashes with an "
                                      f"existing value of that name", loc))
        self.made.add(new)
        return new

    # ----------------------------------------------------------------- operands and expressions
    def expr(self, e, loops: Mapping[str, int]):
        return substitute(e, loops, self.env.consts) if e is not None else None

    def value(self, v: ir.ValueRef, subst: Mapping[str, ir.Operand]) -> ir.Operand:
        target = subst.get(v.name)
        if target is None:
            return v
        return dataclasses.replace(target, loc=v.loc)

    def operand(self, o: ir.Operand, subst, loops) -> ir.Operand:
        if isinstance(o, ir.ValueRef):
            return self.value(o, subst)
        if o.index is not None:
            index = self.expr(o.index, loops)
            if index is not o.index:
                return dataclasses.replace(o, index=index)
        return o

    def value_only(self, v: ir.ValueRef, subst, what: str) -> ir.ValueRef:
        o = self.value(v, subst)
        if not isinstance(o, ir.ValueRef):
            raise MpkError(Diagnostic(f"cannot unroll: '{what} %{v.name}' would {what} the weight or state "
                                      f"'@{o.name}' directly", v.loc))
        return o

    def attrs(self, attrs: tuple[ir.Attr, ...], loops) -> tuple[ir.Attr, ...]:
        out = tuple(dataclasses.replace(a, value=self.expr(a.value, loops)) if loops else a for a in attrs)
        return attrs if all(a is b for a, b in zip(out, attrs, strict=True)) else out

    def type(self, t: ir.TypeExpr, loops) -> ir.TypeExpr:
        if not loops:
            return t
        return dataclasses.replace(t, dims=tuple(self.expr(d, loops) for d in t.dims))

    # ----------------------------------------------------------------- statements
    def block(self, body, subst: dict, loops: dict[str, int], suffix: str, out: list):
        """Append the unrolled statements of ``body`` to ``out``; returns the final yield/return, resolved."""
        for s in body:
            if isinstance(s, ir.OpStmt):
                results = tuple(self.fresh(r, suffix, s.loc) for r in s.results)
                out.append(dataclasses.replace(
                    s, results=results,
                    operands=tuple(self.operand(o, subst, loops) for o in s.operands),
                    attrs=self.attrs(s.attrs, loops), schedule=self.attrs(s.schedule, loops),
                    types=tuple(self.type(t, loops) for t in s.types)))
                for r, new in zip(s.results, results, strict=True):
                    subst[r] = ir.ValueRef(new)
            elif isinstance(s, ir.ForStmt):
                self.loop(s, subst, loops, suffix, out)
            elif isinstance(s, ir.YieldStmt):
                return [self.value(v, subst) for v in s.values]
            elif isinstance(s, ir.ReturnStmt):
                out.append(dataclasses.replace(
                    s, values=tuple(self.value_only(v, subst, "return") for v in s.values)))
                return None
        return None

    def loop(self, s: ir.ForStmt, subst: dict, loops: dict[str, int], suffix: str, out: list) -> None:
        env = Env(self.env.consts, self.env.dims, loops)
        lo = eval_int(s.start, env, "loop start")
        hi = eval_int(s.end, env, "loop end")
        current = [self.operand(c.init, subst, loops) for c in s.carries]
        for layer in range(lo, hi):
            inner = dict(subst)
            for c, v in zip(s.carries, current, strict=True):
                inner[c.name] = v
            yielded = self.block(s.body, inner, {**loops, s.var: layer}, f"{suffix}.{layer}", out)
            if yielded is None or len(yielded) != len(s.carries):
                raise MpkError(Diagnostic(
                    "cannot unroll: loop body must end with 'yield' of every carried value", s.loc))
            current = yielded
        if len(s.results) != len(current):
            raise MpkError(Diagnostic(f"cannot unroll: loop binds {len(s.results)} result(s) but carries "
                                      f"{len(current)}", s.loc))
        for r, v in zip(s.results, current, strict=True):
            subst[r] = v


def _names(body, acc: set[str]) -> set[str]:
    for s in body:
        if isinstance(s, ir.OpStmt):
            acc.update(s.results)
        elif isinstance(s, ir.ForStmt):
            acc.update(s.results)
            acc.update(c.name for c in s.carries)
            _names(s.body, acc)
    return acc


def unroll_graph(g: ir.GraphDecl, env: Env) -> ir.GraphDecl:
    """The graph with every loop unrolled (raises MpkError when a loop bound is not a constant)."""
    if not any(isinstance(s, ir.ForStmt) for s in g.body):
        return g
    taken = _names(g.body, {p.name for p in g.params})
    out: list[ir.Stmt] = []
    _Unroller(env, taken).block(g.body, {}, {}, "", out)
    return dataclasses.replace(g, body=tuple(out))


def unroll(m: ir.Module) -> ir.Module:
    """Unroll every loop of every graph of ``m``."""
    env, diags = build_env(m)
    if diags:
        raise MpkError(diags)
    decls = tuple(unroll_graph(d, env) if isinstance(d, ir.GraphDecl) else d for d in m.decls)
    return dataclasses.replace(m, decls=decls)


@register
@dataclass(frozen=True)
class Unroll:
    """Unroll ``for`` loops into straight-line code (values renamed ``%name.L``)."""

    name: ClassVar[str] = "unroll"

    def run(self, module: ir.Module) -> ir.Module:
        return unroll(module)
