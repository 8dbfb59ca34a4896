"""N simulated GPUs (runtime/multi_sim.py) against the single-GPU reference interpreter.

Sharded runs of the examples (small sizes, N = 2 and 4) give the interpreter's greedy/sampled tokens exactly,
on every rank, in every interleaving (AOT lists, JIT dispatch, free order, over all ranks at once), for
several decode steps in one launch.  Replicated hidden states are bit-identical across ranks and within
float32 rounding of the interpreter: a row-parallel linear rounds each rank's partial dot product (float64
accumulation) to float32 and the allreduce adds those N float32 values in rank order, where the single-GPU
linear rounds the whole dot product once (so about N roundings of 2^-24 per element).  Removing any one
cross-GPU dependency (a collective task waiting on one peer's flag) lets some interleaving read a peer
tile that is not from the current iteration; a single slot per symmetric buffer (no double buffering)
does too; consumers of an allreduce depend only on the tiles they read.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpkir.interpreter import init_state, random_weights, run_graph
from mpkir.models.shard import shard_weights
from mpkir.parser import parse
from mpkir.passes.shard import shard_module
from mpkir.passes.tasks import prepare
from mpkir.printer import print_module
from mpkir.runtime.multi_sim import PEER_KINDS, Deadlock, StaleRead, assemble, build_multi, simulate_multi

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = sorted(p.name for p in EXAMPLES.glob("*.mpk"))
SMALL = {"vocab": 96, "hidden": 32, "layers": 2, "heads": 8, "kv_heads": 4, "head_dim": 8, "ffn": 48,
         "max_seq_len": 32, "page_size": 8, "max_tokens": 4, "max_requests": 2}


def small_source(name: str, n: int) -> str:
    text = (EXAMPLES / name).read_text()

    def sub(m):
        return f"const {m.group(1)} = {SMALL[m.group(1)]}" if m.group(1) in SMALL else m.group(0)

    text = re.sub(r"^const (\w+) = [0-9.e+-]+\s*$", sub, text, flags=re.M)
    return re.sub(r"serve \{", f"serve {{\n  gpus = {n}", text, count=1)


def make_inputs(module, analysis, rng, iters: int):
    """Decode-step inputs at the max sizes: positions advance, each request has its own pages."""
    g = module.graph()
    types = analysis.graphs[g.name].types
    dims = analysis.env.dims
    shape = {p.name: tuple(dims[d] if isinstance(d, str) else d for d in types[p.name].shape)
             for p in g.params}
    B = shape[g.params[0].name][0]
    R, pps = shape.get("page_table", (1, 1))
    seq = (np.arange(B) % R).astype(np.int32)
    table = np.arange(R * pps)[rng.permutation(R * pps)].reshape(R, pps).astype(np.int32)
    vocab = int(analysis.env.consts.get("vocab", 64))
    out = []
    for it in range(iters):
        d = {}
        for p in g.params:
            if p.name == "tokens":
                d[p.name] = rng.integers(0, vocab, size=shape[p.name]).astype(np.int32)
            elif p.name == "positions":
                d[p.name] = (it * (B // R + 1) + np.arange(B) // R).astype(np.int32)
            elif p.name == "seq_ids":
                d[p.name] = seq
            elif p.name == "page_table":
                d[p.name] = table
            else:
                d[p.name] = rng.standard_normal(shape[p.name]).astype(np.float32)
        out.append(d)
    return out


@functools.cache
def case(name: str, n: int, workers: int, iters: int = 3):
    """(multi graph, rank weights, inputs, reference outputs, reference record of the last step)."""
    m = parse(small_source(name, n), name)
    mu, au = prepare(m)
    weights = random_weights(m, au, seed=11)
    inputs = make_inputs(mu, au, np.random.default_rng(5), iters)
    state = init_state(mu, au)
    rec: dict = {}
    ref = [run_graph(mu, x, weights, state, analysis=au, float_storage="f32", record=rec) for x in inputs]
    mg = build_multi(m, workers=workers)
    rank_weights = [shard_weights(rm, weights) for rm in mg.modules]
    return mg, rank_weights, inputs, ref, rec


def states(mg):
    return [init_state(*prepare(rm)) for rm in mg.modules]


def run_and_check(name, n, workers, mode, seed):
    mg, ws, inputs, ref, rec = case(name, n, workers)
    snaps = [{} for _ in range(n)]
    outs, _ = simulate_multi(mg, ws, inputs, states(mg), mode=mode, seed=seed, snapshots=snaps)
    for r in range(n):
        assert len(outs[r]) == len(ref)
        for step, (o, want) in enumerate(zip(outs[r], ref, strict=True)):
            assert np.array_equal(o[0], want[0]), f"rank {r} step {step}: {o[0]} != {want[0]}"
    compared = 0
    for key, v in snaps[0].items():
        want = rec.get(key)
        if want is None or v.dtype.kind != "f" or v.shape != np.shape(want):
            continue
        for s in snaps[1:]:   # replicated values: the same bits on every rank
            assert np.array_equal(s[key], v, equal_nan=True), key
        want = np.asarray(want, np.float64)
        err = np.linalg.norm(v.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30)
        assert err < 2e-6, f"{key}: relative error {err}"
        compared += 1
    assert compared >= 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [2, 4])
def test_sharded_examples_give_the_single_gpu_tokens(name, n):
    for mode, seed in (("aot", 0), ("jit", 1), ("free", 2)):
        run_and_check(name, n, 4, mode, seed)


@settings(max_examples=25)
@given(name=st.sampled_from(NAMES), n=st.sampled_from([2, 4]), workers=st.sampled_from([1, 3, 8]),
       mode=st.sampled_from(["aot", "jit", "free"]), seed=st.integers(0, 10_000))
def test_any_interleaving_of_any_ranks_matches(name, n, workers, mode, seed):
    run_and_check(name, n, workers, mode, seed)


def _stale_or_wrong(mg, ws, inputs, ref, **kw) -> bool:
    try:
        outs, _ = simulate_multi(mg, ws, inputs, states(mg), **kw)
    except StaleRead:
        return True
    return any(not np.array_equal(o[0], w[0]) for ro in outs for o, w in zip(ro, ref, strict=True))


@pytest.mark.parametrize(("name", "n", "limit"), [("qwen3_0_6b.mpk", 2, None), ("llama3_2_1b.mpk", 4, 16),
                                                  ("mlp.mpk", 4, None)])
def test_every_cross_gpu_dependency_is_necessary(name, n, limit):
    mg, ws, inputs, ref, _ = case(name, n, 4)
    tasks, events = mg.graphs[0].tasks, mg.graphs[0].events
    by_kind: dict[str, list] = {}
    for e in mg.cross_edges():
        by_kind.setdefault(tasks[e[1]].kind, []).append(e)
    want = {"qwen3_0_6b.mpk": {"allreduce", "argmax_merge"}, "llama3_2_1b.mpk": {"allreduce", "allgather"},
            "mlp.mpk": {"allreduce", "argmax_merge"}}[name]
    assert set(by_kind) == want
    edges = []
    for kind_edges in by_kind.values():   # a sample of every kind of collective
        k = len(kind_edges) if limit is None else min(len(kind_edges), limit // len(by_kind))
        pick = np.random.default_rng(0).choice(len(kind_edges), k, replace=False)
        edges += [kind_edges[i] for i in sorted(pick)]
    for r, tid, q in edges:
        producers = events[tasks[tid].wait].producers
        delay = frozenset((q, p) for p in producers)
        # with the dependency the delayed producers are waited for; without it the read is stale
        assert not _stale_or_wrong(mg, ws, inputs[:1], ref[:1], mode="free", seed=0, delay=delay)
        assert _stale_or_wrong(mg, ws, inputs[:1], ref[:1], mode="free", seed=0, delay=delay,
                               drop=frozenset({(r, tid, q)})), f"rank {r} t{tid} <- rank {q} is not necessary"


def test_no_deadlock_with_all_workers_resident_but_one_missing_worker_stalls_every_gpu():
    from dataclasses import replace

    from mpkir.passes.tasks.graph import Placement

    mg, ws, inputs, _, _ = case("attention_block.mpk", 2, 3)
    for seed in range(6):
        simulate_multi(mg, ws, inputs, states(mg), mode="aot", seed=seed)
    lists = list(mg.graphs[1].placement.workers)
    lists[0] = ()
    g1 = replace(mg.graphs[1], placement=Placement(tuple(lists)))
    g0 = replace(mg.graphs[0], placement=Placement(tuple(lists)))
    with pytest.raises(Deadlock, match="on any of 2 GPUs"):
        simulate_multi(replace(mg, graphs=(g0, g1)), ws, inputs, states(mg), mode="aot", seed=0)


TILED = """model "tp"
const hidden = 256
const ffn = 512
dim B <= 4
serve { gpus = 2  max_tokens = 4  max_requests = 4 }
weight w_up : f32[ffn, hidden] = "up"
weight w_down : f32[hidden, ffn] = "down"
graph main(%x: f32[B, hidden]) -> (f32[B, hidden]) {
  %u = linear(%x, @w_up)
  %a = silu(%u)
  %d = linear(%a, @w_down) schedule(tasks=2)
  %y = add(%x, %d) schedule(tasks=8)
  return %y
}
"""


@functools.cache
def tiled():
    """TILED on 2 GPUs, the allreduce in 4 tiles (between the producer's 2 and the consumer's 8)."""
    m = parse(TILED, "tp.mpk")
    four = "allreduce(%d_part) schedule(tasks=4)"
    texts = [print_module(shard_module(m, r)).replace("allreduce(%d_part)", four) for r in range(2)]
    mg = assemble([parse(t) for t in texts], workers=4)
    mu, au = prepare(m)
    weights = random_weights(m, au, seed=3)
    ws = [shard_weights(rm, weights) for rm in mg.modules]
    xs = [{"x": np.random.default_rng(i).standard_normal((4, 256)).astype(np.float32)} for i in range(3)]
    ref = [run_graph(mu, x, weights, {}, analysis=au, float_storage="f32") for x in xs]
    return mg, ws, xs, ref


def test_allreduce_tiles_are_precise_dependencies():
    mg, ws, xs, ref = tiled()
    g = mg.graphs[0]
    tasks = g.tasks
    ar = [t for t in tasks if t.kind == "allreduce"]
    assert len(ar) == 4
    preds: dict[int, set[int]] = {t.id: set() for t in tasks}
    for p, c in g.edges:
        preds[c].add(p)

    def meets(a, b):
        return all(x0 < y1 and y0 < x1 for (x0, x1), (y0, y1) in zip(a, b, strict=True))

    # cross-GPU: a tile's reduction waits (locally and on every peer) for exactly the writers of its tile
    writers = [t for t in tasks if any(w.tensor == "%d_part" for w in t.writes)]
    assert len(writers) == 2
    for t in ar:
        want = {w.id for w in writers if meets(w.writes[0].box, t.reads[0].box)}
        assert set(g.events[t.wait].producers) == want
        assert mg.peers(t, 0) == (1,) and mg.peers(t, 1) == (0,)
    # next op: a consumer tile depends on exactly the reduced tiles it reads (not the whole allreduce)
    consumers = [t for t in tasks if any(a.tensor == "%d" for a in t.reads)]
    assert len(consumers) == 8
    partial = 0
    for c in consumers:
        box = next(a.box for a in c.reads if a.tensor == "%d")
        want = {t.id for t in ar if meets(t.writes[0].box, box)}
        assert preds[c.id] & {t.id for t in ar} == want
        partial += len(want) < len(ar)
    assert partial == len(consumers)
    # and the tiled run is right
    for mode in ("aot", "jit", "free"):
        outs, _ = simulate_multi(mg, ws, xs, None, mode=mode, seed=4)
        for ro in outs:
            for o, want in zip(ro, ref, strict=True):
                err = np.linalg.norm(o[0].astype(np.float64) - want[0]) / np.linalg.norm(want[0])
                assert err < 1e-6


def test_symmetric_buffers_need_two_slots_unless_later_collectives_order_them():
    """A rank may write its next iteration's partial sums while a peer still reads this iteration's (here
    nothing later in the iteration orders them: one allreduce); two slots make that safe, one does not.
    In a transformer step the later collectives order every next write after the reads: one slot."""
    mg, ws, xs, ref = tiled()
    assert dict(mg.slots) == {"%d_part": 2}
    slow = frozenset((0, t.id) for t in mg.graphs[0].tasks if t.kind == "allreduce")

    def stale(slots: int) -> bool:
        try:
            outs, _ = simulate_multi(mg, ws, xs, None, mode="free", seed=3, delay=slow, slots=slots)
        except StaleRead:
            return True
        return not all(np.allclose(o[0], w[0], rtol=1e-5)
                       for ro in outs for o, w in zip(ro, ref, strict=True))

    assert not stale(2)
    assert stale(1)
    for name, n in (("qwen3_0_6b.mpk", 2), ("llama3_2_1b.mpk", 4)):
        mg, ws, inputs, ref, _ = case(name, n, 4)
        assert set(dict(mg.slots).values()) == {1}
        for r in range(n):  # every rank's collectives postponed as long as possible: still right
            slow = frozenset((r, t.id) for t in mg.graphs[0].tasks if t.kind in PEER_KINDS)
            assert not _stale_or_wrong(mg, ws, inputs, ref, mode="free", seed=r, delay=slow)


@settings(max_examples=40)
@given(data=st.data())
def test_random_modules_shard_and_simulate(data):
    """Any runnable module sharded 2 ways (column/row parallel where the layouts allow, allgather elsewhere):
    every rank's results equal the single-GPU interpreter's (floats within float32 rounding)."""
    import dataclasses

    from mpkir import ir
    from mpkir.diagnostics import MpkError
    from mpkir.testing.strategies import runnable_modules

    m = data.draw(runnable_modules(max_dim=8))
    if any(isinstance(s, ir.OpStmt) and s.op == "allreduce" for g in m.graphs for s in g.body):
        return
    items = (ir.Attr("gpus", ir.Num(2)),)
    if m.serve is not None:
        items = tuple(a for a in m.serve.items if a.key != "gpus") + items
    decls = (*(d for d in m.decls if not isinstance(d, ir.ServeDecl)), ir.ServeDecl(items))
    m = parse(print_module(dataclasses.replace(m, decls=decls)), "random.mpk")
    if not prepare_ok(m):
        return
    try:
        mg = build_multi(m, workers=data.draw(st.integers(1, 4)))
    except MpkError as e:   # e.g. heads that 2 does not divide: a located error
        assert all(d.span is not None for d in e.diagnostics), e.diagnostics
        return
    mu, au = prepare(m)
    weights = random_weights(m, au, seed=1)
    inputs = make_inputs(mu, au, np.random.default_rng(data.draw(st.integers(0, 99))), 2)
    state = init_state(mu, au)
    try:
        ref = [run_graph(mu, x, weights, state, analysis=au, float_storage="f32") for x in inputs]
    except Exception:
        return
    ws = [shard_weights(rm, weights) for rm in mg.modules]
    mode = data.draw(st.sampled_from(["aot", "jit", "free"]))
    outs, _ = simulate_multi(mg, ws, inputs, states(mg), mode=mode, seed=data.draw(st.integers(0, 99)))
    for r in range(2):
        for o, want in zip(outs[r], ref, strict=True):
            for a, b in zip(o, want, strict=True):
                b = np.asarray(b)
                assert a.shape == b.shape
                if a.dtype.kind == "f":
                    b64 = b.astype(np.float64)
                    err = np.linalg.norm(a.astype(np.float64) - b64) / max(np.linalg.norm(b64), 1e-30)
                    assert err < 1e-5 or np.allclose(a, b64, atol=1e-6, equal_nan=True), err
                else:
                    assert np.array_equal(a, b)


def prepare_ok(m) -> bool:
    try:
        prepare(m)
    except Exception:
        return False
    return True


_MID = {  # ops between a column-parallel and a row-parallel linear: kept split, or gathered when they must be
    "silu": "%b = silu(%a)",
    "gelu": "%b = gelu(%a)",
    "mul": "%a2 = linear(%x, @w1b)\n  %b = mul(%a, %a2)",
    "silu_mul": "%a2 = linear(%x, @w1b)\n  %b = silu_mul(%a, %a2)",
    "halves": "%a2 = linear(%x, @w1b)\n  %a3 = concat(%a, %a2)\n  %b = silu_mul(%a3)",
    "softmax": "%b = softmax(%a)",
    "rmsnorm": "%b = rmsnorm(%a, @nf)",
    "heads": "%a3 = reshape(%a, shape=[B, 2, F / 2])\n  %a4 = head_rmsnorm(%a3, @nh)\n"
             "  %b = reshape(%a4, shape=[B, F])",
    "heads_minus": "%a3 = reshape(%a, shape=[-1, 2, F / 2])\n  %b = reshape(%a3, shape=[B, -1])",
}
_TAIL = {
    "argmax": ("%l = linear(%d, @wl)\n  %t = argmax(%l)\n  return %t", "i32[B]"),
    "logits": ("%l = linear(%d, @wl)\n  return %l", "f32[B, V]"),
    "hidden": ("return %d", "f32[B, H]"),
    "softmax": ("%l = linear(%d, @wl)\n  %p = softmax(%l)\n  return %p", "f32[B, V]"),
}


@settings(max_examples=30)
@given(n=st.sampled_from([2, 4]), h=st.sampled_from([8, 12, 16]), f=st.sampled_from([8, 16, 24]),
       v=st.sampled_from([8, 20, 32]), mid=st.sampled_from(sorted(_MID)), tail=st.sampled_from(sorted(_TAIL)),
       mode=st.sampled_from(["aot", "jit", "free"]), seed=st.integers(0, 999))
def test_random_blocks_shard_and_simulate(n, h, f, v, mid, tail, mode, seed):
    """Column → elementwise/normalising op → row → residual → lm_head tail, at random sizes: every rank
    gets the interpreter's result (floats within float32 rounding, tokens exactly)."""
    from mpkir.diagnostics import MpkError

    body, rtype = _TAIL[tail]
    src = f"""model "blk"
const H = {h}
const F = {f}
const V = {v}
dim B <= 3
serve {{ gpus = {n}  max_tokens = 3  max_requests = 3 }}
weight w1 : f32[F, H] = "w1"
weight w1b : f32[F, H] = "w1b"
weight w2 : f32[H, F] = "w2"
weight wl : f32[V, H] = "wl"
weight nf : f32[F] = "nf"
weight nh : f32[F / 2] = "nh"
graph main(%x: f32[B, H]) -> ({rtype}) {{
  %a = linear(%x, @w1)
  {_MID[mid]}
  %c = linear(%b, @w2)
  %d = add(%c, %x)
  {body}
}}
"""
    m = parse(src, "blk.mpk")
    try:
        mg = build_multi(m, workers=3)
    except MpkError as e:
        assert all(d.span is not None for d in e.diagnostics)
        assert mid.startswith("heads") and "does not divide" in e.diagnostics[0].message
        return
    mu, au = prepare(m)
    weights = random_weights(m, au, seed=seed)
    rng = np.random.default_rng(seed)
    xs = [{"x": rng.standard_normal((3, h)).astype(np.float32)} for _ in range(2)]
    ref = [run_graph(mu, x, weights, {}, analysis=au, float_storage="f32") for x in xs]
    ws = [shard_weights(rm, weights) for rm in mg.modules]
    kinds = {t.kind for t in mg.graphs[0].tasks}
    assert "allreduce" in kinds or "allgather" in kinds
    outs, _ = simulate_multi(mg, ws, xs, None, mode=mode, seed=seed)
    for ro in outs:
        for o, want in zip(ro, ref, strict=True):
            a, b = o[0], np.asarray(want[0])
            if a.dtype.kind == "f":
                err = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b)
                assert err < 1e-5, err
            else:
                assert np.array_equal(a, b)


SPIN = """model "spin"
dim B <= 2
serve { gpus = 2  max_tokens = 2  max_requests = 2 }
weight w : f32[256, 64] = "w"
graph main(%x: f32[B, 64]) -> (f32[B, 256]) {
  %u = linear(%x, @w) schedule(tasks=4)
  %a = silu(%u) schedule(tasks=4)
  %d = allreduce(%a) schedule(tasks=4)
  return %d
}
"""


def test_jit_must_poll_peer_flags_in_the_scheduler():
    """A worker that spins on peer flags inside a JIT-dispatched collective can deadlock (each rank spins on
    a tile whose producer sits behind the other rank's spinning task); the scheduler that dispatches a
    collective only once it has seen the peer flags never does."""
    mg = assemble([parse(SPIN), parse(SPIN)], workers=2)   # the rank module of itself (replicated weights)
    w = {"w": np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)}
    xs = [{"x": np.random.default_rng(i).standard_normal((2, 64)).astype(np.float32)} for i in range(2)]
    mu, au = prepare(parse(SPIN))
    ref = [2 * run_graph(mu, x, w, {}, analysis=au, float_storage="f32")[0] for x in xs]  # both ranks add
    spun = []
    for seed in range(120):
        try:
            simulate_multi(mg, [w, w], xs, None, mode="jit-spin", seed=seed)
        except Deadlock:
            spun.append(seed)
            if len(spun) == 3:
                break
    assert spun, "no jit-spin interleaving deadlocked"
    for seed in [*spun, *range(20)]:
        outs, _ = simulate_multi(mg, [w, w], xs, None, mode="jit", seed=seed)
        for ro in outs:
            for o, want in zip(ro, ref, strict=True):
                assert np.allclose(o[0], want, rtol=1e-6)
