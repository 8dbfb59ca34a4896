"""IR → canonical text.  ``parse(print_module(m)) == m`` and printing is a fixpoint.

IR that has no text form (a non-finite number, a name that is not an identifier, a statement without
results) raises ``ValueError`` instead of printing something the parser would read differently.
"""

from __future__ import annotations

import json
import math
import re

from mpkir import ir
from mpkir.comments import CommentCursor, Layout

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
INDENT = "  "
_TRAIL = "\0"   # between a line's code and its trailing comment until _align_trailing places the comment
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
        text = repr(v)
        if "e" in text:  # 1e-06 -> 1e-6, 1e+20 -> 1e20 (the same float)
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
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
    out: list[str] = []
    _stmt(s, depth, out, CommentCursor())
    return out


def _lead(node, prev_end: int | None, pad: str, out: list[str], cur: CommentCursor) -> None:
    """Above a node: a blank line where the source had one since the previous node (not right after a
    ``{``), then the comments above it, keeping the blank lines around and between them."""
    loc = getattr(node, "loc", None)
    if not cur.active or loc is None:
        return
    comments = cur.before(loc.line)
    first = comments[0].line if comments else loc.line
    if cur.blank_between(prev_end, first):
        _blank(out)
    for c in comments:
        if cur.blank_above(c):
            _blank(out)
        out.append(pad + c.text)
    if comments and cur.blank_below(comments[-1]):
        _blank(out)


def _blank(out: list[str]) -> None:
    """One blank line, unless the output is empty, already ends in one, or its last code opens a block."""
    if out and out[-1] and not out[-1].split(_TRAIL, 1)[0].endswith("{"):
        out.append("")


def _end(node) -> int | None:
    loc = getattr(node, "loc", None)
    return None if loc is None else (loc.end_line or loc.line)


def _one_line(node, line: str, pad: str, out: list[str], cur: CommentCursor) -> None:
    """A node printed on one line, with the comment that trails it; comments inside it go above it."""
    loc = getattr(node, "loc", None)
    if cur.active and loc is not None:
        inner, trail = cur.within(loc.line, loc.end_line or loc.line)
        out.extend(pad + c.text for c in inner)
        if trail is not None:
            line += _TRAIL + trail.text
    out.append(line)


def _open(node, line: str, out: list[str], cur: CommentCursor) -> None:
    """The first line of a block node (``{`` at its end), with the comment that trails it."""
    loc = getattr(node, "loc", None)
    if cur.active and loc is not None:
        trail = cur.trailing(loc.line)
        if trail is not None:
            line += _TRAIL + trail.text
    out.append(line)


def _body(node, items, pad: str, out: list[str], cur: CommentCursor, print_item) -> None:
    """A block's items, then the comments left inside it, then its closing ``}`` (with a trailing comment)."""
    inner = pad + INDENT
    prev_end = getattr(node, "loc", None) and node.loc.line
    for item in items:
        _lead(item, prev_end, inner, out, cur)
        print_item(item)
        prev_end = _end(item)
    loc = getattr(node, "loc", None)
    line = pad + "}"
    if cur.active and loc is not None and loc.end_line is not None:
        for c in cur.before(loc.end_line):
            if cur.blank_above(c):
                _blank(out)
            out.append(inner + c.text)
        trail = cur.trailing(loc.end_line)
        if trail is not None:
            line += _TRAIL + trail.text
    out.append(line)


def _stmt(s: ir.Stmt, depth: int, out: list[str], cur: CommentCursor) -> None:
    pad = INDENT * depth
    if isinstance(s, ir.OpStmt):
        args = [print_operand(o) for o in s.operands] + _attrs(s.attrs)
        line = f"{pad}{_values(s.results, 'an op')} = {_ident(s.op)}({', '.join(args)})"
        if s.schedule:
            line += f" schedule({', '.join(_attrs(s.schedule))})"
        if s.types:
            line += " : " + ", ".join(print_type(t) for t in s.types)
        _one_line(s, line, pad, out, cur)
    elif isinstance(s, ir.ForStmt):
        if not s.carries:
            raise ValueError("cannot print a for loop without carried values")
        carries = ", ".join(f"{_value(c.name)} = {print_operand(c.init)}" for c in s.carries)
        head = (f"{pad}{_values(s.results, 'a for loop')} = for {_ident(s.var)} in "
                f"{print_expr(s.start)}..{print_expr(s.end)} carry({carries}) {{")
        _open(s, head, out, cur)
        _body(s, s.body, pad, out, cur, lambda b: _stmt(b, depth + 1, out, cur))
    elif isinstance(s, ir.YieldStmt):
        _one_line(s, f"{pad}yield {_values([v.name for v in s.values], 'yield')}", pad, out, cur)
    elif isinstance(s, ir.ReturnStmt):
        _one_line(s, f"{pad}return {_values([v.name for v in s.values], 'return')}", pad, out, cur)
    else:
        raise TypeError(f"not a statement: {s!r}")


def _layer_index(i: ir.LayerIndex | None) -> str:
    return "" if i is None else f"[{_ident(i.var)} < {print_expr(i.count)}]"


def print_decl(d: ir.Decl) -> list[str]:
    out: list[str] = []
    _decl(d, out, CommentCursor())
    return out


def _decl(d: ir.Decl, out: list[str], cur: CommentCursor) -> None:
    if isinstance(d, ir.ServeDecl):
        _open(d, "serve {", out, cur)
        _body(d, d.items, "", out, cur,
              lambda a: _one_line(a, f"{INDENT}{_ident(a.key)} = {print_expr(a.value)}", INDENT, out, cur))
    elif isinstance(d, ir.GraphDecl):
        params = ", ".join(f"{_value(p.name)}: {print_type(p.type)}" for p in d.params)
        results = ", ".join(print_type(t) for t in d.result_types)
        _open(d, f"graph {_ident(d.name)}({params}) -> ({results}) {{", out, cur)
        _body(d, d.body, "", out, cur, lambda s: _stmt(s, 1, out, cur))
    else:
        _one_line(d, _simple_decl(d), "", out, cur)


def _simple_decl(d: ir.Decl) -> str:
    if isinstance(d, ir.ModelDecl):
        return f"model {json.dumps(d.name)}"
    if isinstance(d, ir.ConstDecl):
        return f"const {_ident(d.name)} = {print_expr(d.value)}"
    if isinstance(d, ir.DimDecl):
        return f"dim {_ident(d.name)} <= {print_expr(d.bound)}"
    if isinstance(d, ir.WeightDecl):
        head = f"weight {_ident(d.name)}{_layer_index(d.index)}"
        shard = ""
        if d.shard is not None:
            sh = d.shard
            shard = (f" shard(axis={print_expr(sh.axis)}, parts={print_expr(sh.parts)}, "
                     f"index={print_expr(sh.index)})")
        return f"{head} : {print_type(d.type)} = {json.dumps(d.checkpoint)}{shard}"
    if isinstance(d, ir.StateDecl):
        return f"state {_ident(d.name)}{_layer_index(d.index)} : {print_type(d.type)}"
    raise TypeError(f"not a declaration: {d!r}")


def print_module(m: ir.Module, layout: Layout | None = None) -> str:
    """Canonical text: one declaration per line, a blank line between groups of different kinds.

    With ``layout`` (:func:`mpkir.comments.scan_layout` of the source ``m`` was parsed from) the comments
    are kept, above the declaration or statement they preceded or after the line they trailed, and so are
    the source's blank lines between declarations and statements (one for several).
    """
    cur = CommentCursor(layout)
    out: list[str] = []
    prev, prev_end = None, None
    for d in m.decls:
        kind = type(d)
        if out and (kind is not prev or isinstance(d, (ir.ServeDecl, ir.GraphDecl))):
            _blank(out)
        _lead(d, prev_end, "", out, cur)
        _decl(d, out, cur)
        prev, prev_end = kind, _end(d)
    for c in cur.before(None):
        if cur.blank_above(c):
            _blank(out)
        out.append(c.text)
    return "\n".join(_align_trailing(out)) + "\n"


def _align_trailing(lines: list[str]) -> list[str]:
    """Trailing comments of consecutive lines start in one column, two spaces after the longest code."""
    out: list[str] = []
    run: list[tuple[str, str]] = []

    def flush():
        width = max(len(code) for code, _ in run) if run else 0
        out.extend(f"{code.ljust(width)}  {comment}" for code, comment in run)
        run.clear()

    for line in lines:
        if _TRAIL in line:
            run.append(tuple(line.split(_TRAIL, 1)))
        else:
            flush()
            out.append(line)
    flush()
    return out
