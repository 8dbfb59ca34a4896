"""IR → canonical text.  ``parse(print_module(m)) == m`` and printing is a fixpoint."""

from __future__ import annotations

import json

from mpkir import ir

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
INDENT = "  "


def print_expr(e: ir.AttrValue, parent_prec: int = 0, right: bool = False) -> str:
    """Print an expression or attribute value with the fewest parentheses that re-parse the same."""
    if isinstance(e, ir.Num):
        s = repr(e.value) if isinstance(e.value, float) else str(e.value)
        # a negative literal binds like a unary minus (tighter than any binary op)
        return s
    if isinstance(e, ir.Name):
        return e.id
    if isinstance(e, ir.Neg):
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
        return f"%{o.name}"
    if o.index is None:
        return f"@{o.name}"
    return f"@{o.name}[{print_expr(o.index)}]"


def _attrs(attrs: tuple[ir.Attr, ...]) -> list[str]:
    return [f"{a.key}={print_expr(a.value)}" for a in attrs]


def print_stmt(s: ir.Stmt, depth: int) -> list[str]:
    pad = INDENT * depth
    if isinstance(s, ir.OpStmt):
        args = [print_operand(o) for o in s.operands] + _attrs(s.attrs)
        line = f"{pad}{', '.join('%' + r for r in s.results)} = {s.op}({', '.join(args)})"
        if s.schedule:
            line += f" schedule({', '.join(_attrs(s.schedule))})"
        if s.types:
            line += " : " + ", ".join(print_type(t) for t in s.types)
        return [line]
    if isinstance(s, ir.ForStmt):
        carries = ", ".join(f"%{c.name} = {print_operand(c.init)}" for c in s.carries)
        head = (f"{pad}{', '.join('%' + r for r in s.results)} = for {s.var} in "
                f"{print_expr(s.start)}..{print_expr(s.end)} carry({carries}) {{")
        lines = [head]
        for b in s.body:
            lines.extend(print_stmt(b, depth + 1))
        lines.append(pad + "}")
        return lines
    if isinstance(s, ir.YieldStmt):
        return [f"{pad}yield {', '.join('%' + v.name for v in s.values)}"]
    if isinstance(s, ir.ReturnStmt):
        return [f"{pad}return {', '.join('%' + v.name for v in s.values)}"]
    raise TypeError(f"not a statement: {s!r}")


def _layer_index(i: ir.LayerIndex | None) -> str:
    return "" if i is None else f"[{i.var} < {print_expr(i.count)}]"


def print_decl(d: ir.Decl) -> list[str]:
    if isinstance(d, ir.ModelDecl):
        return [f"model {json.dumps(d.name)}"]
    if isinstance(d, ir.ConstDecl):
        return [f"const {d.name} = {print_expr(d.value)}"]
    if isinstance(d, ir.DimDecl):
        return [f"dim {d.name} <= {print_expr(d.bound)}"]
    if isinstance(d, ir.ServeDecl):
        return ["serve {", *(f"{INDENT}{a.key} = {print_expr(a.value)}" for a in d.items), "}"]
    if isinstance(d, ir.WeightDecl):
        return [f"weight {d.name}{_layer_index(d.index)} : {print_type(d.type)} = {json.dumps(d.checkpoint)}"]
    if isinstance(d, ir.StateDecl):
        return [f"state {d.name}{_layer_index(d.index)} : {print_type(d.type)}"]
    if isinstance(d, ir.GraphDecl):
        params = ", ".join(f"%{p.name}: {print_type(p.type)}" for p in d.params)
        results = ", ".join(print_type(t) for t in d.result_types)
        lines = [f"graph {d.name}({params}) -> ({results}) {{"]
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
