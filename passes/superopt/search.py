"""Enumeration, pruning, verification, ranking and caching of block programs for one subgraph.

* ``norm_linear`` and ``act_down``: a bounded, canonical-order DFS over block ops (body region, then
  one ``sum`` accumulator per unconsumed body tensor, then the epilogue), every new tensor pruned unless
  its abstract expression is a subexpression of the target's (Z3, :mod:`prove`); a closed program whose
  finite-field fingerprint equals the target's is a structure.  Input maps are fixed per kind (the
  reduction dim is looped, the output dim spread over the grid); grid and loop sizes are enumerated.
* ``headnorm_rope`` and ``decode_attention``: enumeration of structural choices (grid layout; split-KV
  count, loop tile, merge with or without the exp(mᵢ−m) rescale).
Every structure is ranked by :func:`cost`; the winner is verified by finite-field testing at a small
and the full size and proved by Z3 on a tiny symbolic instance before it is returned.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from mpkir.passes.superopt import interp
from mpkir.passes.superopt.cuda import SMEM_LIMIT, emit_bodies
from mpkir.passes.superopt.domains import Field
from mpkir.passes.superopt.program import Fused, Input, Op, Output, Program, parse_fused, print_fused
from mpkir.passes.superopt.prove import Abstract, ff_equal, z3_equal
from mpkir.passes.superopt.targets import Subgraph, inputs_of, output_shape, target

VERSION = "superopt-7"  # 7: cost model calibrated on the H100
ARITY = {
    "exp": 1,
    "silu": 1,
    "rsqrt": 1,
    "square": 1,
    "sum": 1,
    "rsqrt_mean": 1,
    "add": 2,
    "sub": 2,
    "mul": 2,
    "div": 2,
    "matmul_nt": 2,
}
COMMUTATIVE = {"add", "mul"}


@dataclass
class Stats:
    explored: int = 0
    pruned: int = 0
    closed: int = 0
    structures: int = 0
    z3_queries: int = 0
    seconds: float = 0.0
    complete: bool = True


@dataclass
class Result:
    subgraph: Subgraph
    program: Fused
    cost: dict
    baseline: dict
    proof: dict
    stats: Stats
    alternatives: int = 0
    cached: bool = False
    notes: list = field(default_factory=list)
    handwritten: dict = field(default_factory=dict)  # the megakernel's own body, on the same cost model

    @property
    def gain(self) -> float:
        return self.baseline["time_ns"] / max(self.cost["time_ns"], 1e-9)

    @property
    def decision(self) -> tuple[bool, str]:
        """(apply the found program?, why): only a predicted win over both the unfused ops and the
        hand-written body is applied; a loss or a tie keeps what exists."""
        if self.gain <= 1.0:
            return False, f"predicted gain {self.gain:.2f}x <= 1 over the unfused ops: not applied"
        hw = self.handwritten.get("time_ns")
        if hw is not None and self.cost["time_ns"] >= hw:
            return False, (
                f"hand-written {self.handwritten['body']} predicted {hw / 1000:.1f} us <= found "
                f"{self.cost['time_ns'] / 1000:.1f} us: hand-written kept"
            )
        return True, f"predicted gain {self.gain:.2f}x, beats the hand-written body: applied"


# ------------------------------------------------------------------ cost model
# Calibrated on the H100 (NVIDIA H100 80GB HBM3, 2026-11-25; raw data passes/superopt/calibration_h100.json,
# copied from bench/superopt_h100.json (11:18 UTC) and bench/superopt_mk_h100.json (11:42 UTC); tables in
# bench/RESULTS.md "Superoptimizer: found programs as task bodies" / "... inside the real megakernel").
# The first model (uncalibrated) gave the generic bodies HBM bandwidth and predicted gains of 1.4-2.6x that
# the megakernel did not see (Qwen3-0.6B 2.36 -> 3.04 ms/step, Llama-3.2-1B 2.01 -> 3.74).
# What the H100 said (a grid fit over the 12 measured rows, found and unfused: every predicted time within
# 1.41x of the measured one and every found-vs-unfused ordering right, with >= 5% margin; 9 parameters for
# 24 numbers, so read them as a calibration of these body families, not as a general GPU model):
#  * generic bodies (float32 CUDA-core code, each op a block-stride loop + __syncthreads, tiles loaded
#    synchronously into smem) are latency-bound: a task streams its tiles at ~8-9 GB/s per SM when a tile
#    row is >= 1 KiB (Qwen3 norm_linear N=4096: 144 KiB/task in ~18 us; act_down 192 KiB/task in ~24 us),
#    less for short rows (512 B: 6-7; 128 B: 3.0 (Llama lm_head); 32 B: 0.95 (Qwen3 lm_head)):
#    rate = generic_sm_bw * row / (row + generic_row_half); a block op ~0.25 us; a launch/phase ~4 us
#    (head-norm+rope: 9 ops, 64 tasks, no bytes to speak of: 6.4 us);
#  * the hand-written megakernel bodies stream weights at ~2.7 TB/s: solving ms/step = ops*c + bytes/bw for
#    both models (Qwen3: 311 ops, 1.19 GB of weights, 2.36 ms; Llama: 179 ops, 2.47 GB, 2.01 ms) gives
#    bw = 2.74 TB/s and c = 6.2 us per dependent op; the found act_down cost Llama (3.74-2.01 ms - 16 extra
#    ops * 6.2 us) / 16 = 102 us more per layer than mk_linear, close to what this model gives (found body
#    111 us in the bench vs 33.8 MB / 2.74 TB/s = 12 us);
#  * the unfused baseline (bench/superopt_bench.py: one simple kernel per op) is a launch per kernel, its
#    GEMV (a warp per output column, acc[] in local memory) ~0.08-0.16 us per warp-iteration per SM plus
#    ~0.4 us per warp (acc init, reductions, stores), the
#    elementwise/norm kernels at ~480 GB/s, and its attention dominated by u_pv's serial loop (N*D/1024
#    dependent iterations of ~0.38 us: 207.8 us at D=128, 112 us at D=64, N=4096).
@dataclass(frozen=True)
class GpuSpec:
    name: str = "h100"
    sms: int = 132
    smem: int = 227 * 1024
    bandwidth: float = 3.1e12
    peak: float = 800e12
    task_ns: float = 1500.0
    sync_ns: float = 20.0
    sm_bw_share: float = 3.0  # (unused since calibration; kept for callers that construct a GpuSpec)
    l2_bytes: int = 50 << 20
    l2_speedup: float = 2.5
    # --- calibrated on the H100 (see the comment above)
    launch_ns: float = 4000.0  # one dependent phase: a kernel launch in the bench, a hop in the megakernel
    generic_sm_bw: float = 14e9  # generic body: per-SM tile streaming rate for long rows (bytes/s)
    generic_row_half: float = 384.0  # ... halved at rows of this many contiguous bytes
    generic_op_ns: float = 250.0  # ... one block op (a block-stride smem pass + __syncthreads)
    generic_sm_flops: float = 800e9  # ... float32 CUDA-core FLOP/s per SM
    hw_bw: float = 2.74e12  # hand-written megakernel bodies: achieved streaming bandwidth (ms/step fit)
    unfused_bw: float = 480e9  # the bench's unfused elementwise/norm kernels and its GEMV at full occupancy
    unfused_warp_iter_ns: float = 80.0  # the bench's unfused GEMV: one warp-iteration (256 K) per SM, M=8
    unfused_warp_ns: float = 400.0  # ... a warp's fixed part (acc init, M warp reductions and stores), M=8
    unfused_low_occ: float = 1.0  # ... slower per warp-iteration below 32 warps per SM
    unfused_serial_ns: float = 380.0  # the bench's unfused u_pv: one dependent iteration


def gpu_spec(name: str = "h100") -> GpuSpec:
    try:
        from mpkir.passes.tasks.gpus import get_gpu

        g = get_gpu(name)
        return GpuSpec(
            g.name, g.sms, g.smem_per_sm, g.bandwidth, g.peak_flops, g.task_overhead_ns, l2_bytes=g.l2_bytes
        )
    except Exception:
        return GpuSpec()


def _numel(s):
    return int(np.prod(s)) if s else 1


def _row_bytes(tile, shape, elt) -> int:
    """Contiguous bytes of one tile row: the tile's last dim, extended over leading dims it spans fully."""
    run = 1
    for t, s in zip(reversed(tile), reversed(shape), strict=True):
        run *= t
        if t != s:
            break
    return run * elt


def _generic_rate(gpu: GpuSpec, row: float) -> float:
    return gpu.generic_sm_bw * row / (row + gpu.generic_row_half)


def cost(f: Fused, gpu: GpuSpec, elt: int = 2) -> dict:
    """HBM bytes, FLOPs, smem, syncs and predicted ns of a fused program run as generic task bodies
    (:mod:`cuda`), calibrated on the H100 (see above).  Per program: a launch/phase, then waves of tasks; a
    task loads each loop iteration's tiles at the latency-bound per-SM rate of its row length, runs its
    block ops, and is never faster than the whole program's bytes at HBM bandwidth."""
    total = dict(bytes=0, l2_bytes=0, flops=0, smem=0, syncs=0, time_ns=0.0, tasks=0)
    for p in f.programs:
        tiles = {}
        for i in p.inputs:
            s = list(i.shape)
            for a, d in enumerate(i.imap):
                if d >= 0:
                    s[d] //= p.grid[a]
            if i.fmap >= 0:
                s[i.fmap] //= p.loop
            tiles[i.name] = tuple(s)
        load_ns = 0.0
        hbm = 0.0
        for i in p.inputs:
            b = _numel(tiles[i.name]) * elt
            load_ns += b / _generic_rate(gpu, _row_bytes(tiles[i.name], i.shape, elt)) * 1e9
            reuse = _numel([g for g, d in zip(p.grid, i.imap, strict=True) if d < 0])
            hbm += b * p.loop / (reuse if reuse > 1 and _numel(i.shape) * elt * 4 <= gpu.l2_bytes else 1)
        out_bytes = sum(_numel(o.shape) for o in p.outputs) * elt
        fl = 0
        shapes = dict(tiles)
        for o in p.body + p.epilogue:
            a = [shapes.get(x.lstrip("%"), (1,)) for x in o.args]
            if o.kind in ("matmul", "matmul_nt"):
                m, k = a[0][-2], a[0][-1]
                n = a[1][-2] if o.kind == "matmul_nt" else a[1][-1]
                shapes[o.results[0]] = (*a[0][:-1], n)
                fl += 2 * _numel(a[0][:-2]) * m * n * k * (p.loop if o in p.body else 1)
            else:
                shapes[o.results[0]] = a[0]
                fl += _numel(a[0]) * (p.loop if o in p.body else 1)
        for o in p.accs:
            for r in o.results:
                shapes[r] = shapes.get(o.args[0].lstrip("%"), (1,))
        smem = 4 * sum(_numel(s) for s in shapes.values())
        syncs = (len(p.body) + len(p.accs)) * p.loop + len(p.epilogue) + len(p.outputs)
        n = p.ntasks
        task = p.loop * load_ns + syncs * gpu.generic_op_ns + fl / gpu.generic_sm_flops * 1e9
        t = max(math.ceil(n / gpu.sms) * task, (hbm * n + out_bytes) / gpu.bandwidth * 1e9) + gpu.launch_ns
        total["bytes"] += int(hbm * n) + out_bytes
        total["flops"] += fl * n
        total["smem"] = max(total["smem"], smem)
        total["syncs"] += syncs
        total["tasks"] += n
        total["time_ns"] += t
    total["fits_smem"] = total["smem"] <= gpu.smem
    return total


def baseline_cost(sg: Subgraph, gpu: GpuSpec, elt: int = 2) -> dict:
    """The unfused operators as bench/superopt_bench.py runs them (one simple kernel per operator; calibrated
    on the H100, see above): a launch each, the GEMV by warp-iterations per SM, the rest at unfused_bw."""
    ops = {"norm_linear": 2, "act_down": 2, "headnorm_rope": 2, "decode_attention": 3}[sg.kind]
    ins = inputs_of(sg)
    inter = _numel(output_shape(sg)) if sg.kind != "norm_linear" else sg.d("M") * sg.d("K")
    nbytes = (sum(_numel(s) for s in ins.values()) + _numel(output_shape(sg)) + 2 * inter * (ops - 1)) * elt
    fl = 2 * _numel(output_shape(sg)) * max(sg.d("K") if "K" in dict(sg.dims) else 1, 1)
    t = ops * gpu.launch_ns
    if sg.kind in ("norm_linear", "act_down"):
        m = sg.d("M")
        k, n = (sg.d("K"), sg.d("N")) if sg.kind == "norm_linear" else (sg.d("F"), sg.d("H"))
        warps = n / gpu.sms  # a warp per output column, 256 K per warp-iteration
        occ = 1.0 + gpu.unfused_low_occ * min(1.0, 32.0 / warps)
        per_iter = gpu.unfused_warp_iter_ns * occ * max(m, 1) / 8
        streamed = (n * k + m * k + m * n) * elt / gpu.unfused_bw * 1e9
        per_warp = math.ceil(k / 256) * per_iter + gpu.unfused_warp_ns * max(m, 1) / 8
        gemv = max(warps * per_warp, streamed)
        t += gemv + 3 * m * k * elt / gpu.unfused_bw * 1e9
    elif sg.kind == "headnorm_rope":
        t += nbytes / gpu.unfused_bw * 1e9
    else:
        d, n = sg.d("D"), sg.d("N")
        t += nbytes / gpu.unfused_bw * 1e9 + math.ceil(n * d / 1024) * gpu.unfused_serial_ns
    return dict(bytes=nbytes, flops=fl, kernels=ops, time_ns=t)


# ------------------------------------------------------------------ DFS over block ops
_MAPS = {
    "norm_linear": (
        {"x": ((-1,), 1), "g": ((-1,), 0), "w": ((0,), 1)},
        (1,),
        ("mul", "matmul_nt", "square", "sum", "exp", "silu", "add"),
        ("rsqrt_mean", "mul", "div", "exp"),
    ),
    "act_down": (
        {"gate": ((-1,), 1), "up": ((-1,), 1), "wd": ((0,), 1)},
        (1,),
        ("silu", "mul", "matmul_nt", "exp", "add", "square"),
        ("mul", "silu"),
    ),
}


def _program(sg, grid, loop, body, accs, epi, outval, name):
    maps, omap, _, _ = _MAPS[sg.kind]
    ins = tuple(Input(n, s, maps[n][0], maps[n][1]) for n, s in inputs_of(sg).items())
    return Program(
        name,
        (grid,),
        loop,
        ins,
        tuple(body),
        tuple(accs),
        tuple(epi),
        (Output("y", output_shape(sg), outval, omap),),
    )


def _attrs(sg, kind):
    if kind == "sum":
        return (("axis", -1),)
    if kind == "rsqrt_mean":
        return (("n", float(sg.d("K") if "K" in dict(sg.dims) else sg.d("D"))), ("eps", sg.c("eps")))
    return ()


def _ff_inputs(sg, seed=1):
    rng = np.random.default_rng(seed)
    dom = Field(salt=seed)
    return dom, {n: dom.random(rng, s) for n, s in inputs_of(sg).items()}


def dfs(sg_small: Subgraph, max_body=4, max_epi=2, max_states=20000, deadline=None, ab=None):
    """Structures (body, accs, epilogue, output) that compute the target, and the search statistics."""
    ab = ab or Abstract()
    stats = Stats()
    _, _, body_ops, epi_ops = _MAPS[sg_small.kind]
    tgt = target(sg_small)
    T = abstract_of(tgt, ab)
    dom, ffin = _ff_inputs(sg_small)
    want = interp.run_program(tgt, ffin, dom)["y"]
    loop = 2
    fl_in = {n: np.random.default_rng(3).standard_normal(s) + 2.0 for n, s in inputs_of(sg_small).items()}
    probe = _program(sg_small, 1, loop, (), (), (), "%x", "probe")
    tiles = {i.name: interp._tile(interp_float(), fl_in[i.name], i, (0,), 0, probe) for i in probe.inputs}
    found, seen, keep = [], set(), []
    start = time.monotonic()

    def over():
        return stats.explored >= max_states or (deadline is not None and time.monotonic() > deadline)

    def step(vals, ops, last, consumed, region, avail_ops, fresh):
        """Try every canonical next op; ``vals``: list of (name, abs, tile)."""
        for ki, kind in enumerate(avail_ops):
            n = ARITY[kind]
            idxs = range(len(vals))
            combos = (
                [(i,) for i in idxs]
                if n == 1
                else [(i, j) for i in idxs for j in idxs if (kind not in COMMUTATIVE or i <= j)]
            )
            for args in combos:
                if over():
                    stats.complete = False
                    return
                key = (max(args), ki, args)
                if last is not None and key <= last:
                    continue
                attrs = _attrs(sg_small, kind)
                try:
                    with np.errstate(all="ignore"):
                        tile = interp.apply_op(interp_float(), kind, [vals[a][2] for a in args], dict(attrs))
                except (ValueError, KeyError):
                    continue
                a_expr = ab.apply(kind, [vals[a][1] for a in args], dict(attrs))
                sig = (
                    region,
                    tuple((v[1].get_id(), np.shape(v[2])) for v in vals),
                    a_expr.get_id(),
                    np.shape(tile),
                    frozenset(consumed),
                    len(ops),
                )
                if sig in seen:
                    continue
                seen.add(sig)
                keep.append(a_expr)
                stats.explored += 1
                if not ab.subexpr(a_expr, T):
                    stats.pruned += 1
                    continue
                name = f"{region[0]}{len(ops)}"
                op = Op(
                    (name,),
                    kind,
                    tuple("%" + vals[a][0] if vals[a][0] not in fl_in else vals[a][0] for a in args),
                    attrs,
                )
                fresh([*vals, (name, a_expr, tile)], [*ops, op], key, consumed | {vals[a][0] for a in args})

    def body_state(vals, ops, last, consumed):
        close_body(vals, ops, consumed)
        if len(ops) < max_body:
            step(vals, ops, last, consumed, "body", body_ops, body_state)

    def close_body(vals, ops, consumed):
        leaves = [v for v in vals if v[0] not in fl_in and v[0] not in consumed]
        if not leaves or any(n not in consumed for n in fl_in):
            return
        accs = [Op(("A" + v[0],), "sum", ("%" + v[0],)) for v in leaves]
        acc_vals = [("A" + v[0], v[1], v[2]) for v in leaves]

        def epi_state(evals, eops, elast, econs):
            close_epi(ops, accs, evals, eops, econs)
            if len(eops) < max_epi:
                step(evals, eops, elast, econs, "epi", epi_ops, epi_state)

        epi_state(acc_vals, [], None, set())

    def close_epi(body, accs, evals, eops, econs):
        open_ = [v for v in evals if v[0] not in econs]
        if len(open_) != 1 or tuple(np.shape(open_[0][2]))[-1:] != (output_shape(sg_small)[-1],):
            return
        stats.closed += 1
        prog = _program(sg_small, 1, loop, body, accs, eops, "%" + open_[0][0], "cand")
        try:
            got = interp.run_program(prog, ffin, dom)["y"]
        except Exception as e:
            if os.environ.get("MPKIR_SUPEROPT_DEBUG"):
                print("close failed:", e)
            return
        if got.shape == want.shape and np.array_equal(got.p, want.p) and np.array_equal(got.q, want.q):
            found.append((tuple(body), tuple(accs), tuple(eops), "%" + open_[0][0]))

    body_state([(n, ab.atom(n), t) for n, t in tiles.items()], [], None, set())
    stats.structures = len(found)
    stats.z3_queries = ab.queries
    stats.seconds = time.monotonic() - start
    return found, stats


_DFS_DONE: dict = {}  # (kind, small dims, consts, max_states) -> (structures, stats): a pure function's memo


def _dfs_memo(small: Subgraph, max_states: int, deadline):
    """:func:`dfs` at the small proof size depends only on the kind, the small dims and the constants, so
    every subgraph of a kind (e.g. each linear after a norm) shares one search.  Only searches that were
    not cut by the wall-clock deadline are memoised (the result stays deterministic)."""
    key = (small.kind, small.dims, small.consts, max_states)
    if key in _DFS_DONE:
        structures, st = _DFS_DONE[key]
        return structures, Stats(**{**st.__dict__, "seconds": 0.0})
    t0 = time.monotonic()
    structures, stats = dfs(small, max_states=max_states, deadline=deadline)
    if deadline is None or time.monotonic() < deadline or stats.explored >= max_states:
        _DFS_DONE[key] = (structures, Stats(**{**stats.__dict__, "seconds": time.monotonic() - t0}))
    return structures, stats


def abstract_of(prog: Program, ab: Abstract):
    """The abstract expression of a one-block program's output ``y`` (regions in order)."""
    env = {i.name: ab.atom(i.name) for i in prog.inputs}
    for o in prog.body + prog.accs + prog.epilogue:
        val = ab.apply(
            "sum" if o.kind == "sum" and o in prog.accs else o.kind,
            [env[a.lstrip("%")] for a in o.args],
            dict(o.attrs),
        )
        env[o.results[0]] = val
    return env[prog.outputs[0].value.lstrip("%")]


class _AbsDom:
    """Adapter: the interpreter's domain interface on abstract expressions (whole tensors = atoms)."""

    def __init__(self, ab):
        self.ab = ab

    def take(self, a, sl):
        return a

    def transpose(self, a):
        return a

    def __getattr__(self, kind):
        return lambda *xs: self.ab.apply(
            kind, list(xs[:2] if kind in ("add", "sub", "mul", "div", "matmul", "maximum") else xs[:1]), {}
        )

    def sum(self, a, axis):
        return a

    def max(self, a, axis):
        return self.ab.apply("max", [a], {})

    def const(self, c, like=None):
        return self.ab.z3.Real(f"c_{c!r}")

    def inv_int(self, n):
        return self.ab.z3.RealVal(1)

    def rsqrt(self, a):
        return self.ab.apply("rsqrt", [a], {})

    def exp(self, a):
        return self.ab.apply("exp", [a], {})

    def silu(self, a):
        return self.ab.apply("silu", [a], {})


_FLOAT = None


def interp_float():
    global _FLOAT
    if _FLOAT is None:
        from mpkir.passes.superopt.domains import Float

        _FLOAT = Float()
    return _FLOAT


# ------------------------------------------------------------------ structural enumeration
def _divisors(n, options):
    return [d for d in options if d >= 1 and n % d == 0]


def handwritten(sg: Subgraph, gpu: GpuSpec) -> dict:
    """The megakernel's hand-written body for this subgraph (``codegen/mk_tasks.cuh``, tiles chosen as in
    ``codegen/lower.py``): its dependent phases and compulsory bytes at the bandwidth the hand-written bodies
    achieved inside the megakernel on the H100 (``hw_bw``, fitted from ms/step; see the cost model)."""
    ins = inputs_of(sg)
    nbytes = (sum(_numel(s) for s in ins.values()) + _numel(output_shape(sg))) * 2
    if sg.kind in ("norm_linear", "act_down"):
        # mk_linear, prologue mode 1 (rmsnorm) / 2 (silu*up): normalise/activate x, then the GEMV over the
        # whole K, R rows of W per task with R*K*2 <= 1 MiB
        n, k = output_shape(sg)[-1], sg.d("K") if sg.kind == "norm_linear" else sg.d("F")
        mult = 1
        while math.ceil(n / (gpu.sms * mult)) * k * 2 > 1 << 20 and math.ceil(n / (gpu.sms * mult)) > 1:
            mult += 1
        grid = math.ceil(n / math.ceil(n / (gpu.sms * mult)))
        body, phases = f"mk_linear mode {1 if sg.kind == 'norm_linear' else 2}, grid({grid})", 1
    elif sg.kind == "headnorm_rope":
        body, phases = "mk_head_norm_rope, one task per token", 1
    else:
        splits = max(d for d in _divisors(sg.d("N"), (1, 2, 4, 8, 16)))
        body, phases = f"mk_attention split-KV S={splits} + mk_attention_merge", 2
    t = phases * gpu.launch_ns + nbytes / gpu.hw_bw * 1e9
    return {"body": body, "bytes": nbytes, "phases": phases, "time_ns": t}


def _concretize(sg: Subgraph, structure, grid, loop) -> Fused:
    body, accs, epi, outval = structure
    body = tuple(_resize_op(sg, o) for o in body)
    epi = tuple(_resize_op(sg, o) for o in epi)
    return Fused((_program(sg, grid, loop, body, accs, epi, outval, f"{sg.kind}"),))


def _resize_op(sg, o):
    if o.kind == "rsqrt_mean":
        return Op(o.results, o.kind, o.args, _attrs(sg, "rsqrt_mean"))
    return o


def headnorm_rope_layout(sg: Subgraph, ts: int, hs: int, norm_after: bool = False) -> Fused:
    """Head norm + rope over a (ts × hs) grid of (token, head) blocks (sizes that do not divide fall back to
    one block).  ``norm_after``: the row factor rsqrt(mean x²+eps) applied after the rope — rope is linear
    per row, so the scalar commutes with it (a rewrite; verified like every candidate)."""
    t = target(sg)
    ts = ts if sg.d("T") % ts == 0 else 1
    hs = hs if sg.d("Hh") % hs == 0 else 1
    imaps = {"x": (0, 1), "g": (-1, -1), "cos": (0, -1), "sin": (0, -1)}
    ins = tuple(Input(i.name, i.shape, imaps[i.name], -1) for i in t.inputs)
    body = t.body
    if norm_after:
        ops = {o.results[0]: o for o in t.body}
        body = (
            ops["s"],
            ops["ss"],
            ops["r"],
            Op(("xg",), "mul", ("x", "g")),
            ops["c"],
            ops["rh"],
            ops["sr"],
            Op(("y0",), "add", ("%c", "%sr")),
            Op(("y",), "mul", ("%y0", "%r")),
        )
    name = f"headnorm_rope_{ts}x{hs}" + ("_normafter" if norm_after else "")
    prog = Program(name, (ts, hs), 1, ins, body, (), (), (Output("y", output_shape(sg), "%y", (0, 1)),))
    return Fused((prog,))


def headnorm_rope_program(sg: Subgraph, grid_kind: str) -> Fused:
    """The three classic layouts: a task per (token, head), per token, or per head."""
    ts, hs = {"token_head": (sg.d("T"), sg.d("Hh")), "token": (sg.d("T"), 1), "head": (1, sg.d("Hh"))}[
        grid_kind
    ]
    return headnorm_rope_layout(sg, ts, hs)


def attention_program(sg: Subgraph, splits: int, loop: int, rescale: bool = True) -> Fused:
    g, d, n = sg.d("G"), sg.d("D"), sg.d("N")
    k1 = Program(
        "attn_split_kv",
        (splits,),
        loop,
        (Input("q", (g, d), (-1,), -1), Input("k", (n, d), (0,), 0), Input("v", (n, d), (0,), 0)),
        (Op(("s",), "matmul_nt", ("q", "k")), Op(("s2",), "scale", ("%s",), (("c", sg.c("scale")),))),
        (Op(("o", "l", "m"), "online_softmax", ("%s2", "v")),),
        (),
        (
            Output("o_part", (splits, g, d), "%o", (0,)),
            Output("l_part", (splits, g, 1), "%l", (0,)),
            Output("m_part", (splits, g, 1), "%m", (0,)),
        ),
    )
    ins = (
        Input("o_part", (splits, g, d), (-1,), -1),
        Input("l_part", (splits, g, 1), (-1,), -1),
        Input("m_part", (splits, g, 1), (-1,), -1),
    )
    if rescale:
        body = (
            Op(("M",), "max", ("m_part",), (("axis", 0),)),
            Op(("dm",), "sub", ("m_part", "%M")),
            Op(("w",), "exp", ("%dm",)),
            Op(("ow",), "mul", ("o_part", "%w")),
            Op(("num",), "sum", ("%ow",), (("axis", 0),)),
            Op(("lw",), "mul", ("l_part", "%w")),
            Op(("den",), "sum", ("%lw",), (("axis", 0),)),
            Op(("y",), "div", ("%num", "%den")),
        )
    else:  # the classic bug: partials merged without the exp(m_i - m) rescale
        body = (
            Op(("num",), "sum", ("o_part",), (("axis", 0),)),
            Op(("den",), "sum", ("l_part",), (("axis", 0),)),
            Op(("y",), "div", ("%num", "%den")),
        )
    k2 = Program("attn_merge", (1,), 1, ins, body, (), (), (Output("y", (g, d), "%y", (-1,)),))
    return Fused((k1, k2))


# ------------------------------------------------------------------ verification
def verify(sg: Subgraph, make, sizes_ff, size_z3) -> dict:
    """``make(sg) -> Fused``; finite-field test at each size in ``sizes_ff`` and Z3 at ``size_z3``."""
    out = {"finite_field": [], "z3": None}
    for s in sizes_ff:
        g = sg.resized(**s)
        f, t = make(g), target(g)
        ok, why = ff_equal(
            lambda ins, dom, f=f: {"y": interp.run_fused(f, ins, dom)["y"]},
            lambda ins, dom, t=t: interp.run_program(t, ins, dom),
            lambda mk, g=g: {n: mk(sh) for n, sh in inputs_of(g).items()},
            trials=3,
        )
        out["finite_field"].append({"dims": s, "ok": ok, "why": why})
        if not ok:  # refuted: no need for Z3
            out["z3"], out["proved"] = (
                {"dims": size_z3, "status": "skipped", "why": "refuted by finite field"},
                False,
            )
            return out
    g = sg.resized(**size_z3)
    f, t = make(g), target(g)
    status, why = z3_equal(
        lambda ins, dom: {"y": interp.run_fused(f, ins, dom)["y"]},
        lambda ins, dom: interp.run_program(t, ins, dom),
        lambda mk: {n: mk(sh) for n, sh in inputs_of(g).items()},
    )
    out["z3"] = {"dims": size_z3, "status": status, "why": why}
    out["proved"] = all(x["ok"] for x in out["finite_field"]) and status == "proved"
    return out


_SMALL = {
    "norm_linear": dict(M=2, K=8, N=4),
    "act_down": dict(M=2, F=8, H=4),
    "headnorm_rope": dict(T=2, Hh=2, D=4),
    "decode_attention": dict(G=2, D=2, N=8),
}
_TINY_Z3 = {
    "norm_linear": dict(M=1, K=4, N=2),
    "act_down": dict(M=1, F=4, H=2),
    "headnorm_rope": dict(T=1, Hh=2, D=4),
    "decode_attention": dict(G=1, D=1, N=4),
}


def _float_check(sg: Subgraph, f: Fused) -> float:
    rng = np.random.default_rng(0)
    ins = {n: rng.standard_normal(s) for n, s in inputs_of(sg).items()}
    a = interp.run_fused(f, ins, interp_float())["y"]
    b = interp.run_program(target(sg), ins, interp_float())["y"]
    return float(np.linalg.norm(a.reshape(b.shape) - b) / np.linalg.norm(b))


def search(
    sg: Subgraph, gpu: GpuSpec | None = None, seed: int = 0, budget_s: float = 30.0, max_states: int = 20000
) -> Result:
    """Search, rank, verify; raises LookupError when nothing verified is found."""
    gpu = gpu or gpu_spec()
    t0 = time.monotonic()
    deadline = t0 + budget_s
    cands: list[tuple[str, object]] = []  # (description, maker)
    stats = Stats()
    if sg.kind in _MAPS:
        small = sg.resized(**_SMALL[sg.kind])
        structures, stats = _dfs_memo(small, max_states, deadline)
        red = "K" if sg.kind == "norm_linear" else "F"
        n_out = output_shape(sg)[-1]
        for si, st in enumerate(structures):
            for grid in [d for d in range(8, 4097) if n_out % d == 0][:48] or [1]:
                for tile in (8, 16, 32, 64, 128, 192, 256, 512, 1024):
                    if sg.d(red) % tile == 0:
                        loop = sg.d(red) // tile
                        cands.append(
                            (
                                f"structure {si} grid({grid}) loop({loop})",
                                lambda g, st=st, grid=grid, tile=tile: _concretize(
                                    g,
                                    st,
                                    min(grid, output_shape(g)[-1]),
                                    max(1, min(g.d(red) // tile, g.d(red))) if g is sg else 2,
                                ),
                            )
                        )
    elif sg.kind == "headnorm_rope":
        # every (token blocks × head blocks) grid, with the norm factor before or after the rope
        for ts in _divisors(sg.d("T"), range(1, sg.d("T") + 1)):
            for hs in _divisors(sg.d("Hh"), range(1, sg.d("Hh") + 1)):
                for after in (False, True):
                    stats.explored += 1
                    cands.append(
                        (
                            f"grid ({ts} token x {hs} head blocks), norm "
                            f"{'after' if after else 'before'} rope",
                            lambda g, ts=ts, hs=hs, a=after: headnorm_rope_layout(g, ts, hs, a),
                        )
                    )
    elif sg.kind == "decode_attention":
        for splits in _divisors(sg.d("N"), (1, 2, 4, 8, 16, 32, 64)):
            for tile in (32, 64, 128):
                if (sg.d("N") // splits) % tile == 0:
                    for rescale in (True, False):
                        stats.explored += 1
                        cands.append(
                            (
                                f"split_kv={splits} loop={sg.d('N') // splits // tile} rescale={rescale}",
                                lambda g, s=splits, t=tile, r=rescale: attention_program(
                                    g,
                                    min(s, g.d("N")) if g is sg else 2,
                                    (g.d("N") // s // t) if g is sg else 2,
                                    r,
                                ),
                            )
                        )
    ranked = []
    for desc, make in cands:
        try:
            f = make(sg)
            c = cost(f, gpu)
            if c["fits_smem"]:  # the emitted task body's exact dynamic shared memory
                c["smem"] = max(b.smem_bytes for b in emit_bodies(f))
                c["fits_smem"] = c["smem"] <= min(gpu.smem, SMEM_LIMIT)
        except Exception:
            stats.pruned += 1
            continue
        if not c["fits_smem"]:
            stats.pruned += 1
            continue
        ranked.append((c["time_ns"], desc, make, f, c))
    ranked.sort(key=lambda r: (r[0], r[1]))
    base = baseline_cost(sg, gpu)
    proofs: dict[str, dict] = {}  # candidates that coincide at the proof sizes share one proof
    for _t, desc, make, f, c in ranked:
        small = _SMALL[sg.kind]
        key = print_fused(make(sg.resized(**small))) + print_fused(make(sg.resized(**_TINY_Z3[sg.kind])))
        if key not in proofs:
            proofs[key] = verify(sg, make, [small], _TINY_Z3[sg.kind])
        proof = json.loads(json.dumps(proofs[key]))
        if not proof["proved"]:
            stats.pruned += 1
            continue
        ff_full = ff_equal(
            lambda ins, dom, f=f: {"y": interp.run_fused(f, ins, dom)["y"]},
            lambda ins, dom: interp.run_program(target(sg), ins, dom),
            lambda mk: {n: mk(sh) for n, sh in inputs_of(sg).items()},
            trials=1,
            seed=seed,
        )
        proof["finite_field"].append({"dims": dict(sg.dims), "ok": ff_full[0], "why": ff_full[1]})
        if not ff_full[0]:
            stats.pruned += 1
            continue
        proof["float64_rel_err"] = _float_check(sg, f)
        stats.seconds = time.monotonic() - t0
        return Result(
            sg,
            f,
            c,
            base,
            proof,
            stats,
            alternatives=len(ranked),
            notes=[desc],
            handwritten=handwritten(sg, gpu),
        )
    raise LookupError(f"no verified program for {sg.kind}")


# ------------------------------------------------------------------ cache
def cache_key(sg: Subgraph, gpu: GpuSpec, seed: int, max_states: int) -> str:
    blob = json.dumps(
        {
            "v": VERSION,
            "kind": sg.kind,
            "dims": sorted(sg.dims),
            "consts": sorted(sg.consts),
            "outs": sg.outs,
            "gpu": gpu.name,
            "sms": gpu.sms,
            "seed": seed,
            "states": max_states,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> str:
    return os.environ.get(
        "MPKIR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mpkir", "superopt")
    )


def cached_search(
    sg: Subgraph,
    cache_dir: str | None = None,
    gpu: GpuSpec | None = None,
    seed: int = 0,
    budget_s: float = 30.0,
    max_states: int = 20000,
) -> Result:
    gpu = gpu or gpu_spec()
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, cache_key(sg, gpu, seed, max_states) + ".json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        return Result(
            sg,
            parse_fused(d["program"]),
            d["cost"],
            d["baseline"],
            d["proof"],
            Stats(**d["stats"]),
            d["alternatives"],
            True,
            d["notes"],
            d.get("handwritten") or handwritten(sg, gpu),
        )
    r = search(sg, gpu, seed, budget_s, max_states)
    os.makedirs(cache_dir, exist_ok=True)
    d = {
        "program": print_fused(r.program),
        "cost": r.cost,
        "baseline": r.baseline,
        "proof": r.proof,
        "stats": r.stats.__dict__,
        "alternatives": r.alternatives,
        "notes": r.notes,
        "handwritten": r.handwritten,
    }
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(d, fh, default=float)
    os.replace(tmp, path)
    return r
