"""N simulated GPUs: each runs its rank's task graph under the runtime protocol, collectives over peer memory.

Build: :func:`build_multi` shards the module (``passes/shard.py``, one module per rank), decomposes each rank
module with the task-graph pass (:func:`build_rank_graph`: the ordinary decomposition, plus the collective
tasks below) and checks that every rank got the same graph (same tasks, boxes, events, placement).

Collective tasks (tiled, inside each GPU's graph):

``allreduce``         one task per output tile (the decomposer's elementwise tiling).  Rank r's task for tile
                      j reads tile j of the partial sum ``x`` of EVERY rank (its own and, through peer
                      memory, the peers') and writes ``x_0 + x_1 + ... + x_{N-1}`` (float32, rank order,
                      so all ranks get the same bits) into its own tile j of ``y`` (one-shot pull).
``allgather``         one task per source rank q: copies rank q's ``x`` into block q of ``y``.
``argmax_partial``    per row tile: the rank's (max, global index) into scratch ``%y#max`` / ``%y#idx``;
``argmax_merge``      per row tile: merges every rank's pairs (ties to the lowest index).

Cross-GPU dependencies are per tile: a collective task waits on its local event ``e`` (the producers of
exactly the tile it reads) AND, for every peer q it reads from, on q's counter of the same event ``e``
reaching ``num_triggers * it`` (an acquire load of q's counter in peer memory; q's producers signal with a
release add at system scope).  So a tile's reduction starts as soon as that tile has arrived everywhere,
and consumers of ``y`` depend only on the tiles they read (the ordinary tile dependencies of each graph).

Buffers that peers read (the inputs of these tasks) are *symmetric*: allocated on every rank, with two
slots where needed (iteration ``it`` uses slot ``it % 2``: a peer may still read iteration ``it`` while
this rank already writes ``it + 1``; it cannot get to ``it + 2`` before every peer finished ``it``,
because its ``it + 1`` collectives wait on the peers' ``it + 1`` producers).  :func:`slot_plan` proves
one slot enough when later collectives already order the next write after every read (all buffers of
a transformer decode step).  Every element carries the iteration that wrote it; a read of a tile that
is not from the current iteration raises :class:`StaleRead`.

Modes as in :mod:`mpkir.runtime.simulator`: ``aot`` (a worker spins on the head of its list, peer flags
included), ``jit`` (the scheduler dispatches a task when its local event fired and, for collective tasks,
once it has seen the peer flags), ``free``.  One seed picks among the runnable workers of ALL ranks.
``jit-spin`` dispatches collective tasks on their local event alone and lets the worker spin on the peer
flags: it can deadlock (two ranks' workers each spin on a tile whose producer is queued behind the other's
spinning task), which is why ``jit`` polls the peer flags in the scheduler.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mpkir import ir
from mpkir.passes.tasks.graph import Access, Event, Placement, Task, TaskGraph, Tensor
from mpkir.runtime.simulator import Deadlock, Simulator, UnwrittenRead

PEER_KINDS = ("allreduce", "allgather", "argmax_merge")
"""Task kinds that read peers' memory (and so wait on peers' flags)."""

__all__ = ["PEER_KINDS", "PEER_VARIANTS", "Deadlock", "MultiGraph", "StaleRead", "assemble", "build_multi",
           "build_rank_graph", "check_plans",
           "simulate_multi", "slot_plan", "symmetric_tensors"]


def _global_key(name: str) -> tuple[str, int | None]:
    """``"@wq[3]"`` -> ``("wq", 3)``; ``"@embed"`` -> ``("embed", None)``."""
    n = name[1:]
    if n.endswith("]"):
        base, idx = n[:-1].split("[")
        return base, int(idx)
    return n, None


class StaleRead(UnwrittenRead):
    """A task read a (local or peer) symmetric tile that the current iteration had not written."""


# ---------------------------------------------------------------------------------------------- build


def _rank_decomposer():
    from mpkir.passes.tasks.decompose import Decomposer, TaskSpec

    class RankDecomposer(Decomposer):
        """The task decomposition plus the tiled collectives (allgather, allreduce_argmax)."""

        def op_allgather(self, s, ins, outs, attrs, sched):
            x = self.shape(ins[0])
            ax = attrs.get("axis", -1) % len(x)
            for q in range(attrs["parts"]):
                ob = tuple((q * d, (q + 1) * d) if i == ax else (0, d) for i, d in enumerate(x))
                self.emit(TaskSpec("allgather", outs[0], (Access(ins[0], tuple((0, d) for d in x)),),
                                   (Access(outs[0], ob),), {"src": q, "axis": ax}))

        def op_allreduce_argmax(self, s, ins, outs, attrs, sched):
            x = self.shape(ins[0])
            rows = x[:-1]
            mx, ix = outs[0] + "#max", outs[0] + "#idx"
            self.tensors[mx] = Tensor(mx, "f32", rows, "scratch")
            self.tensors[ix] = Tensor(ix, "i32", rows, "scratch")

            def cost(box):
                n = math.prod(b - a for a, b in box) if box else 1
                return 2.0 * n * x[-1], 4.0 * n * x[-1]

            tiles = self.choose(s, rows, {d: 1 for d in range(len(rows))}, cost, sched)
            for box in tiles:
                self.emit(TaskSpec("argmax_partial", outs[0], (Access(ins[0], (*box, (0, x[-1]))),),
                                   (Access(mx, box), Access(ix, box)), {"offset": attrs.get("offset", 0)}))
            self.next_stage()
            for box in tiles:
                self.emit(TaskSpec("argmax_merge", outs[0], (Access(mx, box), Access(ix, box)),
                                   (Access(outs[0], box),), {}))

    return RankDecomposer


def build_rank_graph(module: ir.Module, analysis=None, gpu=None, workers: int | None = None,
                     graph: str | None = None) -> TaskGraph:
    """Like :func:`mpkir.passes.tasks.build_task_graph` for a rank module: the collectives become the tiled
    tasks of the module docstring, and every collective task waits on an event (never a collapsed chain:
    peers read its counter); sharded weights are keyed by :func:`mpkir.models.shard.weight_key`."""
    from mpkir.models.shard import weight_key
    from mpkir.passes.tasks.build import critical_path, fuse_events, place, prepare
    from mpkir.passes.tasks.cost import task_ns
    from mpkir.passes.tasks.deps import dependency_preds, transitive_reduction
    from mpkir.passes.tasks.gpus import GPU, get_gpu

    module, analysis = prepare(module, analysis)
    g = gpu if isinstance(gpu, GPU) else get_gpu(gpu or analysis.serve.target or "h100")
    nw = workers or g.workers
    dec = _rank_decomposer()(module, analysis, g, graph)
    specs = dec.run()
    preds = transitive_reduction(dependency_preds(specs, dec.tensors))
    events, wait, after, stats = fuse_events(preds, True)
    for c, s in enumerate(specs):
        if s.kind in PEER_KINDS and after[c] is not None:   # peers need a counter to read
            events.append(Event(len(events), (after[c],), (c,)))
            wait[c], after[c] = len(events) - 1, None
    stage_n: dict[int, int] = defaultdict(int)
    for s in specs:
        stage_n[s.stage] += 1
    costs = [task_ns(g, s.flops, s.bytes, min(stage_n[s.stage], nw)) for s in specs]
    worker, makespan, lists = place(costs, preds, after, nw, g.event_latency_ns)
    signals: dict[int, list[int]] = defaultdict(list)
    for e in events:
        for p in e.producers:
            signals[p].append(e.id)
    tasks = tuple(
        Task(i, s.kind, s.node, s.variant, s.reads, s.writes,
             tuple(sorted((k, v) for k, v in s.attrs.items() if not k.startswith("_"))),
             s.flops, s.bytes, costs[i], wait[i], tuple(signals.get(i, ())), after[i], worker[i])
        for i, s in enumerate(specs))
    tensors = dict(dec.tensors)
    for name, t in tensors.items():
        if t.kind == "weight":
            base, layer = _global_key(name)
            tensors[name] = dataclasses.replace(t, checkpoint=weight_key(module.weight(base), layer,
                                                                         analysis.env))
    gdecl = module.graph(graph)
    n = len(tasks)
    stats.update({"gpu": g.name, "workers": nw, "tasks": n, "edges": sum(map(len, preds)),
                  "peer_tasks": sum(t.kind in PEER_KINDS for t in tasks),
                  "critical_path_us": round(critical_path(costs, preds, g.event_latency_ns, after) / 1e3, 2),
                  "est_step_us": round(makespan / 1e3, 2)})
    outputs = tuple("%" + v.name for s in gdecl.body if isinstance(s, ir.ReturnStmt) for v in s.values)
    return TaskGraph(
        model=module.model_name or "", graph=gdecl.name, gpu=g.name, num_workers=nw, tensors=tensors,
        inputs=tuple("%" + p.name for p in gdecl.params), outputs=outputs, tasks=tasks, events=tuple(events),
        end_event=0, placement=Placement(tuple(tuple(w) for w in lists)),
        edges=tuple((p, c) for c, ps in enumerate(preds) for p in ps), dims=dict(analysis.env.dims),
        stats=stats)


@dataclass(frozen=True)
class MultiGraph:
    """The task graphs of all ranks (same structure), their modules, and the symmetric tensors with the
    number of slots each needs (:func:`slot_plan`)."""

    modules: tuple[ir.Module, ...]
    graphs: tuple[TaskGraph, ...]
    symmetric: frozenset[str]
    slots: tuple[tuple[str, int], ...] = ()

    @property
    def world(self) -> int:
        return len(self.graphs)

    def peers(self, task: Task, rank: int) -> tuple[int, ...]:
        """The ranks whose memory (and flags) ``task`` of ``rank`` reads."""
        if task.kind == "allgather":
            q = task.attr("src")
            return () if q == rank else (q,)
        if task.kind in PEER_KINDS:
            return tuple(q for q in range(self.world) if q != rank)
        return ()

    def cross_edges(self) -> list[tuple[int, int, int]]:
        """Every cross-GPU dependency as ``(rank, task id, peer rank)``."""
        return [(r, t.id, q) for r, g in enumerate(self.graphs) for t in g.tasks for q in self.peers(t, r)]


def _structure(tg: TaskGraph):
    return [(t.kind, t.reads, t.writes, t.wait, t.signals, t.after, t.worker) for t in tg.tasks]


def build_multi(module: ir.Module, gpus: int | None = None, workers: int | None = None,
                gpu=None) -> MultiGraph:
    """Shard ``module`` for ``gpus`` ranks (default: its serve block) and build every rank's task graph."""
    from mpkir.passes.shard import shard_module
    from mpkir.passes.tasks.build import prepare

    n = gpus or prepare(module)[1].serve.gpus
    return assemble(tuple(shard_module(module, r, n) for r in range(n)), workers, gpu)


def assemble(mods: Sequence[ir.Module], workers: int | None = None, gpu=None) -> MultiGraph:
    """The :class:`MultiGraph` of given rank modules (rank r = position r)."""
    mods = tuple(mods)
    graphs = tuple(build_rank_graph(m, workers=workers, gpu=gpu) for m in mods)
    ref = _structure(graphs[0])
    for r, g in enumerate(graphs[1:], 1):
        if _structure(g) != ref:
            raise AssertionError(f"rank {r}'s task graph differs in structure from rank 0's")
    sym = symmetric_tensors(graphs[0])
    return MultiGraph(mods, graphs, frozenset(sym), tuple(sorted(slot_plan(graphs[0], sym).items())))


def symmetric_tensors(tg: TaskGraph) -> set[str]:
    """Storages that peers read: the inputs of the collective tasks."""
    sym = set()
    for t in tg.tasks:
        if t.kind in PEER_KINDS:
            for a in t.reads:
                name = a.tensor
                while tg.tensors[name].base is not None:
                    name = tg.tensors[name].base
                sym.add(name)
    return sym


def slot_plan(tg: TaskGraph, symmetric) -> dict[str, int]:
    """Slots each symmetric buffer needs: 1 when the protocol already orders every peer's next-iteration
    write after this iteration's reads, else 2 (iteration parity).

    Rank p's write of X in iteration it+1 follows rank r's read of X (collective C) in iteration it when
    (a) a local descendant of C produces the tile of a later all-rank collective (allreduce, argmax merge):
    every peer waits on it within iteration it, so p's next iteration starts after C; or (b) every
    producer of X has an all-rank collective ancestor: in it+1 it waits on r's it+1 producers, which
    start after r's iteration it.  In a transformer only the last collective lacks (a), and it has (b).
    """
    n = len(tg.tasks)
    succ: list[list[int]] = [[] for _ in range(n)]
    pred: list[list[int]] = [[] for _ in range(n)]
    for p, c in tg.edges:
        succ[p].append(c)
        pred[c].append(p)
    gathers = {t.id for t in tg.tasks if t.kind in ("allreduce", "argmax_merge")}
    gate = set().union(*(tg.events[tg.tasks[c].wait].producers for c in gathers)) if gathers else set()
    reaches_gate = [False] * n      # (a): a descendant (or the task) produces an all-rank collective's tile
    for t in range(n - 1, -1, -1):  # ids are a topological order
        reaches_gate[t] = t in gate or any(reaches_gate[c] for c in succ[t])
    after_gather = [False] * n      # (b): an all-rank collective is a proper ancestor
    for t in range(n):
        after_gather[t] = any(p in gathers or after_gather[p] for p in pred[t])

    def storage(name: str) -> str:
        while tg.tensors[name].base is not None:
            name = tg.tensors[name].base
        return name

    readers: dict[str, list[int]] = defaultdict(list)
    writers: dict[str, list[int]] = defaultdict(list)
    for t in tg.tasks:
        if t.kind in PEER_KINDS:
            for a in t.reads:
                readers[storage(a.tensor)].append(t.id)
        for a in t.writes:
            writers[storage(a.tensor)].append(t.id)
    plan = {}
    for x in symmetric:
        ok = all(after_gather[w] for w in writers[x]) or all(reaches_gate[c] for c in readers[x])
        plan[x] = 1 if ok else 2
    return plan


# ---------------------------------------------------------------------------------------------- run


class RankSim(Simulator):
    """One GPU: the single-GPU simulator plus iteration-tagged symmetric buffers (one or two slots)."""

    def __init__(self, mg: MultiGraph, rank: int, weights, state, float_storage="f32",
                 slots: int | None = None):
        super().__init__(mg.graphs[rank], weights, state, float_storage)
        self.rank = rank
        plan = dict(mg.slots)
        self.nslots = {x: slots or plan.get(x, 2) for x in mg.symmetric}
        self.mg = mg
        self.it = 1
        self.peers: list[RankSim] = []
        self.sym: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in mg.symmetric:
            base = self.mem[name]
            k = self.nslots[name]
            self.sym[name] = (np.stack([base] * k), np.zeros((k, *base.shape), np.int64))

    def _sym_views(self, acc: Access, it: int):
        t = self.tg.tensors[acc.tensor]
        st = self._storage(acc.tensor)
        data, tags = self.sym[st]
        box = tuple(slice(a, b) for a, b in acc.box)
        slot = it % self.nslots[st]
        return data[slot].reshape(t.shape)[box], tags[slot].reshape(t.shape)[box]

    def _is_sym(self, acc: Access) -> bool:
        return self._storage(acc.tensor) in self.sym

    def read(self, task: Task, acc: Access) -> np.ndarray:
        if not self._is_sym(acc):
            return super().read(task, acc)
        return self.read_from(self, task, acc)

    def read_from(self, owner: RankSim, task: Task, acc: Access) -> np.ndarray:
        """``acc`` of ``owner``'s symmetric buffer (peer memory when owner is another rank)."""
        data, tags = owner._sym_views(acc, self.it)
        if not (tags == self.it).all():
            where = "its own" if owner is self else f"rank {owner.rank}'s"
            raise StaleRead(f"rank {self.rank} task {task.id} ({task.kind} of {task.node}) reads {where} "
                            f"{acc.tensor}{list(acc.box)} in iteration {self.it}, which holds iteration(s) "
                            f"{sorted(set(np.unique(tags).tolist()))}")
        return np.array(data, copy=True)

    def write(self, acc: Access, value: np.ndarray) -> None:
        if not self._is_sym(acc):
            return super().write(acc, value)
        data, tags = self._sym_views(acc, self.it)
        data[...] = np.asarray(value).reshape(data.shape).astype(data.dtype, copy=False)
        tags[...] = self.it
        return None

    def snapshot_value(self, name: str) -> np.ndarray:
        t = self.tg.tensors[name]
        acc = Access(name, tuple((0, d) for d in t.shape))
        if self._is_sym(acc):
            return np.array(self._sym_views(acc, self.it)[0], copy=True)
        return np.array(self._view(self.mem, acc), copy=True)

    def outputs(self) -> tuple[np.ndarray, ...]:
        if any(self._storage(n) in self.sym for n in self.tg.outputs):
            return tuple(self.snapshot_value(n) for n in self.tg.outputs)
        return super().outputs()

    def execute(self, task: Task) -> None:
        from mpkir.ops.basic import allreduce_combine, argmax_merge, argmax_partial

        k = task.kind
        everyone = [self.peers[q] for q in range(self.mg.world)]
        if k == "allreduce":
            xs = [[self.read_from(o, task, task.reads[0])] for o in everyone]
            self.write(task.writes[0], allreduce_combine(xs, [{}] * len(xs))[0])
        elif k == "allgather":
            src = everyone[task.attr("src")]
            self.write(task.writes[0], self.read_from(src, task, task.reads[0]))
        elif k == "argmax_partial":
            m, i = argmax_partial(self.read(task, task.reads[0]), task.attr("offset"))
            self.write(task.writes[0], m)
            self.write(task.writes[1], i)
        elif k == "argmax_merge":
            pairs = [(self.read_from(o, task, task.reads[0]), self.read_from(o, task, task.reads[1]))
                     for o in everyone]
            self.write(task.writes[0], argmax_merge(pairs))
        else:
            super().execute(task)


def simulate_multi(mg: MultiGraph, weights: Sequence[Mapping[str, np.ndarray]],
                   inputs: Sequence[Mapping[str, np.ndarray]], states: Sequence[Mapping] | None = None, *,
                   mode: str = "aot", seed: int = 0, delay: frozenset[tuple[int, int]] = frozenset(),
                   drop: frozenset[tuple[int, int, int]] = frozenset(), snapshots: list[dict] | None = None,
                   slots: int | None = None):
    """Run ``len(inputs)`` iterations on every rank in one launch.

    ``weights[r]``: rank r's ``{weight_key: array}`` (:func:`mpkir.models.shard.shard_weights`);
    ``inputs``: the same graph inputs for every rank; ``delay``: ``(rank, task id)`` pairs postponed while
    anything else can run; ``drop``: cross-GPU dependencies ``(rank, task id, peer)`` to leave out (testing
    that each is necessary); ``snapshots[r]`` receives rank r's activations after the last iteration;
    ``slots``: slots of every symmetric buffer (default: :func:`slot_plan`, kept in ``mg.slots``).
    Returns ``(outputs[rank][iteration], final state per rank)``.
    """
    if mode not in ("aot", "jit", "free", "jit-spin"):
        raise ValueError(f"unknown mode {mode!r}")
    n = mg.world
    rng = random.Random(seed)
    sims = [RankSim(mg, r, weights[r], (states or [None] * n)[r], slots=slots) for r in range(n)]
    for s in sims:
        s.peers = sims
    tg = mg.graphs[0]
    tasks, events, end, W = tg.tasks, tg.events, tg.end_event, tg.num_workers
    iters = len(inputs)
    counters = [[0] * len(events) for _ in range(n)]
    done: list[set] = [set() for _ in range(n)]
    results: list[list] = [[] for _ in range(n)]
    local = tg.successors_local
    peers = {(r, t.id): tuple(q for q in mg.peers(t, r) if (r, t.id, q) not in drop)
             for r in range(n) for t in tasks}

    def need(e: int, it: int) -> int:
        return events[e].num_triggers * (it - 1 if e == end else it)

    def local_ready(r: int, t: Task, it: int) -> bool:
        if t.after is not None and (t.after, it) not in done[r]:
            return False
        return t.wait is None or counters[r][t.wait] >= need(t.wait, it)

    def peers_ready(r: int, t: Task, it: int) -> bool:
        return all(counters[q][t.wait] >= need(t.wait, it) for q in peers[(r, t.id)])

    def ready(r: int, t: Task, it: int) -> bool:
        return local_ready(r, t, it) and peers_ready(r, t, it)

    queues = [[deque() for _ in range(W)] for _ in range(n)]
    pool: list[tuple[int, int, int]] = []
    pending: list[tuple[int, int, int]] = []  # jit: locally fired, waiting for the peer flags
    if mode == "aot":
        for r in range(n):
            for it in range(1, iters + 1):
                for w, lst in enumerate(tg.placement.workers):
                    queues[r][w].extend((tid, it) for tid in lst)
    elif mode == "free":
        pool = [(r, t.id, it) for r in range(n) for it in range(1, iters + 1) for t in tasks]

    def dispatch(r: int, tid: int, it: int) -> None:
        if mode == "jit" and tasks[tid].after is None:
            pending.append((r, tid, it))
        elif mode == "jit-spin" and tasks[tid].after is None:  # the worker, not the scheduler, waits on peers
            queues[r][rng.randrange(W)].append((tid, it))

    def fire(r: int, e: int, it_done: int) -> None:
        if e == end:
            results[r].append(sims[r].outputs())
            if snapshots is not None and it_done == iters:
                for t in tg.tensors.values():
                    if t.kind in ("activation", "output") and t.base is None:
                        snapshots[r][t.name[1:]] = sims[r].snapshot_value(t.name)
            if it_done < iters:
                sims[r].begin_iteration(inputs[it_done])
                for c in events[e].consumers:
                    dispatch(r, c, it_done + 1)
        else:
            for c in events[e].consumers:
                dispatch(r, c, it_done)

    for r in range(n):
        sims[r].begin_iteration(inputs[0])
        for c in events[end].consumers:
            dispatch(r, c, 1)
    total, executed = n * len(tasks) * iters, 0
    while executed < total:
        if mode == "jit":   # each rank's scheduler pushes tasks whose (peer) flags it has seen
            still = []
            for r, tid, it in pending:
                if peers_ready(r, tasks[tid], it):
                    queues[r][rng.randrange(W)].append((tid, it))
                else:
                    still.append((r, tid, it))
            pending[:] = still
        if mode == "free":
            cands = [i for i, (r, tid, it) in enumerate(pool) if ready(r, tasks[tid], it)]
        else:
            cands = [(r, w) for r in range(n) for w in range(W)
                     if queues[r][w] and ready(r, tasks[queues[r][w][0][0]], queues[r][w][0][1])]
        if not cands:
            raise Deadlock(f"no runnable task on any of {n} GPUs after {executed} of {total} task runs")
        if delay:
            def key(c):
                if mode == "free":
                    return pool[c][:2]
                return (c[0], queues[c[0]][c[1]][0][0])
            cands = [c for c in cands if key(c) not in delay] or cands
        c = rng.choice(cands)
        if mode == "free":
            r, tid, it = pool.pop(c)
            w = -1
        else:
            r, w = c
            tid, it = queues[r][w].popleft()
        t = mg.graphs[r].tasks[tid]   # same structure on every rank; attributes (offsets) are the rank's
        sims[r].it = it
        sims[r].execute(t)
        done[r].add((tid, it))
        executed += 1
        if mode in ("jit", "jit-spin"):
            for cid in local.get(tid, ()):
                queues[r][w].append((cid, it))
        for e in t.signals:
            counters[r][e] += 1
            if counters[r][e] == events[e].num_triggers * it:
                fire(r, e, it)
    return results, [s.final_state() for s in sims]


# ------------------------------------------------------------------------------- megakernel rank plans
PEER_VARIANTS = ("mk_allreduce_bf16", "mk_allreduce_f32", "mk_argmax_merge_peers", "mk_allgather_peer")
"""Task bodies of ``codegen/mk_allreduce.cuh`` that wait on peers' counters and read peers' memory."""


def check_plans(plans: Sequence, steps: int = 3, seed: int = 0, peer_waits: bool = True) -> int:
    """Run the CUDA rank plans (``codegen.lower.Plan``, one per rank) under the megakernel's protocol in one
    random interleaving of every worker of every rank: AOT lists walked in order each step, JIT slots
    claimed by ticket, a task runs once its local events reach ``tasks(d) * (it - lag)`` and, for a
    collective, the peers' counter of event ``a[19]`` reaches ``a[20] * it``; tasks are atomic.  Every peer
    (or own) symmetric read at step ``it`` must find exactly ``a[20] * it`` producer signals on the owner:
    fewer is a read before the write, more a write of step ``it + 1`` over a one-slot buffer a reader still
    needs (both :class:`StaleRead`).  :class:`Deadlock` when no worker can move.  Returns the moves made.
    ``peer_waits=False`` drops the peer waits (a test that the check can fail)."""
    rng = random.Random(seed)
    n = len(plans)
    ntask = [[len(o.tasks) for o in p.ops] for p in plans]
    flat = [[(oi, t) for oi, o in enumerate(p.ops) for t in o.tasks] for p in plans]
    counters = [[0] * len(p.ops) for p in plans]
    tickets = [dict() for _ in plans]
    # worker: [rank, list, index, it, claimed task id or None]
    workers = [[r, lst, 0, 1, None] for r, p in enumerate(plans) for lst in p.lists]

    def ready(r: int, tid: int, it: int) -> bool:
        oi, t = flat[r][tid]
        for d, lag in plans[r].ops[oi].deps:
            if it - lag > 0 and counters[r][d] < ntask[r][d] * (it - lag):
                return False
        if peer_waits and t.variant in PEER_VARIANTS:
            qs = [t.a[22]] if t.variant == "mk_allgather_peer" else range(n)
            if any(counters[q][t.a[19]] < t.a[20] * it for q in qs if q != r):
                return False
        return True

    def run(r: int, tid: int, it: int) -> None:
        oi, t = flat[r][tid]
        if t.variant in PEER_VARIANTS:
            for k, (buf, _) in t.p.items():
                if k < 8 and buf.startswith("peer:"):
                    q = int(buf.split(":", 2)[1])
                    got, want = counters[q][t.a[19]], t.a[20] * it
                    if got != want:
                        what = "not yet written" if got < want else "already overwritten by the next step"
                        raise StaleRead(f"rank {r} {plans[r].ops[oi].name} step {it} reads rank {q}'s "
                                        f"{buf.split(':', 2)[2]}: {what} ({got} signals, {want} expected)")
        counters[r][oi] += 1

    def move(w) -> bool:
        """One enabled move of worker w (claim, skip, run, next step); False when it waits or is done."""
        r, lst, i, it, claimed = w
        if it > steps:
            return False
        if i == len(lst):
            w[2], w[3] = 0, it + 1
            return True
        item = lst[i]
        if item < 0 and claimed is None:
            oi = -item - 1
            k = tickets[r].get((oi, it), 0)
            if k < ntask[r][oi]:
                tickets[r][(oi, it)] = k + 1
                w[4] = plans[r].ops[oi].first_task + k
            else:
                w[2] = i + 1
            return True
        tid = claimed if item < 0 else item
        if not ready(r, tid, it):
            return False
        run(r, tid, it)
        if item < 0:
            w[4] = None
        else:
            w[2] = i + 1
        return True

    moves = 0
    while True:
        order = list(range(len(workers)))
        rng.shuffle(order)
        if not any(move(workers[k]) for k in order):
            break
        moves += 1
    left = [(w[0], w[3]) for w in workers if w[3] <= steps]
    if left:
        raise Deadlock(f"{len(left)} workers stuck, e.g. rank {left[0][0]} at step {left[0][1]}")
    return moves
