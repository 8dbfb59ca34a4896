"""The ``shard`` pass: a ``serve { gpus = N }`` module → the module of one tensor-parallel rank.

Pure: ``Shard(rank=r).run(module)`` returns rank r's module; every rank's module has the same structure
(only weight slices and the argmax offset differ).  Each SSA value gets a layout: *replicated* (every rank
holds all of it) or *split* along one axis (rank r holds the r-th of N equal contiguous blocks):

* ``linear`` of a replicated input is **column-parallel** when N divides its output features: the weight
  (and bias) takes rows ``[r·n/N, (r+1)·n/N)`` and the result is split along its last axis (Q/K/V,
  gate/up, and the vocabulary-parallel lm_head);
* ``linear`` of an input split along its last (reduction) axis is **row-parallel**: the weight takes
  columns, the rank's partial sum ``%y_part`` is followed by ``%y = allreduce(%y_part)``;
* ``reshape`` carries a split to the output dim it becomes (``[B, q_dim]`` → heads); N must divide that
  dim (heads, and the KV heads of GQA), else a located error names the numbers;
* elementwise ops, norms over an unsplit axis, ``rope``/``head_rmsnorm`` over split heads, ``attention``
  and ``paged_attention`` with Q/K/V split by heads (the KV caches are then split by KV head) keep the split;
* ``argmax`` over a split last axis becomes ``allreduce_argmax(x, offset=r·V/N)`` (per-rank (max, index)
  pairs merged across ranks);
* anything else that meets a split value (``sample``, ``split``, ``return``, loop carries, ...) gets it
  whole through ``allgather`` first (correct, not fast).

Sharded weights get ``shard(axis, parts=N, index=r)`` and their declared dim divided by N; split states
(KV caches) get their dim divided.  ``gpus = 1`` returns the module unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, Span, part
from mpkir.passes.manager import register

COLLECTIVES = ("allreduce", "allgather", "allreduce_argmax")
_KEEP_ANY = ("add", "mul", "silu", "gelu", "cast")       # elementwise: any split passes through
_ROW_LAST = ("rmsnorm", "layernorm", "head_rmsnorm")      # normalise the last axis
Layout = int | None  # None: replicated; k: split along axis k


def _div(e: ir.Expr, n: int) -> ir.Expr:
    if isinstance(e, ir.Num) and isinstance(e.value, int):
        return ir.Num(e.value // n)
    return ir.BinOp("/", e, ir.Num(n))


class _Sharder:
    def __init__(self, module: ir.Module, rank: int, n: int):
        from mpkir.verify import analyze

        self.m = module
        self.rank = rank
        self.n = n
        self.a = analyze(module)
        errors = [d for d in self.a.diagnostics if d.severity == "error"]
        if errors:
            raise MpkError(errors)
        self.dims = dict(self.a.env.dims)
        self.weight_role: dict[str, tuple[Layout, Span | None]] = {}
        self.state_role: dict[str, tuple[Layout, Span | None]] = {}
        self.names: set[str] = set()
        self.serve_loc = self._gpus_loc()

    def _gpus_loc(self) -> Span | None:
        s = self.m.serve
        if s is None:
            return None
        return next((a.loc for a in s.items if a.key == "gpus"), s.loc)

    # ------------------------------------------------------------------ helpers
    def fresh(self, base: str, suffix: str) -> str:
        name, k = f"{base}_{suffix}", 1
        while name in self.names:
            k += 1
            name = f"{base}_{suffix}{k}"
        self.names.add(name)
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        t = self.types[name]
        return tuple(self.dims[d] if isinstance(d, str) else d for d in t.shape)

    def err(self, msg: str, loc: Span | None, *notes: str) -> MpkError:
        return MpkError(Diagnostic(msg, loc, notes=notes))

    def _role(self, table: dict, o: ir.GlobalRef, layout: Layout, what: str) -> None:
        prev = table.get(o.name)
        if prev is None:
            table[o.name] = (layout, o.loc)
            return
        if prev[0] != layout:
            def word(x: Layout) -> str:
                return "whole (replicated)" if x is None else f"split along axis {x}"
            raise self.err(f"{what} '@{o.name}' is used {word(layout)} here but {word(prev[0])} at "
                           f"{prev[1]}", o.loc,
                           "give the two uses separate declarations (they may bind the same checkpoint name)")

    def use_global(self, o: ir.Operand, layout: Layout = None) -> None:
        if isinstance(o, ir.GlobalRef):
            if self.m.weight(o.name) is not None:
                self._role(self.weight_role, o, layout, "weight")
            else:
                self._role(self.state_role, o, layout, "state")

    def gather(self, o: ir.Operand, lay: dict, out: list, cache: dict) -> ir.Operand:
        """The operand whole: an ``allgather`` is emitted for a split value (once per scope)."""
        if isinstance(o, ir.GlobalRef):
            self.use_global(o)
            return o
        ax = lay.get(o.name)
        if ax is None:
            return o
        if o.name not in cache:
            g = self.fresh(o.name, "full")
            out.append(ir.OpStmt((g,), "allgather", (ir.ValueRef(o.name),),
                                 (ir.Attr("axis", ir.Num(ax)), ir.Attr("parts", ir.Num(self.n)))))
            self.types[g] = self.types[o.name]
            lay[g] = None
            cache[o.name] = g
        return ir.ValueRef(cache[o.name], o.loc)

    def split_types(self, s: ir.OpStmt, axes: list[Layout]) -> tuple[ir.TypeExpr, ...]:
        """Result type annotations with the split dim divided by N."""
        if not s.types:
            return s.types
        out = []
        for t, ax in zip(s.types, axes, strict=False):
            if ax is not None:
                dims = list(t.dims)
                dims[ax] = _div(dims[ax], self.n)
                t = dataclasses.replace(t, dims=tuple(dims))
            out.append(t)
        return tuple(out)

    # ------------------------------------------------------------------ statements
    def block(self, body, lay: dict, cache: dict) -> list[ir.Stmt]:
        out: list[ir.Stmt] = []
        for s in body:
            if isinstance(s, ir.OpStmt):
                self.op(s, lay, out, cache)
            elif isinstance(s, ir.ForStmt):
                carries = tuple(dataclasses.replace(c, init=self.gather(c.init, lay, out, cache))
                                for c in s.carries)
                inner = dict(lay)
                for c in carries:
                    inner[c.name] = None
                body2 = self.block(s.body, inner, dict(cache))
                out.append(dataclasses.replace(s, carries=carries, body=tuple(body2)))
                for r in s.results:
                    lay[r] = None
            elif isinstance(s, (ir.YieldStmt, ir.ReturnStmt)):
                vals = tuple(self.gather(v, lay, out, cache) for v in s.values)
                out.append(dataclasses.replace(s, values=vals))
        return out

    def op(self, s: ir.OpStmt, lay: dict, out: list, cache: dict) -> None:
        if s.op in COLLECTIVES:
            raise self.err(f"'{s.op}' in a module being sharded: the shard pass inserts the collectives "
                           "itself", part(s.loc, "name"))
        ins = [lay.get(o.name) if isinstance(o, ir.ValueRef) else None for o in s.operands]
        attrs = self.a.graphs[self.graph].attrs.get(id(s), {})
        if not any(x is not None for x in ins):
            return self.replicated(s, lay, out, cache)
        handler = getattr(self, "op_" + s.op, None)
        if handler is None and s.op in _KEEP_ANY:
            handler = self.op_elementwise
        if handler is None and s.op in _ROW_LAST:
            handler = self.op_row_last
        if handler is None or not handler(s, ins, attrs, lay, out, cache):
            self.replicated(s, lay, out, cache)

    def replicated(self, s: ir.OpStmt, lay: dict, out: list, cache: dict) -> None:
        """Every operand whole, every weight/state replicated; results replicated."""
        x = s.operands[0] if s.operands else None
        if s.op == "linear" and isinstance(x, ir.ValueRef) and lay.get(x.name) is None \
                and isinstance(s.operands[1], ir.GlobalRef):
            return self.linear_column(s, lay, out)
        ops = tuple(self.gather(o, lay, out, cache) for o in s.operands)
        out.append(dataclasses.replace(s, operands=ops))
        for r in s.results:
            lay[r] = None

    def keep(self, s: ir.OpStmt, ax: Layout, lay: dict, out: list, **changes) -> bool:
        for o in s.operands:
            if isinstance(o, ir.GlobalRef):
                self.use_global(o)
        out.append(dataclasses.replace(s, types=self.split_types(s, [ax] * len(s.results)), **changes))
        for r in s.results:
            lay[r] = ax
        return True

    # ------------------------------------------------------------------ per op
    def linear_column(self, s: ir.OpStmt, lay: dict, out: list) -> None:
        w = s.operands[1]
        n_out = self.shape_of_global(w)[0]
        if n_out % self.n:
            self.use_global(w)
            for b in s.operands[2:]:
                self.use_global(b)
            out.append(s)
            lay[s.results[0]] = None
            return
        self.use_global(w, 0)
        for b in s.operands[2:]:
            if not isinstance(b, ir.GlobalRef):
                raise self.err("column-parallel linear: the bias must be a weight", b.loc)
            self.use_global(b, 0)
        r = len(self.types[s.results[0]].shape) - 1
        out.append(dataclasses.replace(s, types=self.split_types(s, [r])))
        lay[s.results[0]] = r

    def shape_of_global(self, o: ir.GlobalRef) -> tuple[int, ...]:
        return tuple(self.a.globals[o.name].shape)  # weights have fixed shapes

    def op_linear(self, s, ins, attrs, lay, out, cache) -> bool:
        x, w = s.operands[0], s.operands[1]
        ax = ins[0]
        last = len(self.types[x.name].shape) - 1
        if not isinstance(w, ir.GlobalRef):
            return False
        if ax != last:          # rows split: each rank's rows times the whole weight
            return self.keep(s, ax, lay, out)
        if len(s.operands) > 2:
            raise self.err("row-parallel linear with a bias is not supported (the bias would be added N "
                           "times)", s.operands[2].loc, "add the bias after the linear with a separate 'add'")
        self.use_global(w, 1)
        y = s.results[0]
        p = self.fresh(y, "part")
        self.types[p] = self.types[y]
        out.append(dataclasses.replace(s, results=(p,), loc=s.loc))
        out.append(ir.OpStmt((y,), "allreduce", (ir.ValueRef(p),), types=s.types, loc=s.loc))
        lay[p] = None
        lay[y] = None
        return True

    def op_elementwise(self, s, ins, attrs, lay, out, cache) -> bool:
        vals = [o for o in s.operands if isinstance(o, ir.ValueRef)]
        axes = {lay.get(o.name) for o in vals}
        shapes = {self.shape(o.name) for o in vals}
        if len(axes) != 1 or len(shapes) != 1 or any(isinstance(o, ir.GlobalRef) for o in s.operands):
            return False
        return self.keep(s, axes.pop(), lay, out)

    def op_silu_mul(self, s, ins, attrs, lay, out, cache) -> bool:
        if len(s.operands) == 1:
            return False  # gate and up halves of one tensor: a split cuts across them
        return self.op_elementwise(s, ins, attrs, lay, out, cache)

    def op_row_last(self, s, ins, attrs, lay, out, cache) -> bool:
        ax = ins[0]
        if ax == len(self.types[s.operands[0].name].shape) - 1 or any(x is not None for x in ins[1:]):
            return False
        return self.keep(s, ax, lay, out)

    def op_softmax(self, s, ins, attrs, lay, out, cache) -> bool:
        rank = len(self.types[s.operands[0].name].shape)
        if ins[0] == attrs.get("axis", -1) % rank:
            return False
        return self.keep(s, ins[0], lay, out)

    def op_rope(self, s, ins, attrs, lay, out, cache) -> bool:
        if ins[0] != 1 or ins[1] is not None:  # heads split; positions (per token) whole
            return False
        return self.keep(s, 1, lay, out)

    def op_attention(self, s, ins, attrs, lay, out, cache) -> bool:
        if ins[:3] != [1, 1, 1] or any(x is not None for x in ins[3:]):
            return False
        for o in s.operands[3:5]:
            if isinstance(o, ir.GlobalRef):
                self._role(self.state_role, o, 2, "state")
        rest = tuple(self.gather(o, lay, out, cache) for o in s.operands[5:])
        for o in s.operands:
            if isinstance(o, ir.GlobalRef) and self.m.weight(o.name) is not None:
                raise self.err("attention over a weight operand cannot be sharded", o.loc)
        out.append(dataclasses.replace(s, operands=(*s.operands[:5], *rest),
                                       types=self.split_types(s, [1])))
        lay[s.results[0]] = 1
        return True

    op_paged_attention = op_attention

    def op_argmax(self, s, ins, attrs, lay, out, cache) -> bool:
        x = s.operands[0]
        shp = self.shape(x.name)
        last = len(shp) - 1
        if ins[0] != last or attrs.get("axis", -1) % len(shp) != last:
            return False
        offset = self.rank * (shp[last] // self.n)
        out.append(ir.OpStmt(s.results, "allreduce_argmax", (x,), (ir.Attr("offset", ir.Num(offset)),),
                             s.schedule, s.types, s.loc))
        lay[s.results[0]] = None
        return True

    def op_reshape(self, s, ins, attrs, lay, out, cache) -> bool:
        x = s.operands[0]
        src = self.shape(x.name)
        dst = self.shape(s.results[0])
        a = ins[0]
        pre = math.prod(src[:a])
        cands = [j for j in range(len(dst)) if math.prod(dst[:j]) == pre and dst[j] > 1]
        ok = [j for j in cands if dst[j] % self.n == 0]
        if not ok:
            j = cands[0] if cands else None
            t = self.types[s.results[0]]
            what = f"dim {j} of the result ({dst[j]})" if j is not None else "no dim of the result"
            raise self.err(
                f"cannot split '%{s.results[0]}' ({t}) over {self.n} GPUs: '%{x.name}' is split along "
                f"dim {a} ({src[a]}), which becomes {what}, and {self.n} does not divide "
                f"{dst[j] if j is not None else 'it'}", part(s.loc, "name"),
                f"serve gpus = {self.n} at {self.serve_loc}: the heads (and the KV heads of GQA) must be a "
                "multiple of gpus")
        j = ok[0]
        shape_attr = next((at for at in s.attrs if at.key == "shape"), None)
        new_attrs = s.attrs
        if shape_attr is not None and isinstance(shape_attr.value, ir.ListVal):
            items = list(shape_attr.value.items)
            if not (isinstance(items[j], ir.Num) and items[j].value == -1):  # a -1 elsewhere follows
                items[j] = _div(items[j], self.n)
            new_attrs = tuple(dataclasses.replace(at, value=dataclasses.replace(at.value, items=tuple(items)))
                              if at is shape_attr else at for at in s.attrs)
        return self.keep(s, j, lay, out, attrs=new_attrs)

    # ------------------------------------------------------------------ driver
    def run(self) -> ir.Module:
        for w in self.m.weights:
            if w.shard is not None:
                raise self.err(f"weight '{w.name}' is already sharded: the module is one rank's part",
                               w.shard.loc or part(w.loc, "name"))
        graphs: dict[str, ir.GraphDecl] = {}
        for g in self.m.graphs:
            self.graph = g.name
            self.types = dict(self.a.graphs[g.name].types)
            self.names = set(self.types)
            lay: dict[str, Layout] = {p.name: None for p in g.params}
            body = self.block(g.body, lay, {})
            graphs[g.name] = dataclasses.replace(g, body=tuple(body))
        decls = []
        for d in self.m.decls:
            if isinstance(d, ir.GraphDecl):
                d = graphs[d.name]
            elif isinstance(d, ir.WeightDecl):
                ax = self.weight_role.get(d.name, (None, None))[0]
                if ax is not None:
                    dims = list(d.type.dims)
                    dims[ax] = _div(dims[ax], self.n)
                    d = dataclasses.replace(d, type=dataclasses.replace(d.type, dims=tuple(dims)),
                                            shard=ir.Shard(ir.Num(ax), ir.Num(self.n), ir.Num(self.rank)))
            elif isinstance(d, ir.StateDecl):
                ax = self.state_role.get(d.name, (None, None))[0]
                if ax is not None:
                    dims = list(d.type.dims)
                    n_ax = self.a.globals[d.name].shape[ax]
                    if n_ax % self.n:
                        raise self.err(f"cannot split state '{d.name}' over {self.n} GPUs: its dim {ax} has "
                                       f"{n_ax}, which {self.n} does not divide", part(d.loc, "name"))
                    dims[ax] = _div(dims[ax], self.n)
                    d = dataclasses.replace(d, type=dataclasses.replace(d.type, dims=tuple(dims)))
            decls.append(d)
        return dataclasses.replace(self.m, decls=tuple(decls))


def shard_module(module: ir.Module, rank: int, gpus: int | None = None) -> ir.Module:
    """Rank ``rank``'s module of a ``gpus``-way (default: the serve block's ``gpus``) tensor-parallel run."""
    from mpkir.verify import analyze

    n = gpus if gpus else analyze(module).serve.gpus
    if not 0 <= rank < n:
        raise MpkError(Diagnostic(f"shard: rank {rank} is out of range 0..{n - 1} for gpus = {n}"))
    if n == 1:
        return module
    sharder = _Sharder(module, rank, n)
    if sharder.a.serve.gpus != n:
        raise MpkError(Diagnostic(f"shard: gpus = {n} but the serve block says gpus = {sharder.a.serve.gpus}",
                                  sharder.serve_loc))
    return sharder.run()


@register
@dataclass(frozen=True)
class Shard:
    """Tensor parallelism: the module of rank ``rank`` of the serve block's ``gpus`` (see module doc)."""

    name: ClassVar[str] = "shard"
    rank: int = 0

    def run(self, module: ir.Module) -> ir.Module:
        return shard_module(module, self.rank)
