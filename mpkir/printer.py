"""IR → canonical text.  ``parse(print_module(m)) == m`` and printing is a fixpoint.

IR that has no text form (a non-finite number, a name that is not an identifier, a statement without
results) raises ``ValueError`` instead of printing something the parser would read differently.
"""

from __future__ import annotations

import json
import math
import re

from mpkir import ir

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
INDENT = "  "
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VALUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*\Z")
KEYWORDS = frozenset({"model", "const", "dim", "serve", "weight", "state", "graph", "schedule", "for", "in",
                      "carry", "yield", "return", "true", "false"})
"""Words that the lexer reads as keywords in some position; never used as names by the printer."""


def _ident(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _IDENT.match(name) or name in KEYWORDS:
        raise ValueError(f"cannot print {what} {name!r}: not an identifier")
    return name


def _value(name: str) -> str:
    if not isinstance(name, str) or not _VALUE.match(name):
        raise ValueError(f"cannot print value name %{name!r}")
    return "%" + name


def _num(v: int | float) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"cannot print number {v!r}")
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot print non-finite number {v!r}")
        return repr(v)
    if not -(2**63) < v < 2**63:
        raise ValueError(f"cannot print integer {v}: out of the 64-bit range the parser reads")
    return str(v)


def print_expr(e: ir.AttrValue, parent_prec: int = 0, right: bool = False) -> str:
    """Print an expression or attribute value with the fewest parentheses that re-parse the same."""
    if isinstance(e, ir.Num):
        # a negative literal binds like a unary minus (tighter than any binary op)
        return _num(e.value)
    if isinstance(e, ir.Name):
        return _ident(e.id)
    if isinstance(e, ir.Neg):
        if isinstance(e.operand, ir.Num):  # `-3` would read back as the literal -3
            return f"-({_num(e.operand.value)})"
        inner = print_expr(e.operand, 3)
        return f"-{inner}"
    if isinstance(e, ir.BinOp):
        p = _PREC[e.op]
        s = f"{print_expr(e.lhs, p)} {e.op} {print_expr(e.rhs, p, right=True)}"
        if p < parent_prec or (right and p == parent_prec):
            s = f"({s})"
        return s
    if isinstance(e, ir.Str):
        return json.dumps(e.value)
    if isinstance(e, ir.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ir.ListVal):
        return "[" + ", ".join(print_expr(x) for x in e.items) + "]"
    raise TypeError(f"not an expression: {e!r}")


def print_type(t: ir.TypeExpr) -> str:
    return f"{t.dtype}[{', '.join(print_expr(d) for d in t.dims)}]"


def print_operand(o: ir.Operand) -> str:
    if isinstance(o, ir.ValueRef):
        return _value(o.name)
    if o.index is None:
        return f"@{_ident(o.name)}"
    return f"@{_ident(o.name)}[{print_expr(o.index)}]"


def _attrs(attrs: tuple[ir.Attr, ...]) -> list[str]:
    return [f"{_ident(a.key)}={print_expr(a.value)}" for a in attrs]


def _values(names, what: str) -> str:
    if not names:
        raise ValueError(f"cannot print {what} without values")
    return ", ".join(_value(n) for n in names)


def print_stmt(s: ir.Stmt, depth: int) -> list[str]:
    pad = INDENT * depth
    if isinstance(s, ir.OpStmt):
        args = [print_operand(o) for o in s.operands] + _attrs(s.attrs)
        line = f"{pad}{_values(s.results, 'an op')} = {_ident(s.op)}({', '.join(args)})"
        if s.schedule:
            line += f" schedule({', '.join(_attrs(s.schedule))})"
        if s.types:
            line += " : " + ", ".join(print_type(t) for t in s.types)
        return [line]
    if isinstance(s, ir.ForStmt):
        if not s.carries:
            raise ValueError("cannot print a for loop without carried values")
        carries = ", ".join(f"{_value(c.name)} = {print_operand(c.init)}" for c in s.carries)
        head = (f"{pad}{_values(s.results, 'a for loop')} = for {_ident(s.var)} in "
                f"{print_expr(s.start)}..{print_expr(s.end)} carry({carries}) {{")
        lines = [head]
        for b in s.body:
            lines.extend(print_stmt(b, depth + 1))
        lines.append(pad + "}")
        return lines
    if isinstance(s, ir.YieldStmt):
        return [f"{pad}yield {_values([v.name for v in s.values], 'yield')}"]
    if isinstance(s, ir.ReturnStmt):
        return [f"{pad}return {_values([v.name for v in s.values], 'return')}"]
    raise TypeError(f"not a statement: {s!r}")


def _layer_index(i: ir.LayerIndex | None) -> str:
    return "" if i is None else f"[{_ident(i.var)} < {print_expr(i.count)}]"


def print_decl(d: ir.Decl) -> list[str]:
    if isinstance(d, ir.ModelDecl):
        return [f"model {json.dumps(d.name)}"]
    if isinstance(d, ir.ConstDecl):
        return [f"const {_ident(d.name)} = {print_expr(d.value)}"]
    if isinstance(d, ir.DimDecl):
        return [f"dim {_ident(d.name)} <= {print_expr(d.bound)}"]
    if isinstance(d, ir.ServeDecl):
        return ["serve {", *(f"{INDENT}{_ident(a.key)} = {print_expr(a.value)}" for a in d.items), "}"]
    if isinstance(d, ir.WeightDecl):
        head = f"weight {_ident(d.name)}{_layer_index(d.index)}"
        shard = ""
        if d.shard is not None:
            sh = d.shard
            shard = (f" shard(axis={print_expr(sh.axis)}, parts={print_expr(sh.parts)}, "
                     f"index={print_expr(sh.index)})")
        return [f"{head} : {print_type(d.type)} = {json.dumps(d.checkpoint)}{shard}"]
    if isinstance(d, ir.StateDecl):
        return [f"state {_ident(d.name)}{_layer_index(d.index)} : {print_type(d.type)}"]
    if isinstance(d, ir.GraphDecl):
        params = ", ".join(f"{_value(p.name)}: {print_type(p.type)}" for p in d.params)
        results = ", ".join(print_type(t) for t in d.result_types)
        lines = [f"graph {_ident(d.name)}({params}) -> ({results}) {{"]
        for s in d.body:
            lines.extend(print_stmt(s, 1))
        lines.append("}")
        return lines
    raise TypeError(f"not a declaration: {d!r}")


def print_module(m: ir.Module) -> str:
    """Canonical text: one declaration per line, a blank line between groups of different kinds."""
    out: list[str] = []
    prev = None
    for d in m.decls:
        kind = type(d)
        block = isinstance(d, (ir.ServeDecl, ir.GraphDecl))
        if out and (kind is not prev or block):
            out.append("")
        out.extend(print_decl(d))
        prev = kind
    return "\n".join(out) + "\n"
