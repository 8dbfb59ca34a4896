"""Text → IR: the Lark LALR parser and the transformer that builds :mod:`mpkir.ir` nodes with spans.

Syntax errors become :class:`~mpkir.diagnostics.MpkError` located at the offending token, with what was
expected in words (common mistakes are recognised by :data:`_EXAMPLES` through Lark's ``match_examples``).
"""

from __future__ import annotations

import functools
import json
import math

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.lexer import PatternStr

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, NodeSpan, Span, part, source_lines
from mpkir.grammar import grammar_text
from mpkir.printer import KEYWORDS

_TERMINAL_WORDS = {
    "NAME": "a name",
    "VALUE": "a value (%name)",
    "WEIGHT": "a weight or state (@name)",
    "INT": "a number",
    "FLOAT": "a number",
    "STRING": "a string",
    "DTYPE": "a dtype (bf16, f16, f32, i32, i64, u8)",
    "$END": "end of file",
}
_ARITH = {"PLUS", "MINUS", "STAR", "SLASH"}
_ARG_START = {"VALUE", "WEIGHT", "NAME"}
_DECL_KEYWORDS = {"MODEL", "CONST", "DIM", "SERVE", "__ANON_1", "STATE", "GRAPH"}
_MAX_INT = 2**63 - 1
_SHARD_KEYS = ("axis", "parts", "index")

_EQ_LABEL = "expected '='"
# Common mistakes, recognised by the parser state they fail in (lark ``match_examples``).
_EXAMPLES: dict[str, list[str]] = {
    "missing '=' in a constant declaration (const NAME = VALUE)": ["const x 3", "const x 3.5", "const x y"],
    "missing '=' after the result names (%r = op(...))": [
        "graph g() -> () { %a add(%x) }", "graph g() -> () { %a, %b split(%x) }"],
    "missing '=' in a weight declaration (weight NAME : TYPE = \"checkpoint.name\")": [
        'weight w : f32[2] "w"'],
    "missing ':' before the type": ["weight w f32[2]", "state s f32[2]", "graph g(%x f32[2])"],
    "missing '<=' in a dim declaration (dim NAME <= BOUND)": ["dim B 8", "dim B = 8", "dim B < 8"],
    _EQ_LABEL + ": attributes and settings are written key=value; operands are %values or @weights": [
        "graph g() -> () { %a = add(x, %y) }", "graph g() -> () { %a = add(x) }",
        "graph g() -> () { %a = add(%x, y) }", "graph g() -> () { %a = add(%x, y, %z) }"],
    "missing ',' between arguments": ["graph g() -> () { %a = add(%x %y) }",
                                      "graph g() -> () { %a = add(%x, k=1 j=2) }"],
    "statements must start with a result (%name = ...), 'return' or 'yield'": [
        "graph g() -> () { add(%x) }", "graph g() -> () { x = add(%x) }"],
    "a graph needs a result list: -> (TYPE, ...)": ["graph g(%x: f32[2]) {", "graph g() {"],
    "a tensor type needs a shape in brackets, e.g. f32[4, n]": [
        "graph g(%x: f32) -> () {}", "weight w : f32 = \"w\""],
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
    """Expected terminals in words: names and values first, arithmetic collapsed, at most six items."""
    expected = {e for e in expected if not e.startswith("__IGNORE")}
    words: list[str] = []
    if {"CONST", "DIM", "GRAPH"} <= expected:
        expected -= _DECL_KEYWORDS
        words.append("a declaration (model, const, dim, serve, weight, state or graph)")
    if len(expected & _ARITH) > 1:
        expected -= _ARITH
        words.append("an operator (+ - * /)")
    names = _terminal_names()
    plain = sorted({names.get(e, e) for e in expected if e in _TERMINAL_WORDS})
    punct = sorted({names.get(e, e) for e in expected if e not in _TERMINAL_WORDS})
    words = plain + punct + words
    if len(words) > 6:
        return "one of " + ", ".join(words[:6]) + ", ..."
    if len(words) > 1:
        return ", ".join(words[:-1]) + " or " + words[-1]
    return words[0] if words else "nothing"


def _end_position(text: str) -> tuple[int, int]:
    """Line and column just after the last non-blank character (where 'end of file' is reported)."""
    body = text.rstrip()
    lines = source_lines(body) if body else [""]
    return len(lines), len(lines[-1]) + 1


def _unclosed(text: str, path: str) -> MpkError | None:
    """At an unexpected end of file: the innermost bracket that was never closed, if any."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    stack: list[Token] = []
    try:
        for tok in _lark().lex(text):
            if tok in pairs:
                stack.append(tok)
            elif tok in pairs.values() and stack and pairs[stack[-1]] == tok:
                stack.pop()
    except Exception:
        return None
    if not stack:
        return None
    tok = stack[-1]
    msg = f"syntax error: '{tok}' is never closed: expected '{pairs[tok]}' before the end of file"
    return MpkError(Diagnostic(msg, _tok_span(tok, path)), text)


@functools.lru_cache(maxsize=1)
def _example_states() -> dict[tuple[int, frozenset[str]], str]:
    """LALR state of each example in :data:`_EXAMPLES` -> its label (like lark's ``match_examples``, but
    keyed on the parser state and the accepted terminals, not on how deep the stack is)."""
    table: dict[tuple[int, frozenset[str]], str] = {}
    for label, examples in _EXAMPLES.items():
        for text in examples:
            try:
                _lark().parse(text)
            except UnexpectedToken as e:
                table.setdefault((e.state.position, frozenset(e.accepts or e.expected)), label)
            except UnexpectedInput:
                pass
    return table


def _match_example(e: UnexpectedToken) -> str | None:
    state = getattr(e, "state", None)
    if state is None:
        return None
    label = _example_states().get((state.position, frozenset(e.accepts or e.expected)))
    if label is not None and label.startswith("missing ','") and e.token.type not in _ARG_START:
        return None  # e.g. a missing ')': the generic message says what was expected
    return label


def _printable(ch: str) -> str:
    return ch if ch.isprintable() else ascii(ch)[1:-1]


def _syntax_error(e: UnexpectedInput, path: str, text: str) -> MpkError:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if line < 1 or col < 1:
        line, col = 1, 1
    if isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream if e.pos_in_stream is not None else 0
        ch = text[pos] if pos < len(text) else ""
        if ch == '"':
            msg = "syntax error: unterminated string (strings end on the same line with '\"')"
        elif ch in "%@":
            kind = "value" if ch == "%" else "weight or state"
            msg = f"syntax error: '{ch}' must be followed by the name of a {kind}"
        elif ch == "." and e.allowed and "__ANON_3" in e.allowed:
            msg = "syntax error: a loop range is written start..end"
        else:
            msg = f"syntax error: unexpected character '{_printable(ch)}'"
        return MpkError(Diagnostic(msg, Span(path, line, col, line, col + 1)), text)
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        unclosed = _unclosed(text, path)
        if unclosed is not None:
            return unclosed
        line, col = _end_position(text)
        expected = e.expected if isinstance(e, UnexpectedEOF) else (e.accepts or e.expected)
        msg = f"syntax error: unexpected end of file; expected {_describe_expected(set(expected))}"
        return MpkError(Diagnostic(msg, Span(path, line, col, line, col + 1)), text)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        span = Span(path, line, col, tok.end_line or line, tok.end_column or col + 1)
        label = _match_example(e)
        if label is not None and label.startswith(_EQ_LABEL) and e.token_history:
            prev = e.token_history[-1]
            if prev.type == "NAME":  # point at the bare name, not at what follows it
                span = _tok_span(prev, path)
                msg = f"syntax error: expected '=' after '{prev}'{label[len(_EQ_LABEL):]}"
                return MpkError(Diagnostic(msg, span), text)
        found = f"'{tok}'"
        expected = _describe_expected(set(e.accepts or e.expected))
        msg = f"syntax error: unexpected {found}; expected {expected}"
        notes = (label,) if label is not None else ()
        if label is not None:
            msg = f"syntax error: unexpected {found}: {label}"
            notes = (f"expected {expected}",)
        return MpkError(Diagnostic(msg, span, notes=notes), text)
    return MpkError(Diagnostic(f"syntax error: {e}", Span(path, line, col)), text)


def _span(meta, path: str, parts: tuple[tuple[str, Span], ...] = ()) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    if parts:
        return NodeSpan(path, meta.line, meta.column, meta.end_line, meta.end_column, parts)
    return Span(path, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(tok: Token, path: str) -> Span:
    return Span(path, tok.line, tok.column, tok.end_line, tok.end_column)


def decode_string(raw: str, loc: Span | None) -> str:
    """A string literal's value; escapes are JSON's (the printer writes strings with ``json.dumps``)."""
    try:
        return json.loads(raw, strict=False)
    except json.JSONDecodeError as e:
        where = loc
        if loc is not None and loc.line == loc.end_line:
            where = Span(loc.file, loc.line, loc.col + e.pos, loc.line, loc.col + e.pos + 2)
        msg = "invalid escape in string: use \\\" \\\\ \\/ \\b \\f \\n \\r \\t or \\uXXXX"
        raise MpkError(Diagnostic(msg, where)) from None


class _Builder(Transformer):
    """Builds IR nodes from the parse tree."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _s(self, meta, *parts: tuple[str, Span]) -> Span | None:
        return _span(meta, self.path, tuple(parts))

    def _t(self, tok: Token) -> Span:
        return _tok_span(tok, self.path)

    def _n(self, tok: Token) -> str:
        """A NAME token as an identifier: keywords are reserved (the printer could not write them back)."""
        if str(tok) in KEYWORDS:
            raise MpkError(Diagnostic(f"'{tok}' is a keyword and cannot be used as a name", self._t(tok)))
        return str(tok)

    # ---- expressions / attribute values
    @v_args(meta=True)
    def int(self, meta, c):
        text = str(c[0])
        if len(text.lstrip("0")) > 19 or int(text) > _MAX_INT:
            raise MpkError(Diagnostic(f"integer {text[:20]}{'...' if len(text) > 20 else ''} is too large "
                                      f"(at most {_MAX_INT})", self._s(meta)))
        return ir.Num(int(text), self._s(meta))

    @v_args(meta=True)
    def float(self, meta, c):
        v = float(c[0])
        if not math.isfinite(v):
            raise MpkError(Diagnostic(f"number {c[0]} is out of range", self._s(meta)))
        return ir.Num(v, self._s(meta))

    @v_args(meta=True)
    def name(self, meta, c):
        return ir.Name(self._n(c[0]), self._s(meta))

    def _bin(op):
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
        x = c[0]
        # `-3` is the literal -3 (so negative numbers print back to themselves); `-(3)` stays a Neg
        if isinstance(x, ir.Num) and x.loc is not None and (x.loc.end_line, x.loc.end_col) == (
                meta.end_line, meta.end_column):
            return ir.Num(-x.value, self._s(meta))
        return ir.Neg(x, self._s(meta))

    @v_args(meta=True)
    def string(self, meta, c):
        return ir.Str(decode_string(str(c[0]), self._s(meta)), self._s(meta))

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
        return ir.GlobalRef(str(c[0])[1:], c[1], self._s(meta, ("name", self._t(c[0]))))

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return ir.Attr(self._n(c[0]), c[1], self._s(meta, ("name", self._t(c[0]))))

    def schedule(self, c):
        return ("schedule", tuple(x for x in c if x is not None))

    def type_annot(self, c):
        return ("types", tuple(c))

    def results(self, c):
        return [(str(t)[1:], self._t(t)) for t in c]

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
        loc = self._s(meta, ("name", self._t(opname)), *(("result", s) for _, s in results))
        return ir.OpStmt(tuple(r for r, _ in results), self._n(opname), tuple(operands), tuple(attrs),
                         schedule, types, loc)

    @v_args(meta=True)
    def carry(self, meta, c):
        return ir.Carry(str(c[0])[1:], c[1], self._s(meta, ("result", self._t(c[0]))))

    def block(self, c):
        return tuple(c)

    @v_args(meta=True)
    def for_stmt(self, meta, c):
        results, var, start, end, *rest = c
        body = rest[-1]
        carries = tuple(rest[:-1])
        loc = self._s(meta, ("name", self._t(var)), *(("result", s) for _, s in results))
        return ir.ForStmt(tuple(r for r, _ in results), self._n(var), start, end, carries, body, loc)

    @v_args(meta=True)
    def yield_stmt(self, meta, c):
        return ir.YieldStmt(tuple(ir.ValueRef(str(t)[1:], self._t(t)) for t in c), self._s(meta))

    @v_args(meta=True)
    def return_stmt(self, meta, c):
        return ir.ReturnStmt(tuple(ir.ValueRef(str(t)[1:], self._t(t)) for t in c), self._s(meta))

    # ---- declarations
    @v_args(meta=True)
    def model_decl(self, meta, c):
        return ir.ModelDecl(decode_string(str(c[0]), self._t(c[0])), self._s(meta))

    @v_args(meta=True)
    def const_decl(self, meta, c):
        return ir.ConstDecl(self._n(c[0]), c[1], self._s(meta, ("name", self._t(c[0]))))

    @v_args(meta=True)
    def dim_decl(self, meta, c):
        return ir.DimDecl(self._n(c[0]), c[1], self._s(meta, ("name", self._t(c[0]))))

    @v_args(meta=True)
    def serve_decl(self, meta, c):
        return ir.ServeDecl(tuple(c), self._s(meta))

    @v_args(meta=True)
    def layer_index(self, meta, c):
        return ir.LayerIndex(self._n(c[0]), c[1], self._s(meta, ("name", self._t(c[0]))))

    @v_args(meta=True)
    def shard_spec(self, meta, c):
        loc = self._s(meta)
        got: dict[str, ir.Expr] = {}
        for a in (x for x in c if x is not None):
            if a.key not in _SHARD_KEYS:
                known = ", ".join(_SHARD_KEYS)
                raise MpkError(Diagnostic(f"unknown shard setting '{a.key}' (known: {known})",
                                          part(a.loc, "name")))
            if a.key in got:
                raise MpkError(Diagnostic(f"shard setting '{a.key}' given twice", part(a.loc, "name")))
            if not isinstance(a.value, (ir.Num, ir.Name, ir.BinOp, ir.Neg)):
                raise MpkError(Diagnostic(f"shard setting '{a.key}' must be an integer expression",
                                          a.value.loc))
            got[a.key] = a.value
        missing = [k for k in _SHARD_KEYS if k not in got]
        if missing:
            raise MpkError(Diagnostic(f"shard(...) needs {', '.join(missing)} (write shard(axis=A, parts=P, "
                                      "index=I))", loc))
        return ir.Shard(got["axis"], got["parts"], got["index"], loc)

    @v_args(meta=True)
    def weight_decl(self, meta, c):
        ckpt = c[3]
        loc = self._s(meta, ("name", self._t(c[0])), ("checkpoint", self._t(ckpt)))
        return ir.WeightDecl(self._n(c[0]), c[1], c[2], decode_string(str(ckpt), self._t(ckpt)), loc,
                             shard=c[4])

    @v_args(meta=True)
    def state_decl(self, meta, c):
        return ir.StateDecl(self._n(c[0]), c[1], c[2], self._s(meta, ("name", self._t(c[0]))))

    @v_args(meta=True)
    def param(self, meta, c):
        return ir.Param(str(c[0])[1:], c[1], self._s(meta, ("result", self._t(c[0]))))

    @v_args(meta=True)
    def graph_decl(self, meta, c):
        name, *rest = c
        body = rest[-1]
        params = tuple(x for x in rest[:-1] if isinstance(x, ir.Param))
        results = tuple(x for x in rest[:-1] if isinstance(x, ir.TypeExpr))
        return ir.GraphDecl(self._n(name), params, results, body, self._s(meta, ("name", self._t(name))))

    def start(self, c):
        return tuple(c)


MAX_DEPTH = 200
"""Deepest nesting of expressions and blocks the parser accepts (everything after it recurses)."""


def _check_depth(tree: Tree, path: str, text: str) -> None:
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            meta = node.meta
            empty = getattr(meta, "empty", True)
            span = Span(path, 1, 1) if empty else Span(path, meta.line, meta.column)
            raise MpkError(Diagnostic(f"nested too deeply (more than {MAX_DEPTH} levels)", span), text)
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))


def parse(text: str, path: str = "<input>") -> ir.Module:
    """Parse .mpk source text into a :class:`~mpkir.ir.Module` (raises :class:`MpkError`)."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, path, text) from None
    _check_depth(tree, path, text)
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
