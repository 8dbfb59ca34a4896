"""Put the superoptimizer's found programs into a lowered megakernel plan (a pure post-pass on a ``Plan``).

``apply_found_programs(plan, module, programs)`` takes the search's winners (``bench/superopt_programs.json``
entries: kind, dims, consts, program text, decision) and, for every one whose decision is "applied" (or whose
kind is in ``force``), finds each instance of its subgraph in the module's unrolled graph, finds the plan op
that computes it (by the buffers its tasks read and write: strict, every field checked) and replaces the op's
tasks with tasks of the found body (variant ``mk_so_<hash>_<program>``, one task per grid tile that touches a
live token; pointers through the plan's ``(buffer, byte offset)`` mechanism). Anything that does not match
exactly keeps the hand-written op, with the reason in ``plan.decisions``.

Semantics the hand-written op has and the found program lacks are restored with glue ops, so the step
computes the same function (``extend=True``, the default; ``extend=False`` skips such instances instead):
  * head-norm+rope reads per-token cos/sin tables: a ``mk_so_rope_table`` op (one task per live token, after
    the embedding that advances the positions) fills them from the hand-written task's inverse-frequency
    table (llama3 scaling included) exactly as ``mk_head_norm_rope`` computes its angles;
  * the k head-norm+rope task also appends k/v to the paged cache: a ``mk_kv_append`` op follows it;
  * act_down under a fused residual add (``x_out = h + down(silu(gate)·up)``): the found body writes
    ``mlp_out`` to a scratch buffer and an ``mk_eltwise`` add op writes ``x_out``;
  * the lm_head's argmax epilogue (``mk_linear`` flag 2): the found norm_linear body writes the logits and a
    ``mk_so_argmax_tile`` op writes each hand-written tile's (max, first index) partials from them, so
    ``mk_argmax_final`` is unchanged.
norm_linear (RMSNorm -> the bias-free linears reading it, the norm moved after the matmul): the program has
ONE weight [N, K] and ONE output [M, N] in column tiles of a 1-D grid; the plan has one mode-1 linear op per
linear (q/k/v, gate/up: merged by the search along N, in statement order; the lm_head alone). Each linear's op
becomes the program's tiles over its rows, numbered from 0, with that linear's weight and output pointers;
a merged program's body takes the output row stride as a task argument (``emit_body(..., strided=("y",))``,
``a[18]``), the same body serving every linear of the instance. Tiles must lie inside one linear: where the
found grid's tiles straddle a boundary (Llama-3.2-1B's q|k at 2048 under 24-row tiles), ``extend`` regrids
the same program to the aligned tile size nearest the found one (another grid of the same proved structure;
the decision says so), ``extend=False`` skips the instance.
decode_attention: the found split-KV program, in its paged form (``paged(k, v)``, passes/superopt/paged.py:
rows gathered through the page table up to each token's position, masked tail, padding tokens 0; the tiling
proved by finite field + Z3 on small instances before use), takes over ``mk_attention``'s tasks one for one
(same pointers, arguments, events); the partials keep ``mk_attention_merge``'s layout and that merge op.
Found programs compute intermediates in float32 without the reference's bf16 rounding points (proved equal
over the reals; the outputs differ from the hand-written ones by bf16 rounding only).

Events: the post-pass rebuilds the op list; every consumer's dependency on a replaced op moves to the last op
of its replacement, new ops depend on the producers of what they read, and the per-SM lists are re-placed
exactly as ``lower`` places them. Thresholds stay ``len(op.tasks) * step`` (the host's rule).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from mpkir import ir
from mpkir.codegen.lower import Op, Plan, Task, fbits, place, sched_warps
from mpkir.diagnostics import Diagnostic, MpkError

PROGRAMS_JSON = Path(__file__).resolve().parent.parent / "bench" / "superopt_programs.json"
ENV_VAR = "MPKIR_SUPEROPT"  # "1": bench/superopt_programs.json; a path: that JSON; unset/"0": off
ENV_FORCE = "MPKIR_SUPEROPT_FORCE"  # comma-separated kinds applied whatever their decision (testing)
ROPE_TABLE = "mk_so_rope_table"
ARGMAX_TILE = "mk_so_argmax_tile"
KINDS = ("headnorm_rope", "act_down", "decode_attention", "norm_linear")


@dataclass(frozen=True)
class SoVariant:
    """One found body in the plan: dispatch name, body function, its program text and tensor dtypes."""

    variant: str
    func: str
    program: str
    dtypes: tuple[tuple[str, str], ...]
    smem_bytes: int
    form: str = "block"  # "block": emit_body + so_adapter; "paged_attention": passes/superopt/paged.py
    strided: tuple[str, ...] = ()  # outputs whose row stride is the task argument a[18 + k] (emit_body)


@dataclass(frozen=True)
class Decision:
    """What happened to one instance (or one whole entry) of a found program."""

    kind: str
    dims: str
    instance: str  # the IR values it covers, e.g. "q_normed.3,q_rot.3" ("" for a whole entry)
    op: str  # the plan op it concerns ("" when none was found)
    replaced: bool
    reason: str


@dataclass
class SuperoptPlan(Plan):
    """A plan some of whose ops run found bodies (``emit_cuda`` writes their CUDA into the kernel)."""

    so_variants: tuple[SoVariant, ...] = ()
    decisions: tuple[Decision, ...] = ()

    def replaced(self) -> list[Decision]:
        return [d for d in self.decisions if d.replaced]


class _Skip(Exception):
    """This instance keeps its hand-written op (the message says why)."""


# ------------------------------------------------------------------ programs
def load_programs(path: str | os.PathLike | None = None) -> list[dict]:
    """The search's winners (a JSON list of entries, ``bench/superopt_programs.json`` by default)."""
    p = Path(path) if path else PROGRAMS_JSON
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MpkError(Diagnostic(f"superopt programs {p}: {e}", None)) from None
    if not isinstance(data, list) or not all(isinstance(e, dict) and "program" in e for e in data):
        raise MpkError(Diagnostic(f"superopt programs {p}: expected a JSON list of found programs", None))
    return data


def _dims_str(e: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in e.get("dims", {}).items())


def _parse_one(text: str):
    from mpkir.passes.superopt.program import parse_fused, validate

    f = parse_fused(text)
    for p in f.programs:
        validate(p)
    return f


def _sig(prog) -> tuple[dict, dict]:
    ins = {i.name: i for i in prog.inputs}
    outs = {o.name: o for o in prog.outputs}
    return ins, outs


def _coords(grid: tuple[int, ...], tile: int) -> list[int]:
    out = []
    for a, n in enumerate(grid):
        inner = 1
        for m in grid[a + 1 :]:
            inner *= m
        out.append((tile // inner) % n)
    return out


def _first_index(prog, inp, dim: int, tile: int) -> int:
    """First index along ``dim`` of input ``inp``'s tile for task ``tile`` (cuda.py's addressing)."""
    g = _coords(prog.grid, tile)
    return sum(g[a] * (inp.shape[dim] // prog.grid[a]) for a, d in enumerate(inp.imap) if d == dim)


def _token_axes_agree(prog, tin: dict[str, int], tout: dict[str, int]) -> None:
    """Every tensor with a token dim splits it along the same grid axes (tiles own whole token rows)."""
    ins, outs = _sig(prog)
    axes = None
    for name, dim in [*tin.items(), *tout.items()]:
        m = ins[name].imap if name in ins else outs[name].omap
        a = tuple(k for k, d in enumerate(m) if d == dim)
        if axes is None:
            axes = a
        elif a != axes:
            raise _Skip(f"program {prog.name}: {name} splits tokens over grid axes {a}, others over {axes}")
    for name, i in ins.items():
        if i.fmap >= 0 and tin.get(name) == i.fmap:
            raise _Skip(f"program {prog.name}: input {name} loops over tokens (fmap)")


def _tile_bytes(prog) -> int:
    from mpkir.passes.superopt.cuda import shapes_of_input

    n = 0
    for i in prog.inputs:
        k = 1
        for d in shapes_of_input(prog, i):
            k *= d
        n += k * 2 * prog.loop
    return n + 4096


# ------------------------------------------------------------------ the module's unrolled graph
class _Graph:
    def __init__(self, module: ir.Module, plan: Plan):
        from mpkir.passes.unroll import unroll
        from mpkir.semantics import build_env

        self.m = unroll(module)
        self.env, _ = build_env(self.m)
        g = next((d for d in self.m.decls if isinstance(d, ir.GraphDecl)), None)
        if g is None:
            raise MpkError(Diagnostic("no graph to compile", None))
        self.params = {p.name for p in g.params}
        self.stmts = [s for s in g.body if isinstance(s, ir.OpStmt)]
        self.by_result = {r: s for s in self.stmts for r in s.results}
        self.users: dict[str, list] = {}
        for s in g.body:
            ops = s.operands if isinstance(s, ir.OpStmt) else getattr(s, "values", ())
            for o in ops:
                if isinstance(o, ir.ValueRef):
                    self.users.setdefault(o.name, []).append(s)
        self.decls = {d.name: d for d in self.m.decls if isinstance(d, (ir.WeightDecl, ir.StateDecl))}
        self.plan = plan

    def single_user(self, name: str):
        u = self.users.get(name, [])
        return u[0] if len(u) == 1 and isinstance(u[0], ir.OpStmt) else None

    def buf(self, o) -> str:
        """The plan buffer holding operand ``o`` (reshapes are aliases), or raise _Skip."""
        from mpkir.semantics import eval_int

        if isinstance(o, ir.GlobalRef):
            d = self.decls[o.name]
            layer = None if o.index is None else eval_int(o.index, self.env, "layer index")
            if isinstance(d, ir.WeightDecl):
                name = "w:" + d.checkpoint_name(layer)
            else:
                name = f"s:{o.name}" + (f"[{layer}]" if layer is not None else "")
        else:
            v = o.name
            while v in self.by_result and self.by_result[v].op == "reshape":
                v = self.by_result[v].operands[0].name
            name = "in:" + v if v in self.params else "v:" + v
        if name not in self.plan.buffers:
            raise _Skip(f"value {getattr(o, 'name', o)} has no buffer of its own in the plan ({name})")
        return name

    def attrs(self, s: ir.OpStmt) -> dict:
        from mpkir.semantics import eval_expr

        out = {}
        for at in s.attrs:
            v = at.value
            if isinstance(v, ir.Name) and v.id not in self.env.consts and v.id not in self.env.dims:
                out[at.key] = v.id
            elif isinstance(v, (ir.Str, ir.Bool)):
                out[at.key] = v.value
            elif isinstance(v, ir.ListVal):
                out[at.key] = [eval_expr(x, self.env, allow_dims=True) for x in v.items]
            else:
                out[at.key] = eval_expr(v, self.env)
        return out


def _instances(gr: _Graph, kind: str) -> list[tuple[ir.OpStmt, ...]]:
    """The statements of every instance of a subgraph kind the rewrite handles (the partitioner's patterns,
    per layer of the unrolled graph)."""
    out = []
    for s in gr.stmts:
        if kind == "headnorm_rope" and s.op == "head_rmsnorm":
            u = gr.single_user(s.results[0])
            if u is not None and u.op == "rope" and u.operands[0] == ir.ValueRef(s.results[0]):
                out.append((s, u))
        elif kind == "decode_attention" and s.op == "paged_attention":
            out.append((s,))
        elif kind == "norm_linear" and s.op == "rmsnorm":
            lins = [
                u
                for u in gr.users.get(s.results[0], [])
                if isinstance(u, ir.OpStmt) and u.op == "linear" and len(u.operands) == 2
            ]
            if lins:  # (the partitioner's: every bias-free linear reading it, in statement order)
                out.append((s, *lins))
        elif kind == "act_down" and s.op == "silu_mul" and len(s.operands) == 2:
            u = gr.single_user(s.results[0])
            if u is not None and u.op == "linear" and u.operands[0] == ir.ValueRef(s.results[0]):
                out.append((s, u))
    return out


# ------------------------------------------------------------------ the rewrite
@dataclass(frozen=True)
class _Seg:
    """One linear of a norm_linear instance: its plan op, weight, output, rows, epilogue flags (0, or 2:
    argmax stage 1) and hand-written tiles (row order)."""

    op: int
    w: str
    out: str
    rows: int
    epi: int
    tiles: tuple


def _norm_linear_tiling(prog, M: int, K: int, N: int) -> None:
    """``prog`` reads x [M, K], g [K], w [N, K] and writes y [M, N] in column tiles: a 1-D grid splitting the
    rows of w and the columns of y, every task reading the whole x and g."""
    ins, outs = _sig(prog)
    shp = {n: tuple(v.shape) for n, v in ins.items()}
    if shp != {"x": (M, K), "g": (K,), "w": (N, K)} or [(o.name, tuple(o.shape)) for o in outs.values()] != [
        ("y", (M, N))
    ]:
        raise _Skip(f"program {prog.name}: tensors {shp} do not match norm_linear [{M},{K}]x[{N},{K}]")
    maps = (len(prog.grid), ins["x"].imap, ins["g"].imap, ins["w"].imap, outs["y"].omap)
    if maps != (1, (-1,), (-1,), (0,), (1,)):
        raise _Skip(f"program {prog.name}: grid {prog.grid} with maps {maps[1:]} is not column tiles of y")


@dataclass
class _New:
    """An op of the rewritten plan; deps are ('old', op index) or ('new', op name), with a lag."""

    name: str
    kind: str
    tasks: list[Task]
    deps: list[tuple[tuple[str, object], int]]
    jit: bool = False


@dataclass
class _Rewriter:
    plan: Plan
    gr: _Graph
    extend: bool
    variants: dict[str, SoVariant] = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)
    replace: dict[int, list[_New]] = field(default_factory=dict)
    tables: dict[str, _New] = field(default_factory=dict)  # rope tables, inserted after positions' producer
    table_after: int = -1
    decisions: list[Decision] = field(default_factory=list)
    proofs: dict[str, dict] = field(default_factory=dict)
    smem_floor: int = 0  # shared memory the glue bodies need

    # ---- helpers
    def producer(self, i: int, buf: str):
        """The op among op ``i``'s same-step deps that produces ``buf``: the earliest that references it (the
        producer precedes every reader); None when no dep references it (an input)."""
        cands = [d for d, lag in self.plan.ops[i].deps if lag == 0 and self._refs(d, buf)]
        return ("old", min(cands)) if cands else None

    def _refs(self, i: int, buf: str) -> bool:
        return any(b == buf for t in self.plan.ops[i].tasks for b, _ in t.p.values())

    def variant(self, prog, dtypes: dict[str, str], strided: tuple[str, ...] = ()) -> SoVariant:
        """The plan's variant of ``prog`` (``strided``: outputs whose row stride is a task argument)."""
        from mpkir.passes.superopt.cuda import SMEM_LIMIT, emit_body
        from mpkir.passes.superopt.program import print_program

        text = print_program(prog)
        key = text + repr(sorted(dtypes.items())) + (f"|strided {strided}" if strided else "")
        func = f"so_{hashlib.sha256(key.encode()).hexdigest()[:8]}_{prog.name}"
        if func not in self.variants:
            body = emit_body(prog, dtypes, func, strided)
            if body.smem_bytes > SMEM_LIMIT:
                raise _Skip(
                    f"program {prog.name} needs {body.smem_bytes} B of shared memory (> {SMEM_LIMIT})"
                )
            self.variants[func] = SoVariant(
                "mk_" + func, func, text, tuple(sorted(dtypes.items())), body.smem_bytes, strided=strided
            )
        return self.variants[func]

    def so_tasks(
        self,
        prog,
        var: SoVariant,
        ptr: dict[str, tuple[str, int]],
        tok: tuple[str, int] | None,
        tiles: range | None = None,
        args: dict[int, int] | None = None,
    ):
        """One task per tile whose first token is live (``tok``: an input name and its token dim). ``tiles``:
        only these grid tiles, numbered from ``tiles.start`` (the pointers address that part of the tensors);
        ``args``: more task arguments (e.g. a strided output's row stride)."""
        ins, _ = _sig(prog)
        names = [i.name for i in prog.inputs] + [o.name for o in prog.outputs]
        if len(names) > 11:
            raise _Skip(f"program {prog.name}: {len(names)} tensors (a task holds 11 pointers)")
        cost = _tile_bytes(prog)
        tiles = range(prog.ntasks) if tiles is None else tiles
        tasks = []
        for tile in tiles:
            t0 = _first_index(prog, ins[tok[0]], tok[1], tile) if tok else 0
            if t0 >= self.plan.batch:
                continue
            a = {16: tile - tiles.start, 17: t0, **(args or {})}
            tasks.append(Task(var.variant, {k: ptr[n] for k, n in enumerate(names)}, a, cost=cost))
        return tasks

    def paged_variant(self, prog) -> SoVariant:
        from mpkir.passes.superopt.cuda import SMEM_LIMIT
        from mpkir.passes.superopt.paged import emit_paged_attention
        from mpkir.passes.superopt.program import print_program

        text = print_program(prog)  # the paged text form: paged(k, v)
        func = f"so_{hashlib.sha256(text.encode()).hexdigest()[:8]}_{prog.name}_paged"
        if func not in self.variants:
            body = emit_paged_attention(prog, func)
            if body.smem_bytes > SMEM_LIMIT:
                raise _Skip(
                    f"program {prog.name} needs {body.smem_bytes} B of shared memory (> {SMEM_LIMIT})"
                )
            self.variants[func] = SoVariant("mk_" + func, func, text, (), body.smem_bytes, "paged_attention")
        return self.variants[func]

    def paged_proof(self, prog, scale: float) -> dict:
        """passes/superopt/paged.prove_paged of a split program, once per program text and scale."""
        from mpkir.passes.superopt.paged import prove_paged
        from mpkir.passes.superopt.program import print_program

        key = f"{print_program(prog)}|{scale!r}"
        if key not in self.proofs:
            self.proofs[key] = prove_paged(prog, scale)
        return self.proofs[key]

    def scratch(self, name: str, kind: str, shape, dtype: str) -> str:
        from mpkir.codegen.lower import Buffer

        if name not in self.buffers:
            self.buffers[name] = Buffer(name, kind, tuple(shape), dtype)
        return name

    # ---- per kind
    def headnorm_rope(self, e: dict, prog, stmts, i: int) -> str:
        norm, rope = stmts
        gr, plan = self.gr, self.plan
        op = plan.ops[i]
        T, Hh, D = e["dims"]["T"], e["dims"]["Hh"], e["dims"]["D"]
        x, g, y = gr.buf(norm.operands[0]), gr.buf(norm.operands[1]), gr.buf(ir.ValueRef(rope.results[0]))
        pos = gr.buf(rope.operands[1])
        if op.kind != "norm_rope" or op.jit:
            raise _Skip(f"op {op.name} is a {op.kind} op, not the hand-written head-norm+rope")
        if plan.max_tokens != T:
            raise _Skip(f"program has T={T} tokens, the plan max_tokens={plan.max_tokens}")
        if [t.a.get(21) for t in op.tasks] != list(range(plan.batch)):
            raise _Skip(f"op {op.name}: not one task per live token")
        t0 = op.tasks[0]
        for t in op.tasks:
            if (
                t.variant != f"mk_head_norm_rope<{D}>"
                or t.p != t0.p
                or {k: v for k, v in t.a.items() if k != 21} != {k: v for k, v in t0.a.items() if k != 21}
            ):
                raise _Skip(f"op {op.name}: task {t.variant} {t.a} differs from the expected head-norm+rope")
        a, p = t0.a, t0.p
        want = {0: (x, 0), 1: (g, 0), 2: (y, 0), 3: (pos, 0)}
        if any(p.get(k) != v for k, v in want.items()):
            raise _Skip(f"op {op.name}: pointers {p} do not read {x}, {g}, {pos} and write {y}")
        if (a.get(16), a.get(17)) != (Hh, D) or plan.buffers[x].nbytes != T * Hh * D * 2:
            raise _Skip(f"op {op.name}: {a.get(16)} heads x {a.get(17)}, program {Hh} x {D}")
        eps = float(e["consts"]["eps"])
        if a.get(18) != fbits(eps) or fbits(float(gr.attrs(norm).get("eps", 1e-6))) != fbits(eps):
            raise _Skip(f"op {op.name}: eps differs from the program's {eps}")
        if a.get(20, 0) & 3 != 3 or a.get(22) != D or 9 not in p:
            raise _Skip(
                f"op {op.name}: not norm + full-width rope (flags {a.get(20)}, rotary dim {a.get(22)})"
            )
        if str(gr.attrs(rope).get("style", "neox")) != "neox":
            raise _Skip("rope style is not neox (the program's rot_half)")
        append = bool(a.get(20, 0) & 4)
        if a.get(20, 0) & ~7:
            raise _Skip(f"op {op.name}: unknown flags {a.get(20)}")
        if append and not self.extend:
            raise _Skip(f"op {op.name} also appends k/v to the paged cache (the found program does not)")
        # the program: x [T,Hh,D], g [D], cos/sin [T,1,D] -> y [T,Hh,D]
        ins, outs = _sig(prog)
        shp = {n: tuple(v.shape) for n, v in ins.items()}
        if shp != {"x": (T, Hh, D), "g": (D,), "cos": (T, 1, D), "sin": (T, 1, D)} or [
            (o.name, tuple(o.shape)) for o in outs.values()
        ] != [("y", (T, Hh, D))]:
            raise _Skip(f"program {prog.name}: tensors {shp} do not match head-norm+rope [{T},{Hh},{D}]")
        _token_axes_agree(prog, {"x": 0, "cos": 0, "sin": 0}, {"y": 0})
        var = self.variant(prog, {"cos": "f32", "sin": "f32"})
        inv = p[9][0]
        cos, sin, tab = self.rope_table(i, pos, inv, D)
        tasks = self.so_tasks(
            prog, var, {"x": (x, 0), "g": (g, 0), "cos": (cos, 0), "sin": (sin, 0), "y": (y, 0)}, ("x", 0)
        )
        deps = [d for d in (self.producer(i, x), ("new", tab)) if d is not None]
        new = [_New(op.name + ".so", "so_" + e["kind"], tasks, [(d, 0) for d in deps])]
        note = ""
        if append:  # the k task appended k/v to the caches: a standalone append op after it (lower's own)
            ap = {k: p[k] for k in (3, 4, 5, 6, 7, 8)}
            ap[0] = (y, 0)
            aa = {16: Hh, 17: D, 23: a[23], 24: a[24]}
            at = [Task("mk_kv_append", dict(ap), {**aa, 21: b}, cost=Hh * D * 4) for b in range(plan.batch)]
            adeps = [("new", op.name + ".so")]
            for bname, _ in (p[3], p[4], p[7], p[8]):
                d = self.producer(i, bname)
                if d is not None and d not in adeps:
                    adeps.append(d)
            new.append(_New(op.name, "kv_append", at, [(d, 0) for d in adeps]))
            note = "; its k/v cache append moved to a mk_kv_append op"
        self.replace[i] = new
        return f"{len(tasks)} tasks of {var.variant} (grid {prog.grid}) + the rope table{note}"

    def rope_table(self, i: int, pos: str, inv: str, D: int) -> tuple[str, str, str]:
        key = f"{pos}|{inv}|{D}"
        cos = self.scratch(f"so:cos:{key}", "scratch", (self.plan.max_tokens, 1, D), "f32")
        sin = self.scratch(f"so:sin:{key}", "scratch", (self.plan.max_tokens, 1, D), "f32")
        name = f"so_rope_table:{key}"
        if key not in self.tables:
            prod = self.producer(i, pos)
            tasks = [
                Task(
                    ROPE_TABLE,
                    {0: (pos, 0), 1: (inv, 0), 2: (cos, 0), 3: (sin, 0)},
                    {16: D, 17: b},
                    cost=D * 8,
                )
                for b in range(self.plan.batch)
            ]
            self.tables[key] = _New(name, "so_rope_table", tasks, [(prod, 0)] if prod else [])
            self.table_after = max(self.table_after, prod[1] if prod else -1)
        return cos, sin, name

    def act_down(self, e: dict, prog, stmts, i: int) -> str:
        sm, lin = stmts
        gr, plan = self.gr, self.plan
        op = plan.ops[i]
        M, F, H = e["dims"]["M"], e["dims"]["F"], e["dims"]["H"]
        gate, up, wd = gr.buf(sm.operands[0]), gr.buf(sm.operands[1]), gr.buf(lin.operands[1])
        if op.kind != "linear" or op.jit or len(lin.operands) != 2:
            raise _Skip(f"op {op.name} is not the hand-written down-projection linear")
        if plan.max_tokens != M:
            raise _Skip(f"program has M={M} tokens, the plan max_tokens={plan.max_tokens}")
        epi = {t.a.get(22, 0) for t in op.tasks}
        if len(epi) != 1 or epi - {0, 1}:
            raise _Skip(f"op {op.name}: epilogue flags {sorted(epi)} (argmax epilogue: the program has none)")
        epi = epi.pop()
        user = gr.single_user(lin.results[0])
        if epi:
            if user is None or user.op != "add":
                raise _Skip(f"op {op.name}: residual epilogue without the IR add")
            other = [o for o in user.operands if o != ir.ValueRef(lin.results[0])]
            if len(other) != 1:
                raise _Skip(f"op {op.name}: residual add of the value with itself")
            resid, out = gr.buf(other[0]), gr.buf(ir.ValueRef(user.results[0]))
            if not self.extend:
                raise _Skip(
                    f"op {op.name} fuses the residual add (x_out = h + down(...)); the program does not"
                )
        else:
            resid, out = None, gr.buf(ir.ValueRef(lin.results[0]))
        rows = {1: (wd, F * 2), 2: (out, 2)} | ({} if resid is None else {3: (resid, 2)})
        args = {16: F, 19: F, 20: 2, 22: epi, 25: 0}
        _linear_tiles(op, {0: (gate, 0), 5: (up, 0)}, rows, args, {0, 1, 2, 3, 5}, H)
        if plan.buffers[wd].shape != (H, F) or plan.buffers[gate].shape != (M, F):
            raise _Skip(f"op {op.name}: shapes differ from the program's")
        ins, outs = _sig(prog)
        shp = {n: tuple(v.shape) for n, v in ins.items()}
        if shp != {"gate": (M, F), "up": (M, F), "wd": (H, F)} or [
            (o.name, tuple(o.shape)) for o in outs.values()
        ] != [("y", (M, H))]:
            raise _Skip(f"program {prog.name}: tensors {shp} do not match act_down [{M},{F}]x[{H},{F}]")
        _token_axes_agree(prog, {"gate": 0, "up": 0}, {"y": 0})
        var = self.variant(prog, {})
        y = out if resid is None else self.scratch(f"so:{lin.results[0]}", "scratch", (M, H), "bf16")
        st = self.so_tasks(
            prog, var, {"gate": (gate, 0), "up": (up, 0), "wd": (wd, 0), "y": (y, 0)}, ("gate", 0)
        )
        deps = []
        for b in (gate, up):
            d = self.producer(i, b)
            if d is not None and d not in deps:
                deps.append(d)
        if resid is None:
            self.replace[i] = [_New(op.name, "so_act_down", st, [(d, 0) for d in deps])]
            return f"{len(st)} tasks of {var.variant} (grid {prog.grid}, loop {prog.loop})"
        so_name = op.name + ".so"
        add = Task("mk_eltwise", {0: (resid, 0), 1: (y, 0), 2: (out, 0)}, {16: H, 17: H, 18: 0}, cost=H * 6)
        adeps = [("new", so_name)]
        d = self.producer(i, resid)
        if d is not None:
            adeps.append(d)
        self.replace[i] = [
            _New(so_name, "so_act_down", st, [(d, 0) for d in deps]),
            _New(op.name, "add", [add], [(d, 0) for d in adeps]),
        ]
        what = f"{len(st)} tasks of {var.variant} (grid {prog.grid}, loop {prog.loop})"
        return what + " + a mk_eltwise residual add"

    def norm_linear(self, e: dict, prog, stmts, i: int) -> str:
        """RMSNorm -> the linears reading it (one, or several the search merged along N: q/k/v, gate/up): the
        found program's column tiles, each inside one linear's rows, become that linear's op (its weight and
        output; a merged program's output row stride is a task argument); an argmax epilogue (lm_head)
        becomes a glue op of per-tile argmax partials for the unchanged ``mk_argmax_final``."""
        norm, lins = stmts[0], stmts[1:]
        M, K, N = (e["dims"][k] for k in ("M", "K", "N"))
        eps = float(e["consts"]["eps"])
        if self.plan.max_tokens != M:
            raise _Skip(f"program has M={M} tokens, the plan max_tokens={self.plan.max_tokens}")
        if fbits(float(self.gr.attrs(norm).get("eps", 1e-6))) != fbits(eps):
            raise _Skip(f"rmsnorm {norm.results[0]}: eps differs from the program's {eps}")
        x, g = self.gr.buf(norm.operands[0]), self.gr.buf(norm.operands[1])
        segs = [self.norm_linear_segment(lin, norm, x, g, K, eps) for lin in lins]
        _norm_linear_tiling(prog, M, K, N)
        names = [self.plan.ops[sg.op].name for sg in segs]
        prog, note = self.segment_grid(prog, names, [sg.rows for sg in segs])
        strided = ("y",) if len(segs) > 1 else ()
        var = self.variant(prog, {}, strided)
        tn, r0, new, what = N // prog.grid[0], 0, {}, []
        for sg in segs:
            op = self.plan.ops[sg.op]
            tiles = range(r0 // tn, (r0 + sg.rows) // tn)
            ptr = {"x": (x, 0), "g": (g, 0), "w": (sg.w, 0), "y": (sg.out, 0)}
            st = self.so_tasks(prog, var, ptr, None, tiles, {18: sg.rows} if strided else None)
            new[sg.op] = self.segment_ops(op, st, sg)
            what.append(f"{op.name} tiles {tiles.start}-{tiles.stop - 1}")
            r0 += sg.rows
        self.replace.update(new)
        glue = " + mk_so_argmax_tile partials for mk_argmax_final" if segs[-1].epi else ""
        return f"{var.variant} (grid {prog.grid}, loop {prog.loop}): {', '.join(what)}{glue}{note}"

    def norm_linear_segment(self, lin, norm, x: str, g: str, K: int, eps: float) -> _Seg:
        """One linear of a norm_linear instance: its hand-written op (rmsnorm prologue, mode 1), checked."""
        plan = self.plan
        if len(lin.operands) != 2 or lin.operands[0] != ir.ValueRef(norm.results[0]):
            raise _Skip(f"linear {lin.results[0]} does not read {norm.results[0]} as x without a bias")
        w, out = self.gr.buf(lin.operands[1]), self.gr.buf(ir.ValueRef(lin.results[0]))
        j = _find_op(plan, "linear", out)
        op = plan.ops[j]
        if j in self.replace:
            raise _Skip(f"op {op.name} already replaced")
        epi = op.tasks[0].a.get(22, 0)
        if epi not in (0, 2):
            raise _Skip(f"op {op.name}: epilogue flags {epi} (a residual add: the program has none)")
        if epi and not self.extend:
            raise _Skip(f"op {op.name} fuses argmax stage 1 (per-tile partials); the program does not")
        rows = plan.buffers[w].shape[0]
        args = {16: K, 19: K, 20: 1, 21: fbits(eps), 22: epi, 25: 0}  # bf16 (f32: a cast, not this subgraph)
        keys = {0, 1, 2, 4} | ({6} if epi else set())
        per_row = {1: (w, K * 2), 2: (out, 2)}
        tiles = _linear_tiles(op, {0: (x, 0), 4: (g, 0)}, per_row, args, keys, rows)
        if epi and any(t.p[6] != (tiles[0].p[6][0], k * plan.max_tokens * 8) for k, t in enumerate(tiles)):
            raise _Skip(f"op {op.name}: argmax partials are not one [maxB] block per tile in row order")
        M = plan.max_tokens
        if [plan.buffers[b].shape for b in (x, w, out)] != [(M, K), (rows, K), (M, rows)]:
            raise _Skip(f"op {op.name}: buffers are not x [{M},{K}], w [{rows},{K}], y [{M},{rows}]")
        return _Seg(j, w, out, rows, epi, tuple(tiles))

    def segment_grid(self, prog, names: list[str], widths: list[int]) -> tuple:
        """(program, note): ``prog`` when each of its column tiles lies inside one linear's rows; else (with
        ``extend``) the same program on the grid of aligned tiles nearest the found size (another candidate of
        the search for this structure), or _Skip."""
        from mpkir.passes.superopt.program import validate

        N = sum(widths)
        tn = N // prog.grid[0]
        cuts = list(itertools.accumulate(widths))[:-1]
        bad = [f"{a}|{b} at row {c}" for a, b, c in zip(names[:-1], names[1:], cuts, strict=True) if c % tn]
        if not bad:
            return prog, ""
        why = f"grid({prog.grid[0]}): its {tn}-row tiles straddle {', '.join(bad)}"
        if not self.extend:
            raise _Skip(why)
        common = math.gcd(*widths)
        sizes = [d for d in range(1, common + 1) if common % d == 0]
        t = min(sizes, key=lambda d: (abs(math.log(d / tn)), d))
        new = dataclasses.replace(prog, grid=(N // t,))
        validate(new)
        return new, f"; the found {why}: regridded to grid({N // t}) ({t}-row tiles)"

    def segment_ops(self, op: Op, tasks: list[Task], sg: _Seg) -> list[_New]:
        """The ops replacing one linear: the found body's tiles (the linear's events), then, for an argmax
        epilogue, the glue op writing the hand-written tiles' argmax partials from the logits."""
        deps = [(("old", d), lag) for d, lag in op.deps]
        if not sg.epi:
            return [_New(op.name, "so_norm_linear", tasks, deps)]
        from mpkir.codegen.emit import SO_ARGMAX_SMEM

        self.smem_floor = max(self.smem_floor, SO_ARGMAX_SMEM)
        glue = [
            Task(ARGMAX_TILE, {2: t.p[2], 6: t.p[6]}, {k: t.a[k] for k in (17, 18, 23)},
                 cost=t.a[17] * self.plan.batch * 2)
            for t in sg.tiles
        ]
        return [
            _New(op.name + ".so", "so_norm_linear", tasks, deps),
            _New(op.name, "argmax_tile", glue, [(("new", op.name + ".so"), 0)]),
        ]

    def decode_attention(self, e: dict, fused, stmts, i: int) -> str:
        """The found split-KV program's body over the paged cache (passes/superopt/paged.py) in place of
        ``mk_attention``'s tasks: same pointers, arguments, events; the merge op stays mk_attention_merge
        (the same exact online-softmax merge, on the same partial layout)."""
        from mpkir.passes.superopt.paged import as_paged, split_roles

        op = self.plan.ops[i]
        G, D = e["dims"]["G"], e["dims"]["D"]
        roles = split_roles(fused)
        if (roles.G, roles.D) != (G, D):
            raise _Skip(f"program {roles.split.name}: q tile [{roles.G}, {roles.D}], entry G={G} D={D}")
        if len(fused.programs) > 1 and fused.programs[1].name != "attn_merge":
            raise _Skip(f"program {fused.programs[1].name}: not the split-KV merge")
        scale = fbits(float(e["consts"]["scale"]))
        if op.kind != "attention":
            raise _Skip(f"op {op.name} is a {op.kind} op, not the hand-written paged attention")
        for t in op.tasks:
            if (
                t.variant != f"mk_attention<{D},{G}>"
                or set(t.p) != set(range(9))
                or t.a.get(23) != scale
                or t.a.get(24, 0)
                or set(t.a) != set(range(16, 25))
            ):
                raise _Skip(
                    f"op {op.name}: task {t.variant} a={t.a} is not mk_attention<{D},{G}> at scale "
                    f"{e['consts']['scale']} without the k/v append"
                )
        proof = self.paged_proof(roles.split, float(e["consts"]["scale"]))
        if not proof["proved"]:
            raise _Skip(f"the paged tiling of {roles.split.name} is not proved: {proof}")
        var = self.paged_variant(as_paged(roles.split))
        tasks = [dataclasses.replace(t, variant=var.variant, p=dict(t.p), a=dict(t.a)) for t in op.tasks]
        self.replace[i] = [_New(op.name, op.kind, tasks, [(("old", d), lag) for d, lag in op.deps], op.jit)]
        S = op.tasks[0].a[19]
        return (
            f"{len(tasks)} tasks of {var.variant} (found {roles.split.name}, {roles.rows}-row tiles over the "
            f"paged cache, masked tail, {S} splits)"
            + ("; merge: mk_attention_merge" if S > 1 else "")
            + f"; paged tiling proved: finite field {len(proof['finite_field'])} (length, splits) cases, Z3 "
            + ", ".join(f"len {z['length']}/S {z['splits']}" for z in proof["z3"])
            + f" (assumed: {proof['assumed']})"
        )


def _linear_tiles(op: Op, fixed: dict, rows: dict, args: dict[int, int], keys: set[int], N: int) -> list:
    """The hand-written linear op's tiles in row order, every field checked: a ``mk_linear`` /
    ``mk_linear_mma`` tile at row n0 with the pointers ``fixed``, the pointers ``rows`` (buffer, bytes per
    row) at row n0, no other pointer than ``keys``, the arguments ``args`` (absent = 0), out stride a18 = N
    and a23 = n0; together the tiles cover rows [0, N)."""
    if op.kind != "linear" or op.jit:
        raise _Skip(f"op {op.name} is a {op.kind} op, not a hand-written linear")
    tasks = sorted(op.tasks, key=lambda t: t.a.get(23, 0))
    n0 = 0
    for t in tasks:
        want = {**fixed, **{k: (b, n0 * per_row) for k, (b, per_row) in rows.items()}}
        ok = (
            t.variant.startswith(("mk_linear<", "mk_linear_mma<", "mk_linear_bulk<"))
            and all(t.p.get(k) == v for k, v in want.items())
            and set(t.p) <= keys
            and all(t.a.get(k, 0) == v for k, v in {**args, 18: N, 23: n0}.items())
        )
        if not ok:
            raise _Skip(f"op {op.name}: task {t.variant} p={t.p} a={t.a} is not the linear tile at row {n0}")
        n0 += t.a.get(17, 0)
    if n0 != N:
        raise _Skip(f"op {op.name}: tiles cover {n0} of {N} rows")
    return tasks


def _find_op(plan: Plan, kind: str, writes: str) -> int:
    """The one op of ``kind`` whose every task writes ``writes`` as its output pointer (p[2])."""
    hits = [
        i
        for i, o in enumerate(plan.ops)
        if o.kind == kind and o.tasks and all(t.p.get(2, ("", 0))[0] == writes for t in o.tasks)
    ]
    if len(hits) != 1:
        raise _Skip(f"{len(hits)} {kind} ops of the plan write {writes}")
    return hits[0]


def _instance_op(rw: _Rewriter, kind: str, stmts) -> int:
    gr = rw.gr
    if kind == "headnorm_rope":
        return _find_op(rw.plan, "norm_rope", gr.buf(ir.ValueRef(stmts[1].results[0])))
    if kind == "decode_attention":
        name = stmts[0].results[0] + ".split"
        hits = [j for j, o in enumerate(rw.plan.ops) if o.name == name and o.kind == "attention"]
        if len(hits) != 1:
            raise _Skip(f"{len(hits)} attention ops of the plan are named {name}")
        return hits[0]
    if kind == "norm_linear":  # the first linear's op (norm_linear finds the others)
        return _find_op(rw.plan, "linear", gr.buf(ir.ValueRef(stmts[1].results[0])))
    lin = stmts[1]
    user = gr.single_user(lin.results[0])
    try:
        out = gr.buf(ir.ValueRef(lin.results[0]))
    except _Skip:
        if user is None or user.op != "add":
            raise
        out = gr.buf(ir.ValueRef(user.results[0]))
    return _find_op(rw.plan, "linear", out)


def apply_found_programs(
    plan: Plan,
    module: ir.Module,
    programs: list[dict] | None = None,
    *,
    force: tuple[str, ...] | frozenset = (),
    extend: bool = True,
) -> SuperoptPlan:
    """The plan with every applicable found program in place of the hand-written op computing it.

    ``programs``: found-program entries (default ``bench/superopt_programs.json``); those whose decision is
    "applied", or whose kind is in ``force``, are tried. ``extend``: allow glue ops (rope table, k/v append,
    residual add) that restore the hand-written op's semantics. Pure: ``plan`` is not modified."""
    from mpkir.passes.superopt.program import ProgramError

    if isinstance(plan, SuperoptPlan) and plan.so_variants:
        return plan
    if plan.numerics != "fast":  # found bodies accumulate in float32
        raise ValueError(f"found programs run in fast numerics only (the plan's numerics: {plan.numerics})")
    entries = load_programs() if programs is None else list(programs)
    gr = _Graph(module, plan)
    rw = _Rewriter(plan, gr, extend)
    here = _subgraphs(module)
    for e in entries:
        kind, dims = e.get("kind", "?"), _dims_str(e)
        if not _occurs(e, here):
            continue  # searched for another model: no subgraph of this module has its signature
        if not (e.get("applied") or kind in force):
            rw.decisions.append(
                Decision(kind, dims, "", "", False, f"not applied by the search: {e.get('decision', '')}")
            )
            continue
        if kind not in KINDS:
            rw.decisions.append(Decision(kind, dims, "", "", False, f"unknown subgraph kind {kind!r}"))
            continue
        try:
            fused = _parse_one(e["program"])
        except ProgramError as ex:
            rw.decisions.append(Decision(kind, dims, "", "", False, f"program does not parse: {ex}"))
            continue
        if len(fused.programs) != 1 and kind != "decode_attention":
            rw.decisions.append(Decision(kind, dims, "", "", False, "expected one program"))
            continue
        prog = fused if kind == "decode_attention" else fused.programs[0]
        for stmts in _instances(gr, kind):
            inst = ",".join(s.results[0] for s in stmts)
            opname = ""
            try:
                i = _instance_op(rw, kind, stmts)
                opname = plan.ops[i].name
                if not _dims_match(rw, kind, e, i, stmts):
                    continue  # another entry's instance (e.g. the k rope of a q-rope entry)
                if i in rw.replace:
                    raise _Skip(f"op {opname} already replaced")
                why = getattr(rw, kind)(e, prog, stmts, i)
                rw.decisions.append(Decision(kind, dims, inst, opname, True, why))
            except (_Skip, ProgramError) as ex:
                rw.decisions.append(Decision(kind, dims, inst, opname, False, str(ex)))
    return _rebuild(plan, rw)


def _subgraphs(module: ir.Module) -> list:
    """The module's subgraphs as the superoptimizer's partitioner cuts them (kind, sizes, constants)."""
    from mpkir.passes.superopt.partition import partition
    from mpkir.verify import analyze

    return partition(module, analyze(module))


def _occurs(e: dict, sgs: list) -> bool:
    for sg in sgs:
        if sg.kind != e.get("kind") or dict(sg.dims) != dict(e.get("dims", {})):
            continue
        c = dict(e.get("consts", {}))
        if set(c) == {k for k, _ in sg.consts} and all(
            abs(float(c[k]) - float(v)) <= 1e-12 * max(1.0, abs(float(v))) for k, v in sg.consts
        ):
            return True
    return False


def _dims_match(rw: _Rewriter, kind: str, e: dict, i: int, stmts) -> bool:
    """Whether plan op ``i`` (for norm_linear: the instance's weights) has the entry's sizes (the search ran
    per distinct subgraph signature)."""
    t = rw.plan.ops[i].tasks[0]
    d = e["dims"]
    if kind == "norm_linear":  # (and as many linears: the q/k/v and gate/up of a model may have one size)
        shapes = [rw.plan.buffers[rw.gr.buf(s.operands[1])].shape for s in stmts[1:]]
        sizes = ({k for _, k in shapes}, sum(n for n, _ in shapes), len(shapes))
        return sizes == ({d["K"]}, d["N"], e.get("outs", len(shapes)))
    if kind == "headnorm_rope":
        return (t.a.get(16), t.a.get(17)) == (d["Hh"], d["D"])
    if kind == "act_down":
        return (t.a.get(16), t.a.get(18)) == (d["F"], d["H"])
    if kind == "decode_attention":
        return t.variant == f"mk_attention<{d['D']},{d['G']}>"
    return False


# ------------------------------------------------------------------ rebuild: ops, events, placement
def _rebuild(plan: Plan, rw: _Rewriter) -> SuperoptPlan:
    news: list[_New] = []
    last: dict[int, int] = {}
    for i, o in enumerate(plan.ops):
        for n in rw.replace.get(
            i, [_New(o.name, o.kind, o.tasks, [(("old", d), lag) for d, lag in o.deps], o.jit)]
        ):
            news.append(n)
        last[i] = len(news) - 1
        if i == rw.table_after:
            news.extend(rw.tables.values())
    if rw.table_after < 0:  # no producer of the positions: the tables go first
        news[:0] = list(rw.tables.values())
        last = {i: j + len(rw.tables) for i, j in last.items()}
    index = {n.name: j for j, n in enumerate(news)}
    if len(index) != len(news):
        raise MpkError(Diagnostic("superopt rewrite: duplicate op names", None))
    ops: list[Op] = []
    for j, n in enumerate(news):
        deps = set()
        for (k, ref), lag in n.deps:
            d = last[ref] if k == "old" else index[ref]
            if lag == 0 and d >= j:
                raise MpkError(Diagnostic(f"superopt rewrite: op {n.name} would wait on a later op", None))
            deps.add((d, lag))
        ops.append(Op(n.name, n.kind, list(n.tasks), sorted(deps), n.jit))
    lists = place(ops, plan.num_sms, plan.sched_warps > 0)
    base = {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan)}
    buffers = {**plan.buffers, **rw.buffers}
    smem = max([plan.smem_bytes, rw.smem_floor] + [v.smem_bytes for v in rw.variants.values()])
    base.update(
        buffers=buffers,
        ops=ops,
        lists=lists,
        smem_bytes=smem,
        variants=sorted({t.variant for o in ops for t in o.tasks}),
        sched_warps=sched_warps(ops) if plan.sched_warps else 0,
    )
    used = {t.variant for o in ops for t in o.tasks}
    so = tuple(v for v in rw.variants.values() if v.variant in used)
    return SuperoptPlan(**base, so_variants=so, decisions=tuple(rw.decisions))


# ------------------------------------------------------------------ switch
def superopt_setting(value: str | None = None) -> tuple[list[dict] | None, tuple[str, ...]]:
    """(programs or None when off, forced kinds) from ``MPKIR_SUPEROPT`` / ``MPKIR_SUPEROPT_FORCE`` (or
    ``value``): unset/""/"0" off, "1" the default JSON, anything else a JSON path."""
    v = os.environ.get(ENV_VAR, "") if value is None else value
    force = tuple(k for k in os.environ.get(ENV_FORCE, "").split(",") if k)
    if v in ("", "0"):
        return None, force
    return load_programs(None if v == "1" else v), force


def maybe_apply(plan: Plan, module: ir.Module, superopt: bool | str | None = None) -> Plan:
    """``plan`` with found programs applied when ``superopt`` (True, or a JSON path) or, when it is None,
    the ``MPKIR_SUPEROPT`` environment variable asks for it; else ``plan`` unchanged."""
    if superopt is False:
        return plan
    programs, force = superopt_setting("1" if superopt is True else superopt)
    if programs is None:
        return plan
    return apply_found_programs(plan, module, programs, force=force)


def lower_superopt(
    module: ir.Module, *, programs=None, force=(), extend: bool = True, **lower_kw
) -> SuperoptPlan:
    """``lower`` then :func:`apply_found_programs` (the test/bench entry point)."""
    from mpkir.codegen.lower import lower

    return apply_found_programs(lower(module, **lower_kw), module, programs, force=force, extend=extend)
