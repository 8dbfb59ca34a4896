"""Lower a decode graph to megakernel tasks: fused ops, per-op tasks, events, and per-SM task lists.

The plan is pure data (buffers, tasks with symbolic pointers ``(buffer, byte offset)``); the host runtime
resolves pointers, and :mod:`mpkir.codegen.emit` writes the CUDA source for the variants the plan uses.

Fusions (pattern based, each keeps the reference rounding points):
  rmsnorm -> linear (rmsnorm in the linear's prologue), silu_mul -> linear (prologue),
  linear -> add (residual epilogue), head_rmsnorm -> rope (one task), linear -> argmax (stage 1 in the
  linear's epilogue, stage 2 a task per token), reshape (alias), cast bf16 -> f32 -> linear (the linear
  writes unrounded float32, e.g. f32 logits), and the k/v cache append of a paged_attention in the task
  that computes its k (rope), so every token's k/v is in the cache before any attention of the step reads it.
A graph may end in argmax / greedy sample of a linear (tokens) or return a linear's output (the engine's
logits variant). Rope frequencies (llama3 scaling included) are a float32 table computed on the host.
Events: one per fused op, fired by each of its tasks; a consumer waits for ``tasks(op) * step``.

Tensor parallel (a rank module of the ``shard`` pass, ``world`` ranks): ``allreduce`` (one task per column
tile, the residual add that follows fused), ``allreduce_argmax`` (local (max, index) pairs, then a merge over
the peers) and ``allgather`` (one task per source rank) become collective tasks (codegen/mk_allreduce.cuh,
parameters in codegen/allreduce.py).  Their inputs live in ``sym`` buffers (mapped by the peers); a pointer
into peer q's copy is ``("peer:q:" + buffer, offset)`` and ``("mkpeers", 0)`` is the ``MkPeers`` struct,
both resolved by the host.  Event ids are op indices and every rank's plan has the same ops, so a collective
waits for the SAME event on its peers; the producers of those events signal at system scope (``a[14] = 1``).
Collective tasks are always in the ahead-of-time lists.  One slot per symmetric buffer: a rank's next-step
write of a collective's input comes after its own final op (the merge, which waited on every peer's pairs,
which follow every collective read of that peer's step); ``runtime.multi_sim.check_plans`` runs the rank
plans in random interleavings and checks every peer read sees exactly the current step's tile.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError

NUM_SMS = 132
NT = 512
NWARP = NT // 32
TILE_B = 8
SMEM_LIMIT = 227 * 1024 - 1024
# How the task bodies compute (Plan.numerics):
NUMERICS = {
    "fast": "float32 sums, fast exp; tensor cores for linears above batch 2 (the default)",
    "exact": "float64 sums, exp and square roots, rounded only where the IR rounds, CUDA-core linears at "
    "every batch: the results of any float64 implementation of the same rounding points, bit for bit but "
    "for summation order (about 1e-16), so greedy tokens match such a reference (slower)",
}
LINEAR_TILE_BYTES = 1024 * 1024  # measured: larger tiles win (per-task overhead), see bench/RESULTS.md
BULK_STAGE_BYTES = 16 * 1024  # mk_linear_bulk: weight rows per ring stage, at least one (MPKIR_BULK_STAGE_KB)
BULK_RING_BYTES = 128 * 1024  # ... and the ring's size (MPKIR_BULK_KB), 2 to 8 stages


ROPE_ATTRS = ("theta", "style", "rotary_dim")
ROPE_SCALING_ATTRS = ("scaling", "factor", "low_freq_factor", "high_freq_factor", "original_max_position")


def rope_inv_freq_f32(rd: int, theta: float, scaling: dict):
    """The rope op's inverse frequencies, float32 [rd/2] (float64 formula, rounded once), scaling included."""
    import numpy as np

    try:
        from mpkir.ops.attention import rope_inv_freq
    except ImportError:  # an operator set without rope scaling
        if scaling.get("scaling", "none") not in ("none", None):
            raise
        i = np.arange(rd // 2, dtype=np.float64)
        return (1.0 / theta ** (2.0 * i / rd)).astype(np.float32)
    return np.asarray(rope_inv_freq(rd, theta, **scaling), np.float64).astype(np.float32)


def _neutral(v) -> bool:
    """An attribute value that asks for nothing (so an unknown attribute carrying it can be ignored)."""
    return v is None or (isinstance(v, str) and v.lower() in ("none", "default", ""))


def fbits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def halves64(bits: int) -> tuple[int, int]:
    """A 64-bit pattern as two int32 task parameters (lo, hi)."""
    lo, hi = struct.unpack("<ii", struct.pack("<Q", bits & (2**64 - 1)))
    return lo, hi


def dbits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def bulk_smem(K: int, R: int, rs: int, nst: int, tb: int) -> int:
    """Shared memory of mk_linear_bulk<tb> (codegen/mk_tasks.cuh): ring, x, partials, reduction, barriers."""
    head = nst * rs * K * 2 + tb * K * 2 + R * tb * (K // 256) * 4 + NWARP * TILE_B * 4
    return -(-head // 8) * 8 + nst * 8


SAMPLE_SMEM = NT * 8 + NT * 4 + 256 * 8 + 256 * 4 + 64  # MK_SMP_SMEM of codegen/mk_sample.cuh


@dataclass
class Buffer:
    name: str
    kind: str  # weight | state | act | input | scratch | output | const
    shape: tuple[int, ...]
    dtype: str  # bf16 | f32 | f64 | i32
    checkpoint: str | None = None  # weights: checkpoint tensor name (tied weights share one buffer)
    data: object = None  # const: the values (a NumPy array the host uploads once)

    @property
    def itemsize(self) -> int:
        return {"bf16": 2, "f32": 4, "f64": 8, "i32": 4}[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass
class Task:
    variant: str
    p: dict[int, tuple[str, int]]
    a: dict[int, int]
    cost: float = 1.0
    prefetch: tuple[str, int, int] | None = None  # (buffer, byte offset, bytes)


@dataclass
class Op:
    name: str
    kind: str
    tasks: list[Task]
    deps: list[tuple[int, int]] = field(default_factory=list)  # (op index, lag in steps)
    jit: bool = False
    first_task: int = 0


@dataclass
class Plan:
    model: str
    max_tokens: int
    batch: int
    buffers: dict[str, Buffer]
    ops: list[Op]
    inputs: dict[str, str]  # graph parameter -> buffer
    output: str  # token output buffer (i32 [maxB])
    logits: str | None
    lists: list[list[int]]  # per SM: task ids (>= 0) or JIT slots -(op+1)
    smem_bytes: int
    variants: list[str]
    num_sms: int = NUM_SMS  # workers (one CTA each)
    world: int = 1  # tensor-parallel ranks (collective tasks present when > 1)
    sched_warps: int = 0  # scheduler warps launching the JIT ops, in one more CTA (0: ticket claims, no CTA)
    numerics: str = "fast"  # fast | exact (see NUMERICS)

    @property
    def grid(self) -> int:
        """CTAs of a launch: the workers, and the scheduler CTA if any."""
        return self.num_sms + (1 if self.sched_warps else 0)

    @property
    def num_tasks(self) -> int:
        return sum(len(o.tasks) for o in self.ops)

    def weight_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values() if b.kind == "weight")


def env_int(name: str, default: int) -> int:
    """An integer code-generation switch from the environment (``default`` when unset); a value that is not
    an integer is an error naming the variable."""
    v = os.environ.get(name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r}: expected an integer") from None


def _err(msg: str, stmt=None) -> MpkError:
    return MpkError(Diagnostic(msg, getattr(stmt, "loc", None)))


class _Lowerer:
    def __init__(self, module: ir.Module, analysis, num_sms: int, greedy: bool, batch: int | None,
                 world: int | None = None, sched: bool = False, numerics: str = "fast"):
        from mpkir.passes.unroll import unroll
        from mpkir.semantics import build_env, resolve_type
        from mpkir.serve import serve_config

        self.m = unroll(module)
        self.num_sms = num_sms
        self.greedy = greedy
        self.sched = sched  # JIT ops launched by scheduler warps (a scheduler CTA beside num_sms workers)
        if numerics not in NUMERICS:
            raise ValueError(f"numerics={numerics!r}: expected one of {', '.join(NUMERICS)}")
        self.exact = numerics == "exact"
        self.acc, self.acc_size = ("f64", 8) if self.exact else ("f32", 4)  # mk_acc of codegen/mk_tasks.cuh
        self.env, _ = build_env(self.m)
        sd = next((d for d in self.m.decls if isinstance(d, ir.ServeDecl)), None)
        self.serve, _ = serve_config(sd, self.env)
        self.resolve_type = resolve_type
        self.maxB = int(self.serve.max_tokens)
        tp = any(isinstance(s, ir.OpStmt) and s.op in ("allreduce", "allgather", "allreduce_argmax")
                 for d in self.m.decls if isinstance(d, ir.GraphDecl) for s in d.body)
        self.world = int(world or (getattr(self.serve, "gpus", 1) if tp else 1) or 1)
        self.B = min(self.maxB, batch or self.maxB)  # live tokens: tasks of tokens >= B are left out
        if self.exact and self.world > 1:
            raise _err("exact numerics are for one GPU (the collectives sum in float32)")
        graphs = [d for d in self.m.decls if isinstance(d, ir.GraphDecl)]
        if not graphs:
            raise _err("no graph to compile")
        self.g = graphs[0]
        self.types: dict[str, ir.TensorType] = {p.name: resolve_type(p.type, self.env) for p in self.g.params}
        self.gtypes = {
            d.name: resolve_type(d.type, self.env)
            for d in self.m.decls
            if isinstance(d, (ir.WeightDecl, ir.StateDecl))
        }
        self.buffers: dict[str, Buffer] = {}
        self.values: dict[str, tuple[str, tuple[int, ...], str]] = {}  # ssa -> (buffer, shape, dtype)
        self.producer: dict[str, int] = {}  # buffer -> op index
        self.ops: list[Op] = []
        self.weight_decls = {d.name: d for d in self.m.decls if isinstance(d, (ir.WeightDecl, ir.StateDecl))}

    # ---------------------------------------------------------------- helpers
    def shape(self, t: ir.TensorType) -> tuple[int, ...]:
        out = []
        for d in t.shape:
            if isinstance(d, int):
                out.append(d)
            else:
                out.append(int(self.env.dims[d]))
        return tuple(out)

    def add_buffer(self, name, kind, shape, dtype, checkpoint=None) -> str:
        if name not in self.buffers:
            self.buffers[name] = Buffer(name, kind, tuple(shape), dtype, checkpoint)
        return name

    def glob(self, ref: ir.GlobalRef) -> str:
        d = self.weight_decls[ref.name]
        layer = None
        if ref.index is not None:
            from mpkir.semantics import eval_int

            layer = eval_int(ref.index, self.env, "layer index")
        t = self.gtypes[ref.name]
        shape = self.shape(t)
        if isinstance(d, ir.WeightDecl):
            ck = d.checkpoint_name(layer)
            if getattr(d, "shard", None) is not None:  # a rank's slice (tied weights: other slices)
                from mpkir.models.shard import weight_key

                ck = weight_key(d, layer, self.env)
            return self.add_buffer("w:" + ck, "weight", shape, t.dtype.value, ck)
        name = f"s:{ref.name}" + (f"[{layer}]" if layer is not None else "")
        return self.add_buffer(name, "state", shape, t.dtype.value)

    def val(self, operand) -> str:
        if isinstance(operand, ir.GlobalRef):
            return self.glob(operand)
        return self.values[operand.name][0]

    def vshape(self, operand) -> tuple[int, ...]:
        if isinstance(operand, ir.GlobalRef):
            return self.buffers[self.glob(operand)].shape
        return self.values[operand.name][1]

    def new_act(self, ssa: str, t: ir.TensorType) -> str:
        shape = self.shape(t)
        name = self.add_buffer("v:" + ssa, "act", shape, t.dtype.value)
        self.values[ssa] = (name, shape, t.dtype.value)
        return name

    def attrs(self, stmt) -> dict:
        from mpkir.semantics import eval_expr

        out = {}
        for at in stmt.attrs:
            v = at.value
            if isinstance(v, ir.Name) and v.id not in self.env.consts and v.id not in self.env.dims:
                out[at.key] = v.id  # enum
            elif isinstance(v, (ir.Str, ir.Bool)):
                out[at.key] = v.value
            elif isinstance(v, ir.ListVal):
                out[at.key] = [eval_expr(x, self.env, allow_dims=True) for x in v.items]
            else:
                out[at.key] = eval_expr(v, self.env)
        return out

    def infer(self, s: ir.OpStmt) -> ir.TensorType:
        """Result type of the ops this backend supports (the operator registry may not know them yet)."""

        def t(o):
            if isinstance(o, ir.GlobalRef):
                return self.gtypes[o.name]
            return self.types[o.name]

        x = t(s.operands[0])
        if s.op == "embedding":
            tab = t(s.operands[1])
            return ir.TensorType(tab.dtype, (*x.shape, tab.shape[-1]))
        if s.op == "linear":
            w = t(s.operands[1])
            return ir.TensorType(x.dtype, (*x.shape[:-1], w.shape[0]))
        if s.op == "reshape":
            return ir.TensorType(x.dtype, tuple(self.attrs(s)["shape"]))
        if s.op == "cast":
            return ir.TensorType(ir.DType(str(self.attrs(s)["dtype"])), x.shape)
        if s.op in ("argmax", "sample", "allreduce_argmax"):
            return ir.TensorType(ir.DType.i32, x.shape[:-1])
        if s.op == "allgather":  # the ranks' blocks side by side along axis
            a = self.attrs(s)
            ax = int(a.get("axis", -1)) % len(x.shape)
            n = x.shape[ax]
            if not isinstance(n, int):
                raise _err("allgather along a symbolic dim is not supported on the GPU", s)
            shape = list(x.shape)
            shape[ax] = n * int(a.get("parts", self.world))
            return ir.TensorType(x.dtype, tuple(shape))
        if s.op == "silu_mul" and len(s.operands) == 1:
            return ir.TensorType(x.dtype, (*x.shape[:-1], x.shape[-1] // 2))
        return x

    def add_op(self, name, kind, tasks, reads, writes, jit=False) -> int:
        deps = sorted({(self.producer[b], 0) for b in reads if b in self.producer})
        idx = len(self.ops)
        self.ops.append(Op(name, kind, tasks, [d for d in deps], jit))
        for b in writes:
            self.producer[b] = idx
        return idx

    # ---------------------------------------------------------------- lowering
    def run(self) -> Plan:
        body = [s for s in self.g.body if isinstance(s, ir.OpStmt)]
        ret = next(s for s in self.g.body if isinstance(s, ir.ReturnStmt))
        uses: dict[str, list[ir.OpStmt]] = {}
        for s in body:
            for o in s.operands:
                if isinstance(o, ir.ValueRef):
                    uses.setdefault(o.name, []).append(s)
        for v in ret.values:
            uses.setdefault(v.name, []).append(ret)
        by_result = {r: s for s in body for r in s.results}
        self.uses, self.by_result = uses, by_result
        # graph inputs
        self.inputs = {}
        for p in self.g.params:
            t = self.types[p.name]
            b = self.add_buffer("in:" + p.name, "input", self.shape(t), t.dtype.value)
            self.values[p.name] = (b, self.shape(t), t.dtype.value)
            self.inputs[p.name] = b
        if "positions" in self.inputs:  # live positions (advanced in-kernel by the embedding tasks)
            self.add_buffer("in:positions0", "input", self.buffers["in:positions"].shape, "i32")
        self.add_buffer("hist", "output", (1, self.maxB), "i32")  # resized by the host (steps)
        self.fused: set[int] = set()
        self.appended: set[int] = set()  # paged_attention statements whose k/v a rope task appends
        self.embed_op = None
        self.final_op = None
        self.logits = None
        for s in body:
            for r in s.results:
                self.types[r] = self.infer(s)
        for s in body:
            if id(s) in self.fused:
                continue
            getattr(self, "op_" + s.op, self.unsupported)(s)
        out = self.values[ret.values[0].name][0]
        if self.final_op is None:
            # a graph that returns the logits (the engine's variant): the producing linear ends the step
            prod = self.producer.get(out)
            if prod is None or self.ops[prod].kind != "linear" or len(ret.values) != 1:
                raise _err(
                    "the graph must end in argmax (or greedy sample) of a linear, or return the output of "
                    "a linear (logits), for the GPU backend",
                    ret,
                )
            self.final_op, self.logits = prod, out
        # the next step's embedding waits for this step's tokens (WAR safety: every op is its ancestor)
        if self.embed_op is not None:
            self.ops[self.embed_op].deps.append((self.final_op, 1))
        consumers = {d for o in self.ops for d, lag in o.deps if lag == 0}
        leaves = [i for i in range(len(self.ops)) if i not in consumers and i != self.final_op]
        self.ops[self.final_op].deps.extend((i, 0) for i in leaves)
        return self.finish(out)

    def unsupported(self, s):
        raise _err(f"op '{s.op}' is not supported by the GPU backend yet", s)

    def single_use(self, ssa: str):
        u = self.uses.get(ssa, [])
        return u[0] if len(u) == 1 and isinstance(u[0], ir.OpStmt) else None

    def op_reshape(self, s):
        src = self.val(s.operands[0])
        t = self.types[s.results[0]]
        self.values[s.results[0]] = (src, self.shape(t), t.dtype.value)

    def op_embedding(self, s):
        table = self.val(s.operands[1])
        V, H = self.buffers[table].shape
        out = self.new_act(s.results[0], self.types[s.results[0]])
        tok = self.val(s.operands[0])
        tasks = []
        for b in range(self.B):
            tasks.append(
                Task(
                    "mk_embedding",
                    {
                        0: (table, 0),
                        1: (out, 0),
                        2: (tok, 0),
                        3: ("hist", 0),
                        4: ("in:positions", 0),
                        5: ("in:positions0", 0),
                    },
                    {16: H, 17: b, 18: self.maxB, 19: V},
                    cost=H * 2,
                )
            )
        self.embed_op = self.add_op(s.results[0], "embedding", tasks, [tok], [out, "in:positions"])

    def _linear_x_only(self, ssa: str) -> bool:
        """Every use of ``ssa`` is the x of a bias-free linear, possibly through a cast to f32."""
        users = self.uses.get(ssa, [])
        return bool(users) and all(
            isinstance(u, ir.OpStmt)
            and (
                (u.op == "linear" and u.operands[0] == ir.ValueRef(ssa) and len(u.operands) == 2)
                or (self._is_f32_cast(u) and self._linear_x_only(u.results[0]))
            )
            for u in users
        )

    def _is_f32_cast(self, s) -> bool:
        return s.op == "cast" and str(self.attrs(s).get("dtype")) == "f32"

    def op_cast(self, s):
        # bf16 -> f32 feeding linears only: the linear reads the bf16 values (exact) and writes f32
        src = s.operands[0]
        if (
            isinstance(src, ir.ValueRef)
            and self._is_f32_cast(s)
            and self.values[src.name][2] == "bf16"
            and self._linear_x_only(s.results[0])
        ):
            self.values[s.results[0]] = self.values[src.name]
            return
        raise _err("cast is supported on the GPU only from bf16 to f32 in front of a linear", s)

    def op_rmsnorm(self, s):
        # fused into each consuming linear's prologue when every consumer is a linear reading it as x
        if self._linear_x_only(s.results[0]):
            x = self.values[s.operands[0].name]
            self.values[s.results[0]] = ("rms", (s.operands[0].name, s.operands[1], self.eps(s)), x[2])
            return
        x = self.val(s.operands[0])
        shp = self.vshape(s.operands[0])
        w = self.val(s.operands[1])
        H = shp[-1]
        out = self.new_act(s.results[0], self.types[s.results[0]])
        t = Task("mk_rmsnorm", {0: (x, 0), 1: (w, 0), 2: (out, 0)}, {16: H, 17: fbits(self.eps(s)), 18: H})
        self.add_op(s.results[0], "rmsnorm", [t], [x], [out])

    def eps(self, s) -> float:
        a = self.attrs(s)
        if "eps" in a:
            return float(a["eps"])
        v = s.attr("eps")
        from mpkir.semantics import eval_expr

        return float(eval_expr(v, self.env)) if v is not None else 1e-6

    def op_silu_mul(self, s):
        user = self.single_use(s.results[0])
        if user is not None and user.op == "linear" and len(s.operands) == 2 and len(user.operands) == 2:
            self.values[s.results[0]] = ("silu", (s.operands[0].name, s.operands[1].name), "bf16")
            return
        if len(s.operands) != 2:
            raise _err("silu_mul with one operand is not supported on GPU yet", s)
        self._eltwise(s, 1)

    def op_add(self, s):
        self._eltwise(s, 0)

    def _eltwise(self, s, code):
        a, b = self.val(s.operands[0]), self.val(s.operands[1])
        shp = self.vshape(s.operands[0])
        if self.vshape(s.operands[1]) != shp:
            raise _err("broadcasting add is not supported on GPU yet", s)
        out = self.new_act(s.results[0], self.types[s.results[0]])
        n = shp[-1]
        t = Task("mk_eltwise", {0: (a, 0), 1: (b, 0), 2: (out, 0)}, {16: n, 17: n, 18: code})
        self.add_op(s.results[0], s.op, [t], [a, b], [out])

    def op_linear(self, s):
        if len(s.operands) != 2:
            raise _err("linear with bias is not supported on GPU yet", s)
        xin = s.operands[0]
        W = self.val(s.operands[1])
        N, K = self.buffers[W].shape
        if K % 8:
            raise _err(f"linear K={K} must be a multiple of 8 on GPU", s)
        p: dict[int, tuple[str, int]] = {}
        a: dict[int, int] = {16: K, 19: K}
        reads = []
        src = self.values[xin.name]
        if src[0] == "rms":
            xname, wref, eps = src[1]
            x = self.values[xname][0]
            p[0] = (x, 0)
            p[4] = (self.val(wref), 0)
            a[20], a[21] = 1, fbits(eps)
            reads = [x]
        elif src[0] == "silu":
            g, u = self.values[src[1][0]][0], self.values[src[1][1]][0]
            p[0], p[5] = (g, 0), (u, 0)
            a[20] = 2
            reads = [g, u]
        else:
            p[0] = (src[0], 0)
            a[20] = 0
            reads = [src[0]]
        res_name = s.results[0]
        user = self.single_use(s.results[0])
        epi = 0
        resid = None
        argmax_stmt = None
        if (
            user is not None
            and user.op == "add"
            and self.shape(
                self.types[user.operands[0].name]
                if isinstance(user.operands[0], ir.ValueRef)
                else self.gtypes[user.operands[0].name]
            )
            == self.shape(
                self.types[user.operands[1].name]
                if isinstance(user.operands[1], ir.ValueRef)
                else self.gtypes[user.operands[1].name]
            )
        ):
            other = [o for o in user.operands if not (isinstance(o, ir.ValueRef) and o.name == s.results[0])]
            if len(other) == 1:
                resid = self.val(other[0])
                epi |= 1
                self.fused.add(id(user))
                res_name = user.results[0]
                reads.append(resid)
        if user is not None and (user.op == "argmax" or (user.op == "sample" and self._greedy_sample(user))):
            epi |= 2
            argmax_stmt = user
        f32_out = self.types[s.results[0]].dtype == ir.DType.f32
        if f32_out and epi & 1:
            raise _err("a float32 linear with a fused residual add is not supported on the GPU", s)
        if f32_out:
            a[25] = 1  # float32 output (no bf16 rounding), e.g. the logits
        out = self.new_act(res_name, self.types[res_name])
        osz = 4 if f32_out else 2
        if res_name != s.results[0]:
            self.values[s.results[0]] = self.values[res_name]
        R = self.rows_per_task(self.sibling_rows(s, N, K), K)
        ntile = (N + R - 1) // R
        part = None
        if epi & 2:
            part = self.add_buffer(f"argpart:{s.results[0]}", "scratch", (ntile, self.maxB, 2), "f32")
        mode_mma = os.environ.get("MPKIR_MMA", "auto")
        mma = K % 32 == 0 and (mode_mma == "1" or (mode_mma == "auto" and self.B > 2)) and not self.exact
        # weight streams (bench/RESULTS.md, H100 2026-12-05): mk_linear_mma bit 1 double-buffers the K blocks
        # (Qwen3-8B b8 13.1 -> 11.2 ms/step), bit 2 loads the first before the wait (slower: 14.0); mk_linear
        # 1 double-buffers rows (Llama-1B b1 2.03 -> 2.00)
        pipe = env_int("MPKIR_MMA_PIPE", 1)
        gemv_pipe = env_int("MPKIR_GEMV_PIPE", 1)

        def mma_smem(ng: int) -> int:  # x of 8*ng tokens, split-K partials, rmsnorm reduction
            return TILE_B * ng * (K + 32) * 2 + ng * NWARP * 128 * 4 + NWARP * TILE_B * 4

        # token groups of 8 sharing each weight load: enough for the batch when shared memory allows
        groups = -(-self.B // TILE_B)
        fits = [ng for ng in (1, 2, 4) if mma_smem(ng) <= SMEM_LIMIT]
        ng = next((n for n in fits if n >= groups), fits[-1])
        bulk = None if mma else self.bulk_ring(K, R)
        if mma:
            smem = mma_smem(ng)
        elif bulk:
            smem = bulk_smem(K, R, *bulk, self.B)
        else:
            smem = TILE_B * K * 2 + 2 * NWARP * TILE_B * self.acc_size
        self.smem = max(getattr(self, "smem", 0), smem)
        if smem > SMEM_LIMIT:
            raise _err(f"linear K={K} needs {smem} B of shared memory (limit {SMEM_LIMIT})", s)
        tasks = []
        for i in range(ntile):
            n0 = i * R
            r = min(R, N - n0)
            tp = dict(p)
            tp[1] = (W, n0 * K * 2)
            tp[2] = (out, n0 * osz)
            if resid:
                tp[3] = (resid, n0 * 2)
            if part:
                tp[6] = (part, i * self.maxB * 8)
            ta = dict(a)
            ta.update({17: r, 18: N, 22: epi, 23: n0})
            if mma:
                widths = (2, 1) if pipe & 1 else (4, 2, 1)  # double-buffered: half the loads per buffer
                u = next(u for u in widths if K % (32 * u) == 0)
                variant = f"mk_linear_mma<{u},{ng},{pipe}>"
            elif bulk:
                ta[26], ta[27] = bulk
                variant = f"mk_linear_bulk<{self.B}>"
            else:
                u = max(1, min(8, math.ceil(K / 8 / max(1, NWARP // max(r, 1)) / 32)))
                u = 1 << (u - 1).bit_length()
                u_max = env_int("MPKIR_GEMV_U_MAX", 4 if gemv_pipe else 8)  # pipe: 2 buffers
                variant = f"mk_linear<{min(u, u_max)},{gemv_pipe}>"
            tasks.append(Task(variant, tp, ta, cost=r * K * 2 + 4096, prefetch=(W, n0 * K * 2, r * K * 2)))
        writes = [out] + ([part] if part else [])
        self.add_op(res_name, "linear", tasks, reads, writes)
        if argmax_stmt is not None:
            self.logits = out
            self.fused.add(id(argmax_stmt))
            outb = self.new_act(argmax_stmt.results[0], self.types[argmax_stmt.results[0]])
            ft = [
                Task(
                    "mk_argmax_final",
                    {0: (part, 0), 1: (outb, 0), 2: ("hist", 0)},
                    {16: ntile, 17: b, 18: self.maxB},
                )
                for b in range(self.B)
            ]
            self.final_op = self.add_op(argmax_stmt.results[0], "argmax", ft, [part], [outb, "hist"])

    def _greedy_sample(self, s) -> bool:
        a = self.attrs(s)
        return self.greedy or float(a.get("temperature", 1.0)) == 0.0

    def op_argmax(self, s):
        if self.world > 1:  # of gathered logits (tensor parallel)
            return self._argmax_peers(s, 0)
        raise _err("argmax must directly follow a linear (lm_head) on the GPU backend", s)

    def op_sample(self, s):
        if self.world > 1 and self._greedy_sample(s):
            return self._argmax_peers(s, 0)
        if self.world > 1:
            raise _err("sampling with temperature > 0 is not implemented with tensor parallelism yet", s)
        if self._greedy_sample(s):
            raise _err("greedy sample must directly follow a linear (lm_head) on the GPU backend", s)
        # one mk_sample task per token row (codegen/mk_sample.cuh): temperature, top-k, top-p, Gumbel-max
        logits, pos = self.val(s.operands[0]), self.val(s.operands[1])
        lt = self.types[s.operands[0].name] if isinstance(s.operands[0], ir.ValueRef) else None
        if lt is None or lt.dtype not in (ir.DType.bf16, ir.DType.f32):
            raise _err("sample on the GPU needs bf16 or f32 logits computed by the graph", s)
        V = self.shape(lt)[-1]
        a = self.attrs(s)
        outb = self.new_act(s.results[0], self.types[s.results[0]])
        params = {16: V, 18: self.maxB, 19: int(lt.dtype == ir.DType.f32), 20: V, 23: int(a.get("top_k", 0))}
        params[21], params[22] = halves64(dbits(a.get("temperature", 1.0)))
        params[24], params[25] = halves64(dbits(a.get("top_p", 1.0)))
        params[26], params[27] = halves64(int(a.get("seed", 0)))
        tasks = [Task("mk_sample", {0: (logits, 0), 1: (outb, 0), 2: ("hist", 0), 3: (pos, 0)},
                      {**params, 17: b}, cost=V * 4 * 12) for b in range(self.B)]
        self.smem = max(getattr(self, "smem", 0), SAMPLE_SMEM)
        self.logits = logits
        self.final_op = self.add_op(s.results[0], "sample", tasks, [logits, pos], [outb, "hist"])

    def sibling_rows(self, s, N: int, K: int) -> list[int]:
        """The row counts that share this linear's tiling: with MPKIR_COTILE (default on), those of every
        bias-free linear of the same K reading the same x (q/k/v, gate/up), so siblings are cut into tiles of
        one size and together take one task per worker instead of each op one per worker; else ``[N]``."""
        if os.environ.get("MPKIR_COTILE", "1") == "0":
            return [N]
        x = s.operands[0]
        sib = [
            u for u in self.uses.get(x.name, [])
            if isinstance(u, ir.OpStmt) and u.op == "linear" and len(u.operands) == 2 and u.operands[0] == x
        ]
        rows = [self.buffers[self.val(u.operands[1])].shape for u in sib]  # (op_linear refused a bias)
        return [n for n, _ in rows] if all(k == K for _, k in rows) else [N]

    def bulk_ring(self, K: int, R: int) -> tuple[int, int] | None:
        """``(rows per stage, stages)`` of mk_linear_bulk for a CUDA-core tile of R rows of K, or None where
        the register-streaming mk_linear serves: by default (MPKIR_GEMV=bulk asks for it; slower on the
        H100, bench/RESULTS.md), K not a multiple of 256, or no room."""
        if os.environ.get("MPKIR_GEMV", "regs") != "bulk" or K % 256 or self.exact:
            return None
        stage = env_int("MPKIR_BULK_STAGE_KB", BULK_STAGE_BYTES // 1024) * 1024
        rs = max(1, stage // (K * 2))
        ring = env_int("MPKIR_BULK_KB", BULK_RING_BYTES // 1024) * 1024
        for nst in range(min(8, max(2, ring // (rs * K * 2))), 1, -1):
            if bulk_smem(K, R, rs, nst, self.B) <= SMEM_LIMIT:
                return rs, nst
        return None

    def claim_just_in_time(self, n_tasks: int) -> bool:
        """Whether an attention op's tasks are handed out at run time (to whichever workers reach the op's
        slot: launched by scheduler warps or claimed by tickets, :func:`jit_queue_mode`) instead of placed in
        the workers' ahead-of-time lists. MPKIR_JIT=1 or 0 decides; by default only ops of more than eight
        waves of tasks. Placed tasks won every measured size (Llama-3.2-1B, H100, bench/RESULTS.md: 1.385
        ms/step placed, 1.502 scheduler-launched, 1.751 ticket-claimed at batch 1; 17.80, 18.16 and 18.66
        at batch 128, 7.8 waves) when every request has the same context; with contexts of uneven length,
        run time won by 1-3 % from 64 tokens on, which the plan cannot know (``MPKIR_JIT=1`` for engines
        that expect them). Larger ops are not measured."""
        mode = os.environ.get("MPKIR_JIT", "auto")
        return mode == "1" or (mode == "auto" and n_tasks > 8 * self.num_sms)

    def rows_per_task(self, rows: list[int], K: int) -> int:
        """Rows per tile for linears of ``rows`` rows each (siblings tiled together) and K: the smallest tile
        within MPKIR_TILE_KB whose tiles, counted per linear, fill whole waves of the workers (so three
        siblings' rounded-up tile counts never spill one task into a second wave)."""
        k = 1
        while True:
            cap = self.num_sms * k
            R = math.ceil(sum(rows) / cap)
            while sum(-(-n // R) for n in rows) > cap:
                R += 1
            if env_int("MPKIR_TILE_KB", LINEAR_TILE_BYTES // 1024) * 1024 >= R * K * 2 or R == 1:
                return R
            k += 1

    def op_head_rmsnorm(self, s):
        user = self.single_use(s.results[0])
        if user is not None and user.op == "rope" and user.operands[0] == ir.ValueRef(s.results[0]):
            self.fused.add(id(user))
            self._norm_rope(s, user)
        else:
            self._norm_rope(s, None)

    def op_rope(self, s):
        self._norm_rope(None, s)

    def _attention_of_k(self, ssa: str):
        """The paged_attention statement that takes ``ssa`` as its k operand (its only use), or None."""
        u = self.single_use(ssa)
        if u is None or u.op != "paged_attention" or u.operands[1] != ir.ValueRef(ssa):
            return None
        ready = all(not isinstance(o, ir.ValueRef) or o.name in self.values for o in u.operands[2:8])
        return u if ready else None

    def _kv_append_params(self, att, p, a, reads, writes):
        """Cache-append parameters of a task that writes token b's k (its output) and v into the caches."""
        v, kc, vc, pt = (self.val(o) for o in att.operands[2:6])
        sid = self.val(att.operands[7])
        _P, PG, _Hkv, _D = self.buffers[kc].shape
        p.update({4: (v, 0), 5: (kc, 0), 6: (vc, 0), 7: (pt, 0), 8: (sid, 0)})
        a.update({23: PG, 24: self.buffers[pt].shape[1]})
        reads += [v, pt, sid]
        writes += [kc, vc]
        self.appended.add(id(att))

    def _norm_rope(self, norm, rope):
        first = norm or rope
        last = rope or norm
        x = self.val(first.operands[0])
        _Bm, H, D = self.vshape(first.operands[0])
        out = self.new_act(last.results[0], self.types[last.results[0]])
        p = {0: (x, 0), 2: (out, 0), 3: ("in:positions", 0)}
        a = {16: H, 17: D, 20: 0, 22: D}
        reads = [x, "in:positions"]
        writes = [out]
        att = self._attention_of_k(last.results[0])
        if att is not None:  # k of an attention: append k and v to the caches here (before any reader)
            self._kv_append_params(att, p, a, reads, writes)
            a[20] |= 4
        if norm is not None:
            p[1] = (self.val(norm.operands[1]), 0)
            a[18] = fbits(self.eps(norm))
            a[20] |= 1
        if rope is not None:
            ra = self.attrs(rope)
            if str(ra.get("style", "neox")) != "neox":
                raise _err("only neox-style rope is supported on GPU", rope)
            extra = sorted(
                k for k, v in ra.items() if k not in ROPE_ATTRS + ROPE_SCALING_ATTRS and not _neutral(v)
            )
            kind = str(ra.get("scaling", "none"))
            if extra or kind not in ("none", "llama3"):
                what = ", ".join(extra) if extra else f"scaling={kind}"
                raise _err(
                    f"rope attribute(s) {what} not supported by the GPU backend; it implements theta, "
                    "style=neox, rotary_dim and scaling=llama3 (factor, low/high_freq_factor, "
                    "original_max_position)",
                    rope,
                )
            theta = float(ra.get("theta", 10000.0))
            a[19] = fbits(theta)
            rd = int(ra.get("rotary_dim", 0) or D)
            a[22] = rd
            a[20] |= 2
            scaling = {k: ra[k] for k in ROPE_SCALING_ATTRS if k in ra}
            try:
                inv = rope_inv_freq_f32(rd, theta, scaling)
            except (ValueError, TypeError, ImportError) as e:
                raise _err(f"rope scaling: {e}", rope) from None
            sc = ",".join(f"{k}={v!r}" for k, v in sorted(scaling.items()))
            key = f"const:rope_inv:{theta!r},{rd},{sc}"
            if key not in self.buffers:
                self.buffers[key] = Buffer(key, "const", (rd // 2,), "f32", data=inv)
            p[9] = (key, 0)
        if D % 32 and D not in (64, 128):
            raise _err(f"head dim {D} not supported", first)
        tasks = []
        for b in range(self.B):
            ta = dict(a)
            ta[21] = b
            tasks.append(Task(f"mk_head_norm_rope<{D}>", dict(p), ta, cost=H * D * 4))
        self.smem = max(getattr(self, "smem", 0), NWARP * D * self.acc_size)
        self.add_op(last.results[0], "norm_rope", tasks, reads, writes)

    def op_paged_attention(self, s):
        if id(s) not in self.appended:  # k not from a rope task: a k/v append op of its own first
            self._kv_append_op(s)
        q, k, v, kc, vc, pt, pos, sid = (self.val(o) for o in s.operands[:8])
        _, Hq, D = self.vshape(s.operands[0])
        Hkv = self.vshape(s.operands[1])[1]
        _P, PG, _, _ = self.buffers[kc].shape
        PPS = self.buffers[pt].shape[1]
        G = Hq // Hkv
        if D not in (64, 128) or not 1 <= G <= 8 or Hq % Hkv:
            raise _err(f"paged_attention with head_dim {D}, group {G} not supported on GPU", s)
        a_ = self.attrs(s)
        scale = float(a_.get("scale", 0.0) or 0.0) or 1.0 / math.sqrt(D)
        S = max(1, min(16, self.num_sms // (Hkv * self.B)))
        out = self.new_act(s.results[0], self.types[s.results[0]])
        part = (
            self.add_buffer(f"attnpart:{s.results[0]}", "scratch", (self.maxB, Hkv, S, G, D + 2), self.acc)
            if S > 1
            else None
        )
        tasks = []
        for b in range(self.B):
            for h in range(Hkv):
                for sp in range(S):
                    p = {
                        0: (q, 0),
                        1: (k, 0),
                        2: (v, 0),
                        3: (kc, 0),
                        4: (vc, 0),
                        5: (pt, 0),
                        6: (pos, 0),
                        7: (sid, 0),
                        8: (part or out, 0),
                    }
                    tasks.append(
                        Task(
                            f"mk_attention<{D},{G}>",
                            p,
                            {16: b, 17: h, 18: sp, 19: S, 20: Hkv, 21: PG, 22: PPS, 23: fbits(scale), 24: 0},
                        )
                    )
        NP = NWARP * (32 // (D // 8))
        smem = NP * G * (D + 2) * self.acc_size
        if smem > SMEM_LIMIT:
            raise _err(f"paged_attention with group {G} needs {smem} B of shared memory (limit {SMEM_LIMIT})"
                       + (" in exact numerics" if self.exact else ""), s)
        self.smem = max(getattr(self, "smem", 0), smem)
        self.add_op(
            s.results[0] + ".split",
            "attention",
            tasks,
            [q, k, v, pt, pos, sid, kc, vc],
            [part or out],
            jit=self.claim_just_in_time(len(tasks)),
        )
        if part:
            mt = [
                Task(
                    "mk_attention_merge",
                    {0: (part, 0), 1: (out, 0)},
                    {16: b, 17: h, 18: S, 19: Hkv, 20: G, 21: D},
                )
                for b in range(self.B)
                for h in range(Hkv)
            ]
            self.add_op(s.results[0], "attention_merge", mt, [part], [out])

    def _kv_append_op(self, s):
        """Write every live token's k and v into the caches (all before the attention of the step reads
        them: tokens of one request in one step — a prefill chunk — see each other's keys)."""
        k = self.val(s.operands[1])
        _Bm, Hkv, D = self.vshape(s.operands[1])
        p = {0: (k, 0), 3: (self.val(s.operands[6]), 0)}
        a = {16: Hkv, 17: D}
        reads, writes = [k, p[3][0]], []
        self._kv_append_params(s, p, a, reads, writes)
        tasks = []
        for b in range(self.B):
            ta = dict(a)
            ta[21] = b
            tasks.append(Task("mk_kv_append", dict(p), ta, cost=Hkv * D * 4))
        self.add_op(s.results[0] + ".kv_append", "kv_append", tasks, reads, writes)

    # ---------------------------------------------------------------- collectives (tensor parallel)
    def _symmetric(self, s, operand) -> tuple[str, int]:
        """The collective's input as a symmetric buffer (peers map it) and its producer op (event)."""
        x = self.val(operand)
        prod = self.producer.get(x)
        b = self.buffers[x]
        if prod is None or b.kind not in ("act", "sym"):
            raise _err(f"'{s.op}' on the GPU needs an input computed by the graph (got {x})", s)
        b.kind = "sym"
        op = self.ops[prod]
        op.jit = False
        for t in op.tasks:
            t.a[14] = 1  # signal at system scope: peers wait on this event
        return x, prod

    def _peer_ptrs(self, buf: str, off: int) -> dict[int, tuple[str, int]]:
        if not 1 <= self.world <= 8:
            from mpkir.codegen.allreduce import MAX_RANKS

            raise _err(f"tensor parallel over {self.world} GPUs: 1..{MAX_RANKS} supported")
        return {q: (f"peer:{q}:{buf}", off) for q in range(self.world)}

    def op_allreduce(self, s):
        from mpkir.codegen.allreduce import AllreduceTile

        x, prod = self._symmetric(s, s.operands[0])
        shp = self.vshape(s.operands[0])
        dt = self.buffers[x].dtype
        if len(shp) != 2 or shp[0] != self.maxB or dt not in ("bf16", "f32"):
            raise _err(f"allreduce on the GPU takes a [tokens, n] bf16/f32 tensor, got {dt}{list(shp)}", s)
        H = shp[1]
        res, reads = s.results[0], [x]
        resid = None
        user = self.single_use(s.results[0])
        if user is not None and user.op == "add" and dt == "bf16":
            other = [o for o in user.operands if o != ir.ValueRef(s.results[0])]
            if len(other) == 1 and self.vshape(other[0]) == shp:
                resid = self.val(other[0])
                reads.append(resid)
                self.fused.add(id(user))
                res = user.results[0]
        out = self.new_act(res, self.types[res])
        if res != s.results[0]:
            self.values[s.results[0]] = self.values[res]
        esz = self.buffers[x].itemsize
        cols = next((c for c in (256, 128, 64, 32, 16, 8) if H % c == 0), None)
        if cols is None or (dt == "f32" and cols % 4):
            raise _err(f"allreduce of width {H}: needs a multiple of 8 columns on the GPU", s)
        tile = AllreduceTile(self.world, cols, H, prod, len(self.ops[prod].tasks), 0, dt)
        tasks = []
        for c0 in range(0, H, cols):
            p = self._peer_ptrs(x, c0 * esz)
            p[8] = (out, c0 * esz)
            p[9] = ("mkpeers", 0)
            if resid:
                p[10] = (resid, c0 * esz)
            tasks.append(Task(tile.body, p, dict(tile.params()), cost=self.B * cols * esz * self.world))
        self.add_op(res, "allreduce", tasks, reads, [out])

    def op_allreduce_argmax(self, s):
        self._argmax_peers(s, int(self.attrs(s).get("offset", 0)))

    def _argmax_peers(self, s, offset: int):
        """Per-rank (max, global index) pairs of the bf16 logits, merged over the peers (the final op).  A
        greedy sample / argmax of gathered (replicated) logits is the same with offset 0 on every rank."""
        x = self.val(s.operands[0])
        shp = self.vshape(s.operands[0])
        prod = self.producer.get(x)
        if prod is None or self.buffers[x].dtype != "bf16" or len(shp) != 2:
            raise _err(f"{s.op} on the GPU takes the bf16 [tokens, V] logits computed by the graph", s)
        V = shp[1]
        pairs = self.add_buffer(f"argpairs:{s.results[0]}", "sym", (self.maxB, 2), "i32")
        pt = Task(
            "mk_argmax_pairs_bf16", {0: (x, 0), 8: (pairs, 0)}, {16: V, 17: V, 18: offset, 21: 0, 14: 1},
            cost=self.B * V * 2,
        )
        pop = self.add_op(s.results[0] + ".pairs", "argmax_pairs", [pt], [x], [pairs])
        outb = self.new_act(s.results[0], self.types[s.results[0]])
        p = self._peer_ptrs(pairs, 0)
        p.update({8: (outb, 0), 9: ("mkpeers", 0), 10: ("hist", 0)})
        mt = Task("mk_argmax_merge_peers", p, {16: self.maxB, 18: self.maxB, 19: pop, 20: 1, 21: 0})
        self.logits = x
        self.final_op = self.add_op(s.results[0], "argmax_merge", [mt], [pairs], [outb, "hist"])

    def op_allgather(self, s):
        x, prod = self._symmetric(s, s.operands[0])
        shp = self.vshape(s.operands[0])
        a = self.attrs(s)
        axis, parts = int(a.get("axis", -1)), int(a.get("parts", self.world))
        b = self.buffers[x]
        if len(shp) != 2 or axis not in (-1, 1) or parts != self.world or shp[1] * b.itemsize % 16:
            raise _err(
                "allgather on the GPU: a [tokens, n] tensor along its last axis over every rank, with rows "
                f"of a multiple of 16 bytes (got {b.dtype}{list(shp)}, axis={axis}, parts={parts})", s)
        out = self.new_act(s.results[0], self.types[s.results[0]])
        rb = shp[1] * b.itemsize
        tasks = []
        for q in range(self.world):
            p = {0: (f"peer:{q}:{x}", 0), 8: (out, q * rb), 9: ("mkpeers", 0)}
            ta = {16: rb, 17: rb, 18: rb * self.world, 19: prod, 20: len(self.ops[prod].tasks), 21: 0, 22: q}
            tasks.append(Task("mk_allgather_peer", p, ta, cost=self.B * rb))
        self.add_op(s.results[0], "allgather", tasks, [x], [out])

    # ---------------------------------------------------------------- placement
    def finish(self, out: str) -> Plan:
        for o in self.ops:
            o.deps = sorted(set(o.deps))
        sched = self.sched and self.embed_op is not None
        lists = place(self.ops, self.num_sms, sched)
        variants = sorted({t.variant for o in self.ops for t in o.tasks})
        return Plan(
            model=self.m.model_name or "model",
            max_tokens=self.maxB,
            batch=self.B,
            buffers=self.buffers,
            ops=self.ops,
            inputs=self.inputs,
            output=out,
            logits=self.logits,
            lists=lists,
            smem_bytes=max(getattr(self, "smem", 0), 1024),
            variants=variants,
            num_sms=self.num_sms,
            world=self.world,
            sched_warps=sched_warps(self.ops) if sched else 0,
            numerics="exact" if self.exact else "fast",
        )


def jit_queue_mode() -> str:
    """How just-in-time ops reach the workers (MPKIR_JIT_QUEUE): ``sched`` (scheduler warps in one extra CTA
    fill a queue per op when its events fire; the workers take tasks with one atomic add) or ``ticket``
    (workers claim tickets from a per-op counter with compare-and-swap, no scheduler)."""
    mode = os.environ.get("MPKIR_JIT_QUEUE", "sched")
    if mode not in ("sched", "ticket"):
        raise ValueError(f"MPKIR_JIT_QUEUE={mode!r}: expected 'sched' or 'ticket'")
    return mode


def place(ops: list[Op], num_sms: int, sched: bool = False) -> list[list[int]]:
    """Per-SM task lists (sets each op's ``first_task``): levels by longest same-step path, each level's
    tasks greedily on the least-loaded SM; a JIT op gets a slot on every SM. With ``sched``
    (scheduler-launched JIT ops), a JIT op is placed instead (its ``jit`` cleared) unless it waits on at least
    one event of its step and every such event is :func:`gated_ops`, and SMs with no placed task get no
    slots: every visiting worker then has a task the next step's tokens wait on, so no worker is more than
    one step behind a launch, and each op's events come in step order (the two step-parity heads and ready
    counts of mk_kernel.cuh rely on both)."""
    level: list[int] = []
    for o in ops:
        level.append(1 + max((level[d] for d, lag in o.deps if lag == 0), default=-1))
    if sched:
        gated = gated_ops(ops)
        for o in ops:
            same_step = [d for d, lag in o.deps if lag == 0]
            o.jit = o.jit and bool(same_step) and all(gated[d] for d in same_step)
    tid = 0
    for o in ops:
        o.first_task = tid
        tid += len(o.tasks)
    lists: list[list[int]] = [[] for _ in range(num_sms)]
    loads: dict[int, list[float]] = {}
    for i, o in enumerate(ops):
        if o.jit:
            for lst in lists:
                lst.append(-(i + 1))
            continue
        ld = loads.setdefault(level[i], [0.0] * num_sms)
        for j, t in enumerate(o.tasks):
            sm = min(range(num_sms), key=lambda k: (ld[k], k))
            ld[sm] += t.cost
            lists[sm].append(o.first_task + j)
    if sched:
        lists = [lst if any(x >= 0 for x in lst) else [] for lst in lists]
    return lists


def same_step_ancestors(ops: list[Op]) -> list[int]:
    """Per op: a bit mask of the ops it waits on within its step, directly or transitively."""
    anc: list[int] = []
    for o in ops:
        a = 0
        for d, lag in o.deps:
            if lag == 0:
                a |= anc[d] | (1 << d)
        anc.append(a)
    return anc


def gated_ops(ops: list[Op]) -> list[bool]:
    """Per op: whether its step cannot start before the previous step has ended: it waits (lag 1) on the op
    every other op precedes in its step (the final op), or on the same step's gated op."""
    anc = same_step_ancestors(ops)
    everything = (1 << len(ops)) - 1
    final = next((i for i, a in enumerate(anc) if a | (1 << i) == everything), None)
    gated: list[bool] = []
    for o in ops:
        gated.append(any((lag > 0 and d == final) or (lag == 0 and gated[d]) for d, lag in o.deps))
    return gated


def jit_events(ops: list[Op]) -> list[int]:
    """Events (op indices) that launch a just-in-time op: its same-step dependencies, in order."""
    return sorted({d for o in ops if o.jit for d, lag in o.deps if lag == 0})


def jit_consumers(ops: list[Op]) -> dict[int, list[int]]:
    """Launching event -> the just-in-time ops that wait on it in its step, in order."""
    return {e: [i for i, o in enumerate(ops) if o.jit and (e, 0) in o.deps] for e in jit_events(ops)}


def sched_warps(ops: list[Op]) -> int:
    """Scheduler warps of a scheduler-launched plan: one per launching event, at most four (0: no JIT op)."""
    return min(4, len(jit_events(ops)))


def lower(
    module: ir.Module,
    analysis=None,
    *,
    num_sms: int = NUM_SMS,
    greedy: bool = False,
    batch: int | None = None,
    world: int | None = None,
    numerics: str = "fast",
) -> Plan:
    """Lower the module's (first) graph to a megakernel plan for ``num_sms`` SMs (``world``: ranks of a
    tensor-parallel rank module; default the serve block's ``gpus``; ``numerics``: a key of
    :data:`NUMERICS`). A plan with just-in-time ops launched by scheduler warps (:func:`jit_queue_mode`) is
    re-planned for ``num_sms - 1`` workers: the scheduler CTA takes the last SM."""
    plan = _Lowerer(module, analysis, num_sms, greedy, batch, world, numerics=numerics).run()
    if plan.world == 1 and num_sms > 1 and any(o.jit for o in plan.ops) and jit_queue_mode() == "sched":
        sched = _Lowerer(module, analysis, num_sms - 1, greedy, batch, world, sched=True,
                         numerics=numerics).run()
        if sched.sched_warps:
            return sched
    return plan
