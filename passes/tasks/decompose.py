"""Operator → tasks: each op becomes tasks that each compute a tile (a box) of its output.

The tiling is chosen by the cost model (:mod:`.cost`) over candidate splits of the output's parallel
dims; ``linear``/``matmul`` may also split the reduction (split-K: partial tasks write f32 partials to a
scratch tensor, merge tasks add them in split order).  ``schedule(tasks=N, split_k=S)`` on an op in the
.mpk file overrides the choice; bad values are located diagnostics.  ``reshape`` makes a view (no
task).  Ops without a tiling rule become one task that reads and writes everything.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError
from mpkir.passes.tasks.cost import pick, stage_ns, task_ns
from mpkir.passes.tasks.gpus import GPU
from mpkir.passes.tasks.graph import Access, Range, Tensor
from mpkir.semantics import eval_expr

SCHEDULE_KEYS = ("tasks", "split_k", "split_kv")
_ELEMENTWISE = ("add", "mul", "silu", "gelu", "cast", "allreduce")
_ROWWISE = ("rmsnorm", "layernorm", "softmax", "argmax", "sample", "head_rmsnorm", "rope")


@dataclass
class TaskSpec:
    """A task before events and placement."""

    kind: str
    node: str
    reads: tuple[Access, ...]
    writes: tuple[Access, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    flops: float = 0.0
    bytes: float = 0.0
    stage: int = 0  # index of the op stage (tasks of one stage are independent of each other)
    variant: str = ""


def split_range(n: int, parts: int, quantum: int = 1) -> list[tuple[int, int]]:
    """``parts`` contiguous near-equal ranges covering ``[0, n)``, boundaries on multiples of quantum."""
    return list(_split_range(n, parts, quantum))


@functools.lru_cache(maxsize=4096)
def _split_range(n: int, parts: int, quantum: int) -> tuple[tuple[int, int], ...]:
    units = -(-n // quantum)
    parts = max(1, min(parts, units))
    cuts = [min(n, ((units * i) // parts) * quantum) for i in range(parts + 1)]
    return tuple((a, b) for a, b in itertools.pairwise(cuts) if b > a)


def _pow2_upto(n: int) -> list[int]:
    out, p = [], 1
    while p <= n:
        out.append(p)
        p *= 2
    if n not in out:
        out.append(n)
    return out


def _factorizations(n: int, caps: list[int]):
    """Tuples ``f`` with ``prod(f) == n`` and ``1 <= f[i] <= caps[i]``."""
    if not caps:
        if n == 1:
            yield ()
        return
    for f in range(1, min(n, caps[0]) + 1):
        if n % f == 0:
            for rest in _factorizations(n // f, caps[1:]):
                yield (f, *rest)


def full(shape: tuple[int, ...]) -> Range:
    return tuple((0, d) for d in shape)


def _bcast_box(out_box: Range, shape: tuple[int, ...]) -> Range:
    """The box of a broadcast operand (right-aligned) read for an output box."""
    off = len(out_box) - len(shape)
    return tuple((0, 1) if d == 1 else out_box[off + i] for i, d in enumerate(shape))


class Decomposer:
    """Builds tensors and task specs for one unrolled, verified graph."""

    def __init__(self, module: ir.Module, analysis, gpu: GPU, graph: str | None = None,
                 max_tasks: int | None = None):
        self.m = module
        self.a = analysis
        self.gpu = gpu
        self.g = module.graph(graph)
        self.info = analysis.graphs[self.g.name]
        self.env = analysis.env
        self.dims = dict(analysis.env.dims)
        self.tensors: dict[str, Tensor] = {}
        self.specs: list[TaskSpec] = []
        self.stage = 0
        self.max_tasks = max_tasks or 2 * gpu.workers
        self.diags: list[Diagnostic] = []
        # tiling choices memoised per op signature (op, operand/result shapes and dtypes, attrs,
        # schedule): the layers of a model repeat the same ops, and the choice depends only on these
        self._memo: dict = {}
        self._sig = None
        self._calls = 0
        self._isz: dict[str, int] = {}

    # ------------------------------------------------------------------ tensors
    def shape_of(self, t: ir.TensorType) -> tuple[int, ...]:
        return tuple(self.dims[d] if isinstance(d, str) else int(d) for d in t.shape)

    def operand(self, op: ir.Operand) -> str:
        if isinstance(op, ir.ValueRef):
            return "%" + op.name
        if op.index is None:
            name = "@" + op.name
            layer = None
        else:
            layer = int(eval_expr(op.index, self.env))
            name = f"@{op.name}[{layer}]"
        if name not in self.tensors:
            t = self.a.globals[op.name]
            w = self.m.weight(op.name)
            if w is not None:
                self.tensors[name] = Tensor(name, str(t.dtype), self.shape_of(t), "weight",
                                            checkpoint=w.checkpoint_name(layer))
            else:
                self.tensors[name] = Tensor(name, str(t.dtype), self.shape_of(t), "state")
        return name

    def value(self, name: str, kind: str = "activation", base: str | None = None) -> str:
        t = self.info.types[name]
        key = "%" + name
        self.tensors[key] = Tensor(key, str(t.dtype), self.shape_of(t), kind, base=base)
        return key

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def itemsize(self, name: str) -> int:
        dt = self.tensors[name].dtype
        n = self._isz.get(dt)
        if n is None:
            n = self._isz[dt] = ir.DType(dt).itemsize
        return n

    def storage(self, name: str) -> str:
        while self.tensors[name].base is not None:
            name = self.tensors[name].base
        return name

    # ------------------------------------------------------------------ driver
    def run(self) -> list[TaskSpec]:
        for p in self.g.params:
            self.value(p.name, "input")
        outputs = set()
        for s in self.g.body:
            if isinstance(s, ir.ReturnStmt):
                outputs = {v.name for v in s.values}
        for s in self.g.body:
            if isinstance(s, ir.OpStmt):
                self.op(s)
            elif isinstance(s, ir.ForStmt):
                raise MpkError(Diagnostic("task decomposition needs an unrolled graph (run 'unroll' first)",
                                          s.loc))
        for o in outputs:
            key = "%" + o
            st = self.storage(key)
            if self.tensors[st].kind == "activation":
                t = self.tensors[st]
                self.tensors[st] = Tensor(t.name, t.dtype, t.shape, "output", t.checkpoint, t.base)
        if self.diags:
            raise MpkError(self.diags)
        return self.specs

    def schedule(self, s: ir.OpStmt) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in s.schedule:
            if a.key not in SCHEDULE_KEYS:
                known = ", ".join(SCHEDULE_KEYS)
                self.diags.append(Diagnostic(f"unknown schedule key '{a.key}' (known: {known})",
                                             a.loc))
                continue
            try:
                v = eval_expr(a.value, self.env)
            except MpkError as e:
                self.diags.extend(e.diagnostics)
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                self.diags.append(Diagnostic(f"schedule {a.key} must be a positive integer, got {v!r}",
                                             a.loc))
                continue
            if a.key == "split_k" and s.op not in ("linear", "matmul"):
                self.diags.append(Diagnostic(f"split_k applies to linear and matmul, not {s.op}", a.loc))
                continue
            if a.key == "split_kv" and s.op != "paged_attention":
                self.diags.append(Diagnostic(f"split_kv applies to paged_attention, not {s.op}", a.loc))
                continue
            out[a.key] = v
        return out

    def _sched_loc(self, s: ir.OpStmt, key: str):
        return next((a.loc for a in s.schedule if a.key == key), s.loc)

    def emit(self, spec: TaskSpec) -> None:
        spec.stage = self.stage
        if not spec.bytes:
            spec.bytes = float(sum(a.numel * self.itemsize(a.tensor) for a in spec.reads + spec.writes))
        ext = ",".join("x".join(str(b - a) for a, b in w.box) for w in spec.writes[:1])
        dts = ",".join(self.tensors[r.tensor].dtype for r in spec.reads)
        akey = tuple(spec.attrs.items())
        extra = self._memo.get(("extra", akey))
        if extra is None:
            extra = self._memo[("extra", akey)] = "".join(
                f",{k}={v}" for k, v in sorted(spec.attrs.items()) if not k.startswith("_"))
        spec.variant = f"{spec.kind}<{ext}|{dts}{extra}>"
        self.specs.append(spec)

    def next_stage(self) -> None:
        self.stage += 1

    # ------------------------------------------------------------------ tiling choice
    def choose(self, s: ir.OpStmt, out_shape, split_dims, tile_cost, sched) -> list[Range]:
        """Pick the split of ``split_dims`` (dim → quantum) minimising the estimated op time."""
        key = None
        if self._sig is not None:
            key = ("choose", self._sig, self._calls, tuple(out_shape), tuple(sorted(split_dims.items())),
                   tuple(sorted(sched.items())))
            self._calls += 1
            hit = self._memo.get(key)
            if hit is not None:
                return hit
        n_diags = len(self.diags)
        out = self._choose(s, out_shape, split_dims, tile_cost, sched)
        if key is not None and len(self.diags) == n_diags:
            self._memo[key] = out
        return out

    def _choose(self, s: ir.OpStmt, out_shape, split_dims, tile_cost, sched) -> list[Range]:
        opts = []
        dims = [d for d in split_dims if out_shape[d] > 0]
        choices = [_pow2_upto(math.ceil(out_shape[d] / q)) for d, q in ((d, split_dims[d]) for d in dims)]
        for combo in itertools.product(*choices) if dims else [()]:
            parts = dict(zip(dims, combo, strict=True))
            per_dim = [split_range(n, parts.get(d, 1), split_dims.get(d, 1)) if n > 0 else [(0, 0)]
                       for d, n in enumerate(out_shape)]
            n = math.prod(len(r) for r in per_dim)
            if n > self.max_tasks and "tasks" not in sched:
                continue
            fl, by = tile_cost(tuple(r[0] for r in per_dim))
            opts.append((stage_ns(self.gpu, n, fl, by), n, parts))
        if "tasks" in sched:
            want = sched["tasks"]
            units = [math.ceil(out_shape[d] / split_dims[d]) for d in dims]
            for combo in _factorizations(want, units):
                parts = dict(zip(dims, combo, strict=True))
                per_dim = [split_range(n, parts.get(d, 1), split_dims.get(d, 1)) if n > 0 else [(0, 0)]
                           for d, n in enumerate(out_shape)]
                if math.prod(len(r) for r in per_dim) == want:
                    fl, by = tile_cost(tuple(r[0] for r in per_dim))
                    opts.append((stage_ns(self.gpu, want, fl, by), want, parts))
            hit = [o for o in opts if o[1] == want]
            if not hit:
                have = sorted({o[1] for o in opts})
                self.diags.append(Diagnostic(
                    f"{s.op} cannot be split into {want} tasks; possible task counts: "
                    f"{', '.join(map(str, have[:24]))}", self._sched_loc(s, "tasks")))
                return [full(out_shape)]
            return self.tiles(out_shape, min(hit, key=lambda o: o[0])[2], split_dims)
        return self.tiles(out_shape, pick(opts)[2], split_dims)

    @staticmethod
    def tiles(shape, parts: dict[int, int], quanta: dict[int, int]) -> list[Range]:
        per_dim = [split_range(n, parts.get(d, 1), quanta.get(d, 1)) if n > 0 else [(0, 0)]
                   for d, n in enumerate(shape)]
        return [tuple(c) for c in itertools.product(*per_dim)]

    # ------------------------------------------------------------------ per op
    def op(self, s: ir.OpStmt) -> None:
        attrs = dict(self.info.attrs.get(id(s), {}))
        sched = self.schedule(s)
        ins = [self.operand(o) for o in s.operands]
        if s.op == "reshape":
            self.value(s.results[0], base=ins[0])
            return
        outs = [self.value(r) for r in s.results]
        fn = getattr(self, "op_" + s.op, None)
        if s.op in _ELEMENTWISE:
            fn = self.op_elementwise
        elif s.op in _ROWWISE:
            fn = self.op_rowwise
        if fn is None:
            fn = self.op_generic
        own = getattr(Decomposer, fn.__name__, None) is getattr(type(self), fn.__name__, None)
        names = [*ins, *outs]
        self._sig = (s.op, tuple((self.shape(t), self.tensors[t].dtype) for t in ins),
                     tuple((self.shape(t), self.tensors[t].dtype) for t in outs),
                     tuple(names.index(t) for t in names),  # which operands are the same tensor
                     repr(sorted(attrs.items()))) if own else None
        self._calls = 0
        tkey = None
        if self._sig is not None and type(self).emit is Decomposer.emit:
            tkey = ("template", self._sig, tuple(sorted(sched.items())))
            tmpl = self._memo.get(tkey)
            if tmpl is not None:   # the same op with the same shapes was decomposed before: rename
                self._replay(tmpl, ins, outs)
                self._sig = None
                self.next_stage()
                return
        n_specs, stage0, n_diags, before = len(self.specs), self.stage, len(self.diags), set(self.tensors)
        fn(s, ins, outs, attrs, sched)
        if tkey is not None and len(self.diags) == n_diags:
            same: dict[Access, Access] = {}   # equal accesses become one object: replays rename it once
            for sp in self.specs[n_specs:]:
                sp.reads = tuple(same.setdefault(a, a) for a in sp.reads)
                sp.writes = tuple(same.setdefault(a, a) for a in sp.writes)
            self._memo[tkey] = (tuple(ins), tuple(outs), tuple(self.specs[n_specs:]), stage0,
                                self.stage - stage0, tuple(self.tensors[t] for t in self.tensors
                                                           if t not in before and t not in outs))
        self._sig = None
        self.next_stage()

    def _replay(self, tmpl, ins: list[str], outs: list[str]) -> None:
        """Emit a recorded op's tasks again with its tensors renamed to ``ins``/``outs`` (same shapes)."""
        t_ins, t_outs, specs, stage0, n_stages, scratch = tmpl
        ren = dict(zip(t_ins, ins, strict=True))
        ren.update(zip(t_outs, outs, strict=True))
        for t in scratch:  # scratch buffers are named after the op's first result
            assert t.name.startswith(t_outs[0]), t.name
            new = outs[0] + t.name[len(t_outs[0]):]
            ren[t.name] = new
            self.tensors[new] = Tensor(new, t.dtype, t.shape, t.kind, t.checkpoint, t.base)
        cache: dict[int, Access] = {}   # by id: the template's accesses live as long as the memo

        def acc(a: Access) -> Access:
            hit = cache.get(id(a))
            if hit is None:
                t = ren.get(a.tensor)
                hit = cache[id(a)] = a if t is None else Access(t, a.box)
            return hit

        for sp in specs:
            self.specs.append(TaskSpec(sp.kind, ren.get(sp.node, sp.node), tuple(map(acc, sp.reads)),
                                       tuple(map(acc, sp.writes)), sp.attrs, sp.flops, sp.bytes,
                                       self.stage + sp.stage - stage0, sp.variant))
        self.stage += n_stages

    def op_generic(self, s, ins, outs, attrs, sched):
        reads = tuple(Access(t, full(self.shape(t))) for t in ins)
        writes = tuple(Access(t, full(self.shape(t))) for t in outs)
        if sched.get("tasks", 1) != 1:
            self.diags.append(Diagnostic(f"{s.op} is computed by one task; schedule(tasks=...) must be 1",
                                         self._sched_loc(s, "tasks")))
        mutated = tuple(Access(ins[i], full(self.shape(ins[i]))) for i in self._mutates(s.op))
        self.emit(TaskSpec(s.op, outs[0], reads, writes + mutated, dict(attrs, _ref=True)))

    @staticmethod
    def _mutates(op: str) -> tuple[int, ...]:
        from mpkir.ops.registry import OPS
        d = OPS.get(op)
        return d.mutates if d is not None else ()

    def _elem_cost(self, reads_fn, writes_fn, flops_per=1.0):
        def cost(box):
            rs, ws = reads_fn(box), writes_fn(box)
            by = sum(a.numel * self.itemsize(a.tensor) for a in rs + ws)
            return flops_per * sum(a.numel for a in ws), by
        return cost

    def op_elementwise(self, s, ins, outs, attrs, sched):
        shape = self.shape(outs[0])
        r = len(shape)
        split = {d: 1 for d in range(r)}
        if r:
            split[r - 1] = min(64, shape[r - 1]) or 1

        def reads(box):
            return tuple(Access(t, _bcast_box(box, self.shape(t))) for t in ins)

        def writes(box):
            return (Access(outs[0], box),)

        for box in self.choose(s, shape, split, self._elem_cost(reads, writes), sched):
            self.emit(TaskSpec(s.op, outs[0], reads(box), writes(box), dict(attrs, _ref=True)))

    def op_rowwise(self, s, ins, outs, attrs, sched):
        x = self.shape(ins[0])
        axis = attrs.get("axis", -1) if s.op in ("softmax", "argmax") else -1
        axis = axis % len(x) if x else 0
        if s.op in ("head_rmsnorm", "rope"):
            axis = len(x) - 1
        out_shape = self.shape(outs[0])
        split = {d: 1 for d in range(len(x)) if d != axis}

        def xbox(obox):  # output box → x box (argmax drops the axis)
            if len(out_shape) == len(x):
                return tuple((0, x[d]) if d == axis else obox[d] for d in range(len(x)))
            ob = list(obox)
            ob.insert(axis, (0, x[axis]))
            return tuple(ob)

        def reads(obox):
            xb = xbox(obox)
            rs = [Access(ins[0], xb)]
            for t in ins[1:]:
                sh = self.shape(t)
                if s.op in ("rope", "sample"):  # positions: one per token (dim 0)
                    rs.append(Access(t, (xb[0],)))
                else:                           # weight / bias over the normalised axis
                    rs.append(Access(t, full(sh)))
            return tuple(rs)

        def writes(obox):
            return (Access(outs[0], obox),)

        osplit = split if len(out_shape) == len(x) else {(d if d < axis else d - 1): 1 for d in split}
        for box in self.choose(s, out_shape, osplit, self._elem_cost(reads, writes, 8.0), sched):
            self.emit(TaskSpec(s.op, outs[0], reads(box), writes(box), dict(attrs, _ref=True)))

    def op_silu_mul(self, s, ins, outs, attrs, sched):
        shape = self.shape(outs[0])
        F = shape[-1]
        r = len(shape)
        split = {d: 1 for d in range(r - 1)}
        split[r - 1] = min(16, F) or 1

        def reads(box):
            if len(ins) == 2:
                return tuple(Access(t, box) for t in ins)
            (a, b) = box[-1]
            return (Access(ins[0], (*box[:-1], (a, b))), Access(ins[0], (*box[:-1], (F + a, F + b))))

        def writes(box):
            return (Access(outs[0], box),)

        halves = len(ins) == 1
        for box in self.choose(s, shape, split, self._elem_cost(reads, writes, 6.0), sched):
            a = dict(attrs, _ref=True)
            if halves:
                a["halves"] = True
            self.emit(TaskSpec(s.op, outs[0], reads(box), writes(box), a))

    def op_embedding(self, s, ins, outs, attrs, sched):
        shape = self.shape(outs[0])
        V = self.shape(ins[1])[0]
        r = len(shape)
        split = {d: 1 for d in range(r)}
        split[r - 1] = min(64, shape[-1]) or 1

        def reads(box):
            return (Access(ins[0], box[:-1]), Access(ins[1], ((0, V), box[-1])))

        def cost(box):
            n = math.prod(b - a for a, b in box)
            return 0.0, 2.0 * n * self.itemsize(outs[0]) + 8 * n / max(1, box[-1][1] - box[-1][0])

        for box in self.choose(s, shape, split, cost, sched):
            self.emit(TaskSpec("embedding", outs[0], reads(box), (Access(outs[0], box),),
                               dict(attrs, _ref=True),
                               bytes=cost(box)[1]))

    def op_attention(self, s, ins, outs, attrs, sched):
        T, Hq, D = self.shape(ins[0])
        Hkv = self.shape(ins[1])[1]
        G = Hq // Hkv

        def cost(box):
            h = box[0][1] - box[0][0]
            return 4.0 * T * T * D * G * h, (2 * T * h * D + 2 * T * h * G * D) * self.itemsize(ins[0])

        for (h0, h1), in self.choose(s, (Hkv,), {0: 1}, cost, sched):
            qb = ((0, T), (h0 * G, h1 * G), (0, D))
            kb = ((0, T), (h0, h1), (0, D))
            reads = (Access(ins[0], qb), Access(ins[1], kb), Access(ins[2], kb))
            fl, by = cost(((h0, h1),))
            self.emit(TaskSpec("attention", outs[0], reads, (Access(outs[0], qb),), dict(attrs, _ref=True),
                               flops=fl, bytes=by))

    def op_paged_attention(self, s, ins, outs, attrs, sched):
        """Two stages: ``kv_append`` per KV head (writes the new k/v into the caches), then attention
        tasks per (token range, KV head range) that read the caches (the cost model picks the split).

        Cache accesses cover the task's KV heads over ALL pages and slots: which physical pages a
        token (or a split-KV position range) touches is read from the page table at run time, and any
        page of the pool may be in it, so no smaller static box is sound.  The head range is exact."""
        T, Hq, D = self.shape(ins[0])
        Hkv = self.shape(ins[1])[1]
        G = Hq // Hkv
        P, page, _, Dc = self.shape(ins[3])
        ctx = min(P * page, self.a.serve.max_seq_len)
        isz = self.itemsize(ins[3])
        whole = [Access(t, full(self.shape(t))) for t in ins[5:]]
        for h in range(Hkv):
            cb = ((0, P), (0, page), (h, h + 1), (0, Dc))
            kb = ((0, T), (h, h + 1), (0, D))
            self.emit(TaskSpec("kv_append", outs[0],
                               (Access(ins[1], kb), Access(ins[2], kb), *whole,
                                Access(ins[3], cb), Access(ins[4], cb)),
                               (Access(ins[3], cb), Access(ins[4], cb)), {},
                               flops=0.0, bytes=4.0 * T * D * isz))
        self.next_stage()

        nsplit = 1
        if "split_kv" in sched:
            nsplit = sched["split_kv"]
            if nsplit > ctx:
                self.diags.append(Diagnostic(f"split_kv={nsplit} exceeds the context length {ctx}",
                                             self._sched_loc(s, "split_kv")))
                nsplit = 1
        else:  # split the context when the (token, head) tasks leave workers idle and it pays
            n_th = T * Hkv
            best = None
            for S in (1, 2, 4, 8, 16):
                if S > 1 and (ctx // S < 256 or n_th * S > self.max_tasks):
                    break
                tt = stage_ns(self.gpu, n_th * S, 4.0 * ctx / S * D * G, 2.0 * ctx / S * D * isz)
                if S > 1:
                    tt += stage_ns(self.gpu, n_th, 0.0, S * G * (D + 2) * 4.0) + self.gpu.event_latency_ns
                if best is None or tt < best[0] * 0.9:
                    best = (tt, S)
            nsplit = best[1]
            if nsplit > 1:
                sched = dict(sched, tasks=T * Hkv)

        def cost(box):
            t = box[0][1] - box[0][0]
            h = box[1][1] - box[1][0]
            c = ctx / nsplit
            return 4.0 * t * c * D * G * h, 2.0 * t * h * c * D * isz + 2 * t * h * G * D * isz

        tiles = self.choose(s, (T, Hkv), {0: 1, 1: 1}, cost, sched)
        if nsplit > 1:
            parts_o = outs[0] + "#o"
            parts_ml = outs[0] + "#ml"
            self.tensors[parts_o] = Tensor(parts_o, "f32", (nsplit, T, Hq, D), "scratch")
            self.tensors[parts_ml] = Tensor(parts_ml, "f32", (nsplit, T, Hq, 2), "scratch")
            chunks = split_range(ctx, nsplit)
        for (t0, t1), (h0, h1) in tiles:
            qb = ((t0, t1), (h0 * G, h1 * G), (0, D))
            kb = ((t0, t1), (h0, h1), (0, D))
            cb = ((0, P), (0, page), (h0, h1), (0, Dc))
            reads = (Access(ins[0], qb), Access(ins[1], kb), Access(ins[2], kb), Access(ins[3], cb),
                     Access(ins[4], cb), whole[0], Access(ins[6], ((t0, t1),)), Access(ins[7], ((t0, t1),)))
            fl, by = cost(((t0, t1), (h0, h1)))
            if nsplit == 1:
                self.emit(TaskSpec("paged_attention", outs[0], reads, (Access(outs[0], qb),),
                                   dict(attrs, _ref=True), flops=fl, bytes=by))
                continue
            for si, (c0, c1) in enumerate(chunks):
                self.emit(TaskSpec("attention_partial", outs[0], reads,
                                   (Access(parts_o, ((si, si + 1), *qb)),
                                    Access(parts_ml, ((si, si + 1), *qb[:2], (0, 2)))),
                                   dict(attrs, split=si, splits=nsplit, kv_start=c0, kv_stop=c1),
                                   flops=fl, bytes=by))
        if nsplit > 1:
            self.next_stage()
            for (t0, t1), (h0, h1) in tiles:
                qb = ((t0, t1), (h0 * G, h1 * G), (0, D))
                self.emit(TaskSpec("attention_merge", outs[0],
                                   (Access(parts_o, ((0, nsplit), *qb)),
                                    Access(parts_ml, ((0, nsplit), *qb[:2], (0, 2)))),
                                   (Access(outs[0], qb),), {"splits": nsplit},
                                   flops=4.0 * nsplit * (t1 - t0) * (h1 - h0) * G * D))

    def op_linear(self, s, ins, outs, attrs, sched):
        x, w = self.shape(ins[0]), self.shape(ins[1])
        N, K = w
        rows = x[:-1]
        M = math.prod(rows)
        xs, ws = self.itemsize(ins[0]), self.itemsize(ins[1])
        key = ("linear", self._sig, tuple(sorted(sched.items())))
        hit = self._memo.get(key) if self._sig is not None else None
        if hit is None:
            n_diags = len(self.diags)
            hit = self._linear_choice(s, N, K, M, xs, ws, sched)
            if hit is None:
                return
            if self._sig is not None and len(self.diags) == n_diags:
                self._memo[key] = hit
        n_tiles, sk = hit
        self._emit_linear(s, ins, outs, attrs, N, K, rows, M, n_tiles, sk)

    def _linear_choice(self, s, N, K, M, xs, ws, sched) -> tuple[int, int] | None:
        """``(output tiles, split_k)`` of a linear [M, K] · [N, K]ᵀ (None: an error was reported)."""
        opts = []
        tiles_n = [t for t in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if t <= max(16, N)] or [N]
        splits = [1] + [k for k in (2, 4, 8, 16) if K % k == 0 and K // k >= 128]
        if "split_k" in sched:
            splits = [sched["split_k"]]
            if K % splits[0] != 0 and splits[0] > K:
                self.diags.append(Diagnostic(f"split_k={splits[0]} exceeds the reduction size {K}",
                                             self._sched_loc(s, "split_k")))
                splits = [1]
        for sk in splits:
            kk = math.ceil(K / sk)
            for tn in tiles_n:
                n_tiles = math.ceil(N / tn)
                n_tasks = n_tiles * sk
                if "tasks" in sched:
                    if n_tiles != sched["tasks"]:
                        continue
                    tn = math.ceil(N / n_tiles)
                elif n_tasks > self.max_tasks and tn != tiles_n[-1]:
                    continue
                tnn = min(tn, N)
                t = stage_ns(self.gpu, n_tasks, 2.0 * M * tnn * kk,
                             tnn * kk * ws + M * kk * xs + M * tnn * (4 if sk > 1 else xs))
                if sk > 1:
                    t += stage_ns(self.gpu, n_tiles, M * tnn * sk, M * tnn * (4 * sk + xs)) \
                        + self.gpu.event_latency_ns
                opts.append((t, n_tasks, n_tiles, sk))
        if "tasks" in sched and not opts and sched["tasks"] <= N:
            n_tiles = sched["tasks"]
            opts.append((0.0, n_tiles, n_tiles, splits[0]))
        if not opts:
            cand = sorted({math.ceil(N / t) for t in range(1, N + 1) if True} & set(range(1, 4097)))
            self.diags.append(Diagnostic(f"linear cannot be split into {sched.get('tasks')} output tiles "
                                         f"(N={N}); choose a count between 1 and {N}",
                                         self._sched_loc(s, "tasks")))
            _ = cand
            return None
        if "tasks" in sched and not any(o[1] for o in opts):
            return None
        _, _, n_tiles, sk = pick(opts)
        return n_tiles, sk

    def _emit_linear(self, s, ins, outs, attrs, N, K, rows, M, n_tiles, sk) -> None:
        nr, kr = split_range(N, n_tiles), split_range(K, sk)
        rbox = tuple((0, d) for d in rows)
        bias = ins[2] if len(ins) > 2 else None
        if len(kr) == 1:
            for (n0, n1) in nr:
                reads = [Access(ins[0], (*rbox, (0, K))), Access(ins[1], ((n0, n1), (0, K)))]
                if bias:
                    reads.append(Access(bias, ((n0, n1),)))
                self.emit(TaskSpec("linear", outs[0], tuple(reads), (Access(outs[0], (*rbox, (n0, n1))),),
                                   dict(attrs, _ref=True), flops=2.0 * M * (n1 - n0) * K))
            return
        S = len(kr)
        part = outs[0] + "#partial"
        self.tensors[part] = Tensor(part, "f32", (S, *rows, N), "scratch")
        for si, (k0, k1) in enumerate(kr):
            for (n0, n1) in nr:
                reads = (Access(ins[0], (*rbox, (k0, k1))), Access(ins[1], ((n0, n1), (k0, k1))))
                self.emit(TaskSpec("linear_partial", outs[0], reads,
                                   (Access(part, ((si, si + 1), *rbox, (n0, n1))),),
                                   {"split": si, "splits": S}, flops=2.0 * M * (n1 - n0) * (k1 - k0)))
        self.next_stage()
        for (n0, n1) in nr:
            reads = [Access(part, ((0, S), *rbox, (n0, n1)))]
            if bias:
                reads.append(Access(bias, ((n0, n1),)))
            self.emit(TaskSpec("linear_merge", outs[0], tuple(reads), (Access(outs[0], (*rbox, (n0, n1))),),
                               {"splits": S}, flops=float(M * (n1 - n0) * S)))

    def op_matmul(self, s, ins, outs, attrs, sched):
        a, b = self.shape(ins[0]), self.shape(ins[1])
        out = self.shape(outs[0])
        r = len(out)
        split = {d: 1 for d in range(r - 2)}
        split[r - 1] = min(16, out[-1]) or 1

        def reads(box):
            ab = _bcast_box((*box[:-2], (0, a[-2]), (0, a[-1])), a)
            ab = (*ab[:-2], (0, a[-2]), (0, a[-1]))
            bb = _bcast_box((*box[:-2], (0, b[-2]), box[-1]), b)
            bb = (*bb[:-2], (0, b[-2]), box[-1])
            return (Access(ins[0], ab), Access(ins[1], bb))

        def cost(box):
            rs = reads(box)
            n = math.prod(y - x for x, y in box)
            return 2.0 * n * a[-1], sum(q.numel * self.itemsize(q.tensor) for q in rs) + n * 4

        if sched.get("split_k", 1) != 1:
            self.diags.append(Diagnostic("split_k is not supported for matmul yet (only linear)",
                                         self._sched_loc(s, "split_k")))
        for box in self.choose(s, out, split, cost, sched):
            self.emit(TaskSpec("matmul", outs[0], reads(box), (Access(outs[0], box),), dict(attrs, _ref=True),
                               flops=cost(box)[0]))

    def op_transpose(self, s, ins, outs, attrs, sched):
        perm = list(attrs["perm"])
        out = self.shape(outs[0])
        split = {0: 1} if out else {}

        def reads(box):
            xb = [None] * len(perm)
            for i, p in enumerate(perm):
                xb[p] = box[i]
            return (Access(ins[0], tuple(xb)),)

        for box in self.choose(s, out, split, self._elem_cost(reads, lambda b: (Access(outs[0], b),)), sched):
            self.emit(TaskSpec("transpose", outs[0], reads(box), (Access(outs[0], box),),
                               dict(attrs, _ref=True)))

    def op_split(self, s, ins, outs, attrs, sched):
        x = self.shape(ins[0])
        axis = attrs.get("axis", -1) % len(x)
        off = 0
        for o in outs:
            sh = self.shape(o)
            split = {d: 1 for d in range(len(sh)) if d != axis}
            for box in self.choose(s, sh, split, self._elem_cost(lambda b, o=o: (Access(o, b),),
                                                                  lambda b, o=o: (Access(o, b),)), {}):
                xb = tuple((a + off, b + off) if d == axis else (a, b) for d, (a, b) in enumerate(box))
                self.emit(TaskSpec("copy", o, (Access(ins[0], xb),), (Access(o, box),)))
            off += sh[axis]

    def op_concat(self, s, ins, outs, attrs, sched):
        out = self.shape(outs[0])
        axis = attrs.get("axis", -1) % len(out)
        off = 0
        for t in ins:
            sh = self.shape(t)
            split = {d: 1 for d in range(len(sh)) if d != axis}
            for box in self.choose(s, sh, split, self._elem_cost(lambda b, t=t: (Access(t, b),),
                                                                  lambda b, t=t: (Access(t, b),)), {}):
                ob = tuple((a + off, b + off) if d == axis else (a, b) for d, (a, b) in enumerate(box))
                self.emit(TaskSpec("copy", outs[0], (Access(t, box),), (Access(outs[0], ob),)))
            off += sh[axis]


def estimate_ns(gpu: GPU, spec: TaskSpec) -> float:
    return task_ns(gpu, spec.flops, spec.bytes)
