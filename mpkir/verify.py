"""The verifier: name resolution, operator arity and attributes, shape/dtype inference, serve checks.

:func:`analyze` collects every problem as a located diagnostic (it never stops at the first) and
returns the types it inferred; :func:`verify` raises when there is any error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, Span
from mpkir.ops.base import OpDef, ShapeError
from mpkir.ops.registry import OPS
from mpkir.semantics import Env, build_env, eval_int, resolve_attr, resolve_type
from mpkir.serve import ServeConfig, serve_config

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass
class GraphInfo:
    """What the verifier learned about one graph: the type of every SSA value."""

    types: dict[str, ir.TensorType] = field(default_factory=dict)
    attrs: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(OpStmt) -> resolved attributes


@dataclass
class Analysis:
    """The result of :func:`analyze`."""

    env: Env
    serve: ServeConfig
    globals: dict[str, ir.TensorType]
    graphs: dict[str, GraphInfo]
    diagnostics: list[Diagnostic]

    @property
    def ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


class _Checker:
    def __init__(self, m: ir.Module):
        self.m = m
        self.diags: list[Diagnostic] = []

    def err(self, msg: str, loc: Span | None, *notes: str) -> None:
        self.diags.append(Diagnostic(msg, loc, notes=tuple(notes)))

    def run(self) -> Analysis:
        m = self.m
        env, d = build_env(m)
        self.diags.extend(d)
        self.env = env
        if len([x for x in m.decls if isinstance(x, ir.ModelDecl)]) > 1:
            self.err("more than one 'model' declaration", m.decls[1].loc)
        serves = [x for x in m.decls if isinstance(x, ir.ServeDecl)]
        for extra in serves[1:]:
            self.err("more than one 'serve' block", extra.loc)
        cfg, d = serve_config(serves[0] if serves else None, env)
        self.diags.extend(d)
        self.globals = self._globals()
        graphs: dict[str, GraphInfo] = {}
        if not m.graphs:
            self.err("module has no graph", None)
        for g in m.graphs:
            if g.name in graphs:
                self.err(f"graph '{g.name}' is already defined", g.loc)
                continue
            graphs[g.name] = self._graph(g)
        return Analysis(env, cfg, self.globals, graphs, self.diags)

    # ------------------------------------------------------------------ weights and states
    def _globals(self) -> dict[str, ir.TensorType]:
        out: dict[str, ir.TensorType] = {}
        self.global_decls: dict[str, ir.WeightDecl | ir.StateDecl] = {}
        self.global_counts: dict[str, int | None] = {}
        names = set(self.env.consts) | set(self.env.dims)
        for d in self.m.decls:
            if not isinstance(d, (ir.WeightDecl, ir.StateDecl)):
                continue
            kind = "weight" if isinstance(d, ir.WeightDecl) else "state"
            if d.name in self.global_decls:
                self.err(f"{kind} '{d.name}' is already defined", d.loc,
                         f"first defined at {self.global_decls[d.name].loc}")
                continue
            if d.name in names:
                self.err(f"{kind} '{d.name}' has the name of a constant or dim", d.loc)
            self.global_decls[d.name] = d
            count: int | None = None
            if d.index is not None:
                try:
                    count = eval_int(d.index.count, self.env, f"layer count of '{d.name}'")
                    if count < 1:
                        self.err(f"layer count of '{d.name}' must be at least 1, got {count}", d.index.loc)
                except MpkError as e:
                    self.diags.extend(e.diagnostics)
            self.global_counts[d.name] = count
            try:
                t = resolve_type(d.type, self.env)
            except MpkError as e:
                self.diags.extend(e.diagnostics)
                continue
            sym = [x for x in t.shape if isinstance(x, str)]
            if sym:
                self.err(f"{kind} '{d.name}' has symbolic dim '{sym[0]}': {kind}s need fixed shapes", d.type.loc)
            out[d.name] = t
            if isinstance(d, ir.WeightDecl):
                self._check_binding(d)
        return out

    def _check_binding(self, d: ir.WeightDecl) -> None:
        placeholders = _PLACEHOLDER.findall(d.checkpoint)
        var = d.index.var if d.index else None
        for p in placeholders:
            if p != var:
                what = f"the layer index is '{var}'" if var else "the weight has no layer index"
                self.err(f"unbound name '{{{p}}}' in checkpoint name \"{d.checkpoint}\": {what}", d.loc)
        if var is not None and var not in placeholders:
            self.err(f"weight '{d.name}' is indexed by '{var}' but its checkpoint name \"{d.checkpoint}\" "
                     f"does not contain '{{{var}}}': every layer would bind the same tensor", d.loc)
        if not d.checkpoint:
            self.err(f"weight '{d.name}' is bound to an empty checkpoint name", d.loc)

    # ------------------------------------------------------------------ graphs
    def _graph(self, g: ir.GraphDecl) -> GraphInfo:
        info = GraphInfo()
        defined: dict[str, Span | None] = {}
        for p in g.params:
            if p.name in defined:
                self.err(f"parameter '%{p.name}' is already defined", p.loc)
                continue
            defined[p.name] = p.loc
            try:
                info.types[p.name] = resolve_type(p.type, self.env)
            except MpkError as e:
                self.diags.extend(e.diagnostics)
        try:
            want = [resolve_type(t, self.env) for t in g.result_types]
        except MpkError as e:
            self.diags.extend(e.diagnostics)
            want = None
        scope = dict(info.types)
        returned = self._block(g.body, info, scope, defined, self.env, in_loop=False)
        if returned is None:
            self.err(f"graph '{g.name}' does not end with 'return'", g.loc)
        elif want is not None:
            got, loc = returned
            if len(got) != len(want):
                self.err(f"graph '{g.name}' returns {len(got)} value(s) but declares {len(want)}", loc)
            else:
                for i, (a, b) in enumerate(zip(got, want)):
                    if a is not None and a != b:
                        self.err(f"graph '{g.name}' result {i} has type {a} but the signature says {b}", loc)
        return info

    def _block(self, body, info: GraphInfo, scope: dict, defined: dict, env: Env, *, in_loop: bool):
        """Check statements; returns (types, loc) of the final return/yield, or None."""
        for i, s in enumerate(body):
            last = i == len(body) - 1
            if isinstance(s, (ir.ReturnStmt, ir.YieldStmt)):
                word = "return" if isinstance(s, ir.ReturnStmt) else "yield"
                if in_loop != isinstance(s, ir.YieldStmt):
                    where = "a loop body" if in_loop else "a graph body"
                    self.err(f"'{word}' cannot end {where}" + (" (use 'yield')" if in_loop else " (use 'return')"),
                             s.loc)
                if not last:
                    self.err(f"statements after '{word}' are unreachable", body[i + 1].loc)
                types = [self._use(v, scope) for v in s.values]
                return types, s.loc
            if isinstance(s, ir.OpStmt):
                self._op(s, info, scope, defined, env)
            elif isinstance(s, ir.ForStmt):
                self._for(s, info, scope, defined, env)
        return None

    def _use(self, v: ir.ValueRef, scope: dict) -> ir.TensorType | None:
        if v.name not in scope:
            self.err(f"undefined value '%{v.name}'", v.loc)
            return None
        return scope[v.name]

    def _define(self, name: str, loc: Span | None, t: ir.TensorType | None, info: GraphInfo, scope: dict,
                defined: dict) -> None:
        if name in defined:
            prev = defined[name]
            self.err(f"value '%{name}' is already defined", loc, *([f"first defined at {prev}"] if prev else []))
            return
        defined[name] = loc
        scope[name] = t
        if t is not None:
            info.types[name] = t

    def _operand(self, o: ir.Operand, scope: dict, env: Env) -> ir.TensorType | None:
        if isinstance(o, ir.ValueRef):
            return self._use(o, scope)
        d = self.global_decls.get(o.name)
        if d is None:
            self.err(f"undefined weight or state '@{o.name}'", o.loc)
            return None
        count = self.global_counts.get(o.name)
        if d.index is None and o.index is not None:
            self.err(f"'@{o.name}' has no layer index but is indexed here", o.loc)
        elif d.index is not None and o.index is None:
            self.err(f"'@{o.name}' is one tensor per layer: write @{o.name}[{d.index.var}]", o.loc)
        elif o.index is not None:
            try:
                if isinstance(o.index, ir.Name) and o.index.id in env.loop_vars and env.loop_vars[o.index.id] is None:
                    pass  # a loop variable: checked against the loop bounds by _for
                else:
                    k = eval_int(o.index, env, f"index of '@{o.name}'")
                    if count is not None and not 0 <= k < count:
                        self.err(f"index {k} of '@{o.name}' is out of range 0..{count - 1}", o.index.loc)
            except MpkError as e:
                self.diags.extend(e.diagnostics)
        return self.globals.get(o.name)

    def _op(self, s: ir.OpStmt, info: GraphInfo, scope: dict, defined: dict, env: Env) -> None:
        opdef: OpDef | None = OPS.get(s.op)
        in_types = [self._operand(o, scope, env) for o in s.operands]
        results: list[ir.TensorType | None] = [None] * len(s.results)
        if opdef is None:
            close = [n for n in OPS if n.startswith(s.op[:3])][:3]
            self.err(f"unknown operator '{s.op}'", s.loc, *([f"did you mean {', '.join(close)}?"] if close else []))
        else:
            results = self._typed_op(s, opdef, in_types, info, env) or results
        if s.types:
            try:
                annotated = [resolve_type(t, env) for t in s.types]
            except MpkError as e:
                self.diags.extend(e.diagnostics)
                annotated = None
            if annotated is not None:
                if len(annotated) != len(s.results):
                    self.err(f"{len(annotated)} type(s) annotated for {len(s.results)} result(s)", s.types[0].loc)
                else:
                    for i, (a, b) in enumerate(zip(annotated, results)):
                        if b is not None and a != b:
                            self.err(f"'{s.op}' result '%{s.results[i]}' has type {b} but is annotated {a}",
                                     s.types[i].loc)
                    results = [r if r is not None else a for r, a in zip(results, annotated)]
        for name, t in zip(s.results, results):
            self._define(name, s.loc, t, info, scope, defined)

    def _typed_op(self, s: ir.OpStmt, opdef: OpDef, in_types, info: GraphInfo, env: Env):
        n = len(s.operands)
        lo, hi = opdef.min_operands, opdef.max_operands
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else (f"{lo} to {hi}" if hi is not None else f"at least {lo}")
            self.err(f"'{s.op}' takes {want} operand(s) ({', '.join(opdef.operands)}), got {n}", s.loc)
            return None
        attrs: dict[str, Any] = {}
        ok = True
        for a in s.attrs:
            spec = opdef.attr_spec(a.key)
            if spec is None:
                known = ", ".join(x.name for x in opdef.attrs) or "none"
                self.err(f"'{s.op}' has no attribute '{a.key}'", a.loc, f"its attributes: {known}")
                ok = False
                continue
            if a.key in attrs:
                self.err(f"attribute '{a.key}' given twice", a.loc)
                ok = False
                continue
            try:
                attrs[a.key] = resolve_attr(spec, a.value, env)
            except MpkError as e:
                self.diags.extend(e.diagnostics)
                ok = False
        for spec in opdef.attrs:
            if spec.name not in attrs:
                if spec.required:
                    self.err(f"'{s.op}' needs attribute '{spec.name}'", s.loc)
                    ok = False
                else:
                    attrs[spec.name] = spec.default
        info.attrs[id(s)] = attrs
        if not ok or any(t is None for t in in_types):
            return None
        try:
            out = opdef.infer(in_types, attrs)
        except ShapeError as e:
            loc = s.loc
            if e.operand is not None and e.operand < len(s.operands):
                loc = s.operands[e.operand].loc or s.loc
            elif e.attr is not None:
                loc = next((a.loc for a in s.attrs if a.key == e.attr), s.loc)
            self.err(f"'{s.op}': {e}", loc)
            return None
        if len(out) != len(s.results):
            self.err(f"'{s.op}' produces {len(out)} result(s) but {len(s.results)} name(s) are bound", s.loc)
            return None
        return list(out)

    def _for(self, s: ir.ForStmt, info: GraphInfo, scope: dict, defined: dict, env: Env) -> None:
        try:
            lo = eval_int(s.start, env, "loop start")
            hi = eval_int(s.end, env, "loop end")
            if hi <= lo:
                self.err(f"loop range {lo}..{hi} is empty", s.loc)
        except MpkError as e:
            self.diags.extend(e.diagnostics)
            lo = hi = None
        if s.var in env.consts or s.var in env.dims or s.var in env.loop_vars:
            self.err(f"loop variable '{s.var}' shadows another name", s.loc)
        inner_env = env.with_loop_var(s.var, None)
        self._check_layer_refs(s.body, s.var, lo, hi)
        inner_scope = dict(scope)
        carry_types = []
        for c in s.carries:
            t = self._operand(c.init, scope, env)
            carry_types.append(t)
            self._define(c.name, c.loc, t, info, inner_scope, defined)
        ret = self._block(s.body, info, inner_scope, defined, inner_env, in_loop=True)
        if ret is None:
            self.err("loop body does not end with 'yield'", s.loc)
        else:
            got, loc = ret
            if len(got) != len(s.carries):
                self.err(f"loop yields {len(got)} value(s) but carries {len(s.carries)}", loc)
            else:
                for c, a, b in zip(s.carries, got, carry_types):
                    if a is not None and b is not None and a != b:
                        self.err(f"loop yields {a} for carried '%{c.name}' of type {b}", loc)
        if len(s.results) != len(s.carries):
            self.err(f"loop binds {len(s.results)} result(s) but carries {len(s.carries)}", s.loc)
        for i, r in enumerate(s.results):
            self._define(r, s.loc, carry_types[i] if i < len(carry_types) else None, info, scope, defined)

    def _check_layer_refs(self, body, var: str, lo: int | None, hi: int | None) -> None:
        """@w[var] inside the loop must stay within the layer count of w."""
        if lo is None or hi is None:
            return
        for s in body:
            if isinstance(s, ir.OpStmt):
                ops = s.operands
            elif isinstance(s, ir.ForStmt):
                ops = tuple(c.init for c in s.carries)
                self._check_layer_refs(s.body, var, lo, hi)
            else:
                continue
            for o in ops:
                if isinstance(o, ir.GlobalRef) and isinstance(o.index, ir.Name) and o.index.id == var:
                    count = self.global_counts.get(o.name)
                    if count is not None and (lo < 0 or hi > count):
                        self.err(f"loop runs {var} over {lo}..{hi} but '@{o.name}' has {count} layer(s)", o.loc)


def analyze(m: ir.Module) -> Analysis:
    """Check a module; every problem found is in ``Analysis.diagnostics``."""
    return _Checker(m).run()


def verify(m: ir.Module, source: str | None = None) -> Analysis:
    """Check a module and raise :class:`MpkError` with every error found."""
    a = analyze(m)
    if not a.ok:
        raise MpkError(a.diagnostics, source)
    return a
