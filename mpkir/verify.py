"""The verifier: name resolution, operator arity and attributes, shape/dtype inference, serve checks.

:func:`analyze` collects every problem as a located diagnostic (it never stops at the first) and
returns the types it inferred; :func:`verify` raises when there is any error.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, Span, part
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
        models = [x for x in m.decls if isinstance(x, ir.ModelDecl)]
        for extra in models[1:]:
            self.err("more than one 'model' declaration", extra.loc)
        serves = [x for x in m.decls if isinstance(x, ir.ServeDecl)]
        for extra in serves[1:]:
            self.err("more than one 'serve' block", extra.loc)
        cfg, d = serve_config(serves[0] if serves else None, env)
        self.diags.extend(d)
        self.cfg = cfg
        self.globals = self._globals()
        graphs: dict[str, GraphInfo] = {}
        self._graph_locs: dict[str, Span | None] = {}
        if not m.graphs:
            self.err("module has no graph: write graph NAME(%x: TYPE, ...) -> (TYPE, ...) { ... }",
                     Span(m.path, 1, 1))
        for g in m.graphs:
            if g.name in graphs:
                self.err(f"graph '{g.name}' is already defined", part(g.loc, "name"),
                         f"first defined at {self._graph_locs[g.name]}")
                continue
            self._graph_locs[g.name] = part(g.loc, "name")
            graphs[g.name] = self._graph(g)
        return Analysis(env, cfg, self.globals, graphs, _in_source_order(self.diags))

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
                self.err(f"{kind} '{d.name}' is already defined", part(d.loc, "name"),
                         f"first defined at {part(self.global_decls[d.name].loc, 'name')}")
                continue
            if d.name in names:
                self.err(f"{kind} '{d.name}' has the name of a constant or dim", part(d.loc, "name"))
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
                self.err(f"{kind} '{d.name}' has symbolic dim '{sym[0]}': {kind}s need fixed shapes",
                         d.type.loc)
            out[d.name] = t
            if isinstance(d, ir.WeightDecl):
                self._check_binding(d)
                if d.shard is not None:
                    self._check_shard(d, t)
        return out

    def _check_binding(self, d: ir.WeightDecl) -> None:
        placeholders = _PLACEHOLDER.findall(d.checkpoint)
        var = d.index.var if d.index else None
        loc = part(d.loc, "checkpoint")
        for p in dict.fromkeys(placeholders):
            if p != var:
                what = f"the layer index is '{var}'" if var else "the weight has no layer index"
                self.err(f"unbound name '{{{p}}}' in checkpoint name {_quote(d.checkpoint)}: {what}", loc)
        if var is not None and var not in placeholders:
            self.err(f"weight '{d.name}' is indexed by '{var}' but its checkpoint name "
                     f"{_quote(d.checkpoint)} does not contain '{{{var}}}': every layer would bind the same "
                     "tensor", loc)
        if not d.checkpoint:
            self.err(f"weight '{d.name}' is bound to an empty checkpoint name", loc)

    def _check_shard(self, d: ir.WeightDecl, t: ir.TensorType) -> None:
        """``shard(axis, parts, index)``: integers in range, and parts equal to the serve block's gpus."""
        sh = d.shard
        vals: dict[str, int] = {}
        for key in ("axis", "parts", "index"):
            e = getattr(sh, key)
            try:
                vals[key] = eval_int(e, self.env, f"shard {key} of '{d.name}'")
            except MpkError as err:
                self.diags.extend(err.diagnostics)
        if "axis" in vals and not 0 <= vals["axis"] < t.rank:
            self.err(f"shard axis {vals['axis']} of weight '{d.name}' is out of range for its type {t} "
                     f"(rank {t.rank})", sh.axis.loc or sh.loc)
        if "parts" in vals:
            parts = vals["parts"]
            if parts < 1:
                self.err(f"shard parts of weight '{d.name}' must be at least 1, got {parts}",
                         sh.parts.loc or sh.loc)
            elif parts != self.cfg.gpus:
                self.err(f"weight '{d.name}' is one of {parts} shards but the serve block has gpus = "
                         f"{self.cfg.gpus}", sh.parts.loc or sh.loc,
                         "a sharded module is one GPU's part of a serve { gpus = N } run: parts must be N")
            if "index" in vals and parts >= 1 and not 0 <= vals["index"] < parts:
                self.err(f"shard index {vals['index']} of weight '{d.name}' is out of range 0..{parts - 1}",
                         sh.index.loc or sh.loc)

    # ------------------------------------------------------------------ graphs
    def _graph(self, g: ir.GraphDecl) -> GraphInfo:
        info = GraphInfo()
        defined: dict[str, Span | None] = {}
        bad_params: set[str] = set()
        for p in g.params:
            if p.name in defined:
                self.err(f"parameter '%{p.name}' is already defined", part(p.loc, "result"),
                         f"first defined at {defined[p.name]}")
                continue
            defined[p.name] = part(p.loc, "result")
            try:
                info.types[p.name] = resolve_type(p.type, self.env)
            except MpkError as e:
                self.diags.extend(e.diagnostics)
                bad_params.add(p.name)
        try:
            want = [resolve_type(t, self.env) for t in g.result_types]
        except MpkError as e:
            self.diags.extend(e.diagnostics)
            want = None
        scope: dict[str, ir.TensorType | None] = dict(info.types)
        scope.update(dict.fromkeys(bad_params))  # typeless: uses report nothing more
        returned = self._block(g.body, info, scope, defined, self.env, in_loop=False)
        if returned is None:
            self.err(f"graph '{g.name}' does not end with 'return'", g.loc)
        elif want is not None:
            got, stmt = returned
            if len(got) != len(want):
                self.err(f"graph '{g.name}' returns {len(got)} value(s) but declares {len(want)}", stmt.loc)
            else:
                for i, (a, b) in enumerate(zip(got, want, strict=True)):
                    if a is not None and a != b:
                        self.err(f"graph '{g.name}' result {i} has type {a} but the signature says {b}",
                                 stmt.values[i].loc or stmt.loc)
        return info

    def _block(self, body, info: GraphInfo, scope: dict, defined: dict, env: Env, *, in_loop: bool):
        """Check statements; returns (types, statement) of the final return/yield, or None."""
        for i, s in enumerate(body):
            last = i == len(body) - 1
            if isinstance(s, (ir.ReturnStmt, ir.YieldStmt)):
                word = "return" if isinstance(s, ir.ReturnStmt) else "yield"
                if in_loop != isinstance(s, ir.YieldStmt):
                    where = "a loop body" if in_loop else "a graph body"
                    use = "yield" if in_loop else "return"
                    self.err(f"'{word}' cannot end {where} (use '{use}')", s.loc)
                if not last:
                    self.err(f"statements after '{word}' are unreachable", body[i + 1].loc)
                types = [self._use(v, scope) for v in s.values]
                return types, s
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
            notes = [f"first defined at {prev}"] if prev else []
            self.err(f"value '%{name}' is already defined", loc, *notes)
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
                idx = o.index
                if isinstance(idx, ir.Name) and idx.id in env.loop_vars and env.loop_vars[idx.id] is None:
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
            close = difflib.get_close_matches(s.op, list(OPS), n=3, cutoff=0.6)
            notes = [f"did you mean {' or '.join(repr(c) for c in close)}?"] if close else []
            self.err(f"unknown operator '{s.op}'", part(s.loc, "name"), *notes)
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
                    self.err(f"{len(annotated)} type(s) annotated for {len(s.results)} result(s)",
                             s.types[0].loc)
                else:
                    for i, (a, b) in enumerate(zip(annotated, results, strict=True)):
                        if b is not None and a != b:
                            self.err(f"'{s.op}' result '%{s.results[i]}' has type {b} but is annotated {a}",
                                     s.types[i].loc)
                    results = [r if r is not None else a for r, a in zip(results, annotated, strict=True)]
        for i, (name, t) in enumerate(zip(s.results, results, strict=True)):
            self._define(name, part(s.loc, "result", i), t, info, scope, defined)

    def _typed_op(self, s: ir.OpStmt, opdef: OpDef, in_types, info: GraphInfo, env: Env):
        n = len(s.operands)
        lo, hi = opdef.min_operands, opdef.max_operands
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else (f"{lo} to {hi}" if hi is not None else f"at least {lo}")
            loc = s.operands[hi].loc if hi is not None and n > hi else None
            self.err(f"'{s.op}' takes {want} operand(s) ({', '.join(opdef.operands)}), got {n}",
                     loc or part(s.loc, "name"))
            return None
        attrs: dict[str, Any] = {}
        given: set[str] = set()
        ok = True
        for a in s.attrs:
            spec = opdef.attr_spec(a.key)
            if spec is None:
                known = ", ".join(x.name for x in opdef.attrs)
                self.err(f"'{s.op}' has no attribute '{a.key}'", part(a.loc, "name"),
                         f"its attributes: {known}" if known else f"'{s.op}' takes no attributes")
                ok = False
                continue
            if a.key in given:
                self.err(f"attribute '{a.key}' given twice", part(a.loc, "name"))
                ok = False
                continue
            given.add(a.key)
            try:
                attrs[a.key] = resolve_attr(spec, a.value, env)
            except MpkError as e:
                self.diags.extend(e.diagnostics)
                ok = False
        for spec in opdef.attrs:
            if spec.name not in given:
                if spec.required:
                    self.err(f"'{s.op}' needs attribute '{spec.name}'", part(s.loc, "name"))
                    ok = False
                else:
                    attrs[spec.name] = spec.default
        info.attrs[id(s)] = attrs
        if not ok or any(t is None for t in in_types):
            return None
        try:
            out = opdef.infer(in_types, attrs)
        except ShapeError as e:
            loc = part(s.loc, "name")
            if e.operand is not None and 0 <= e.operand < len(s.operands):
                loc = s.operands[e.operand].loc or loc
            elif e.attr is not None:
                loc = next((a.value.loc for a in s.attrs if a.key == e.attr), loc)
            msg = str(e)
            msg = msg[len(s.op) + 2:] if msg.startswith(f"{s.op}: ") else msg
            self.err(f"'{s.op}': {msg}", loc)
            return None
        except Exception as e:
            types = ", ".join(str(t) for t in in_types)
            self.err(f"'{s.op}': operands {types} are not accepted (internal error in shape inference: "
                     f"{type(e).__name__}: {e})", part(s.loc, "name"))
            return None
        if len(out) != len(s.results):
            self.err(f"'{s.op}' produces {len(out)} result(s) but {len(s.results)} name(s) are bound",
                     part(s.loc, "result", 0))
            return None
        return list(out)

    def _for(self, s: ir.ForStmt, info: GraphInfo, scope: dict, defined: dict, env: Env) -> None:
        try:
            lo = eval_int(s.start, env, "loop start")
            hi = eval_int(s.end, env, "loop end")
            if hi <= lo:
                self.err(f"loop range {lo}..{hi} is empty", s.start.loc or s.loc)
        except MpkError as e:
            self.diags.extend(e.diagnostics)
            lo = hi = None
        if s.var in env.consts or s.var in env.dims or s.var in env.loop_vars:
            self.err(f"loop variable '{s.var}' shadows another name", part(s.loc, "name"))
        inner_env = env.with_loop_var(s.var, None)
        self._check_layer_refs(s.body, s.var, lo, hi)
        inner_scope = dict(scope)
        carry_types = []
        for c in s.carries:
            t = self._operand(c.init, scope, env)
            carry_types.append(t)
            self._define(c.name, part(c.loc, "result"), t, info, inner_scope, defined)
        ret = self._block(s.body, info, inner_scope, defined, inner_env, in_loop=True)
        if ret is None:
            self.err("loop body does not end with 'yield'", s.loc)
        else:
            got, stmt = ret
            if len(got) != len(s.carries):
                self.err(f"loop yields {len(got)} value(s) but carries {len(s.carries)}", stmt.loc)
            else:
                for i, (c, a, b) in enumerate(zip(s.carries, got, carry_types, strict=True)):
                    if a is not None and b is not None and a != b:
                        self.err(f"loop yields {a} for carried '%{c.name}' of type {b}",
                                 stmt.values[i].loc or stmt.loc)
        if len(s.results) != len(s.carries):
            self.err(f"loop binds {len(s.results)} result(s) but carries {len(s.carries)}",
                     part(s.loc, "result", 0))
        for i, r in enumerate(s.results):
            t = carry_types[i] if i < len(carry_types) else None
            self._define(r, part(s.loc, "result", i), t, info, scope, defined)

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
                        self.err(f"loop runs {var} over {lo}..{hi} but '@{o.name}' has {count} layer(s)",
                                 o.loc)


def _in_source_order(diags: list[Diagnostic]) -> list[Diagnostic]:
    """Located diagnostics by position (stable), unlocated ones last."""
    def key(d: Diagnostic):
        s = d.span
        return (0, s.file, s.line, s.col) if s is not None else (1, "", 0, 0)
    return sorted(diags, key=key)


def _quote(s: str) -> str:
    return json.dumps(s)


def analyze(m: ir.Module) -> Analysis:
    """Check a module; every problem found is in ``Analysis.diagnostics``."""
    return _Checker(m).run()


def verify(m: ir.Module, source: str | None = None) -> Analysis:
    """Check a module and raise :class:`MpkError` with every error found."""
    a = analyze(m)
    if not a.ok:
        raise MpkError(a.diagnostics, source)
    return a
