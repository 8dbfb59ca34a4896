"""Text → IR: the Lark LALR parser and the transformer that builds :mod:`mpkir.ir` nodes with spans.

Syntax errors become :class:`~mpkir.diagnostics.MpkError` with ``file:line:col`` and what was expected.
"""

from __future__ import annotations

import ast
import functools

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.lexer import PatternStr

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, Span
from mpkir.grammar import grammar_text

_TERMINAL_WORDS = {
    "NAME": "a name",
    "VALUE": "a value (%name)",
    "WEIGHT": "a weight or state (@name)",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "DTYPE": "a dtype (bf16, f16, f32, i32, i64, u8)",
    "$END": "end of file",
}


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


@functools.lru_cache(maxsize=1)
def _terminal_names() -> dict[str, str]:
    names = dict(_TERMINAL_WORDS)
    for t in _lark().terminals:
        if isinstance(t.pattern, PatternStr):
            names[t.name] = f"'{t.pattern.value}'"
    return names


def _describe_expected(expected: set[str]) -> str:
    words = sorted({_terminal_names().get(e, e) for e in expected})
    if len(words) > 8:
        words = [*words[:8], "..."]
    return ", ".join(words)


def _span(meta, path: str) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(path, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(tok: Token, path: str) -> Span:
    return Span(path, tok.line, tok.column, tok.end_line, tok.end_column)


class _Builder(Transformer):
    """Builds IR nodes from the parse tree."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _s(self, meta) -> Span | None:
        return _span(meta, self.path)

    # ---- expressions / attribute values
    @v_args(meta=True)
    def int(self, meta, c):
        return ir.Num(int(c[0]), self._s(meta))

    @v_args(meta=True)
    def float(self, meta, c):
        return ir.Num(float(c[0]), self._s(meta))

    @v_args(meta=True)
    def name(self, meta, c):
        return ir.Name(str(c[0]), self._s(meta))

    def _bin(op):  # noqa: N805 - helper building methods
        @v_args(meta=True)
        def f(self, meta, c):
            return ir.BinOp(op, c[0], c[1], self._s(meta))

        return f

    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")

    @v_args(meta=True)
    def neg(self, meta, c):
        if isinstance(c[0], ir.Num):  # `-3` is the literal -3, so folded negatives print back to themselves
            return ir.Num(-c[0].value, self._s(meta))
        return ir.Neg(c[0], self._s(meta))

    @v_args(meta=True)
    def string(self, meta, c):
        return ir.Str(ast.literal_eval(str(c[0])), self._s(meta))

    @v_args(meta=True)
    def true(self, meta, c):
        return ir.Bool(True, self._s(meta))

    @v_args(meta=True)
    def false(self, meta, c):
        return ir.Bool(False, self._s(meta))

    @v_args(meta=True)
    def list_value(self, meta, c):
        return ir.ListVal(tuple(x for x in c if x is not None), self._s(meta))

    # ---- types and operands
    @v_args(meta=True)
    def tensor_type(self, meta, c):
        dims = tuple(x for x in c[1:] if x is not None)
        return ir.TypeExpr(ir.DType(str(c[0])), dims, self._s(meta))

    @v_args(meta=True)
    def value_ref(self, meta, c):
        return ir.ValueRef(str(c[0])[1:], self._s(meta))

    @v_args(meta=True)
    def global_ref(self, meta, c):
        return ir.GlobalRef(str(c[0])[1:], c[1], self._s(meta))

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return ir.Attr(str(c[0]), c[1], self._s(meta))

    def schedule(self, c):
        return ("schedule", tuple(x for x in c if x is not None))

    def type_annot(self, c):
        return ("types", tuple(c))

    def results(self, c):
        return [(str(t)[1:], _tok_span(t, self.path)) for t in c]

    # ---- statements
    @v_args(meta=True)
    def op_stmt(self, meta, c):
        results, opname, *rest = c
        operands: list[ir.Operand] = []
        attrs: list[ir.Attr] = []
        schedule: tuple[ir.Attr, ...] = ()
        types: tuple[ir.TypeExpr, ...] = ()
        for x in rest:
            if x is None:
                continue
            if isinstance(x, tuple) and x and x[0] == "schedule":
                schedule = x[1]
            elif isinstance(x, tuple) and x and x[0] == "types":
                types = x[1]
            elif isinstance(x, ir.Attr):
                attrs.append(x)
            else:
                if attrs:
                    raise MpkError(Diagnostic(
                        "operand after keyword attribute: operands come first, then key=value attributes",
                        x.loc))
                operands.append(x)
        return ir.OpStmt(tuple(r for r, _ in results), str(opname), tuple(operands), tuple(attrs),
                         schedule, types, self._s(meta))

    @v_args(meta=True)
    def carry(self, meta, c):
        return ir.Carry(str(c[0])[1:], c[1], self._s(meta))

    def block(self, c):
        return tuple(c)

    @v_args(meta=True)
    def for_stmt(self, meta, c):
        results, var, start, end, *rest = c
        body = rest[-1]
        carries = tuple(rest[:-1])
        return ir.ForStmt(tuple(r for r, _ in results), str(var), start, end, carries, body, self._s(meta))

    @v_args(meta=True)
    def yield_stmt(self, meta, c):
        return ir.YieldStmt(tuple(ir.ValueRef(str(t)[1:], _tok_span(t, self.path)) for t in c), self._s(meta))

    @v_args(meta=True)
    def return_stmt(self, meta, c):
        return ir.ReturnStmt(tuple(ir.ValueRef(str(t)[1:], _tok_span(t, self.path)) for t in c), self._s(meta))

    # ---- declarations
    @v_args(meta=True)
    def model_decl(self, meta, c):
        return ir.ModelDecl(ast.literal_eval(str(c[0])), self._s(meta))

    @v_args(meta=True)
    def const_decl(self, meta, c):
        return ir.ConstDecl(str(c[0]), c[1], self._s(meta))

    @v_args(meta=True)
    def dim_decl(self, meta, c):
        return ir.DimDecl(str(c[0]), c[1], self._s(meta))

    @v_args(meta=True)
    def serve_decl(self, meta, c):
        return ir.ServeDecl(tuple(c), self._s(meta))

    @v_args(meta=True)
    def layer_index(self, meta, c):
        return ir.LayerIndex(str(c[0]), c[1], self._s(meta))

    @v_args(meta=True)
    def weight_decl(self, meta, c):
        return ir.WeightDecl(str(c[0]), c[1], c[2], ast.literal_eval(str(c[3])), self._s(meta))

    @v_args(meta=True)
    def state_decl(self, meta, c):
        return ir.StateDecl(str(c[0]), c[1], c[2], self._s(meta))

    @v_args(meta=True)
    def param(self, meta, c):
        return ir.Param(str(c[0])[1:], c[1], self._s(meta))

    @v_args(meta=True)
    def graph_decl(self, meta, c):
        name, *rest = c
        body = rest[-1]
        params = tuple(x for x in rest[:-1] if isinstance(x, ir.Param))
        results = tuple(x for x in rest[:-1] if isinstance(x, ir.TypeExpr))
        return ir.GraphDecl(str(name), params, results, body, self._s(meta))

    def start(self, c):
        return tuple(c)


def _syntax_error(e: UnexpectedInput, path: str, text: str) -> MpkError:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            found = "end of file"
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
        else:
            found = f"'{tok}'"
        expected = _describe_expected(set(e.accepts or e.expected))
        msg = f"syntax error: unexpected {found}; expected {expected}"
        end = (tok.end_column or col + 1) if tok.type != "$END" else col + 1
        return MpkError(Diagnostic(msg, Span(path, line, col, line, end)), text)
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream is not None and e.pos_in_stream < len(text) else "?"
        msg = f"syntax error: unexpected character '{ch}'"
        if e.allowed:
            msg += f"; expected {_describe_expected(set(e.allowed))}"
        return MpkError(Diagnostic(msg, Span(path, line, col, line, col + 1)), text)
    if isinstance(e, UnexpectedEOF):
        lines = text.splitlines() or [""]
        msg = f"syntax error: unexpected end of file; expected {_describe_expected(set(e.expected))}"
        return MpkError(Diagnostic(msg, Span(path, len(lines), len(lines[-1]) + 1)), text)
    return MpkError(Diagnostic(f"syntax error: {e}", Span(path, line, col)), text)


def parse(text: str, path: str = "<input>") -> ir.Module:
    """Parse .mpk source text into a :class:`~mpkir.ir.Module` (raises :class:`MpkError`)."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, path, text) from None
    try:
        decls = _Builder(path).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, MpkError):
            e.orig_exc.source = text
            raise e.orig_exc from None
        raise
    return ir.Module(decls, path)


def parse_file(path: str) -> tuple[ir.Module, str]:
    """Read and parse a file; returns the module and its source text (for rendering diagnostics)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MpkError(Diagnostic(f"cannot read {path}: {e.strerror}")) from None
    except UnicodeDecodeError:
        raise MpkError(Diagnostic(f"{path} is not UTF-8 text")) from None
    return parse(text, path), text
