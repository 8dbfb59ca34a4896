"""Build a :class:`TaskGraph`: decompose, dependencies, transitive reduction, events, placement, stats."""

from __future__ import annotations

import heapq
import time
from collections import defaultdict

from mpkir import ir
from mpkir.diagnostics import MpkError
from mpkir.passes.tasks.cost import task_ns
from mpkir.passes.tasks.decompose import Decomposer, TaskSpec
from mpkir.passes.tasks.deps import dependency_preds, transitive_reduction
from mpkir.passes.tasks.gpus import GPU, get_gpu
from mpkir.passes.tasks.graph import Event, Placement, Task, TaskGraph


def prepare(module: ir.Module, analysis=None):
    """Unroll (when the graph has loops) and verify; returns ``(module, analysis)``."""
    from mpkir.verify import analyze

    if any(isinstance(s, ir.ForStmt) for g in module.graphs for s in g.body):
        from mpkir.passes.unroll import Unroll

        module = Unroll().run(module)
        analysis = None
    if analysis is None:
        analysis = analyze(module)
    errors = [d for d in analysis.diagnostics if d.severity == "error"]
    if errors:
        raise MpkError(errors)
    return module, analysis


def fuse_events(preds: list[tuple[int, ...]], collapse: bool = True):
    """Events in the one-wait normal form; returns ``(events, wait, after, stats)``.

    Consumers with the same predecessor set share one event (which is then also the one event of that
    producer set); an event with one producer and one consumer is dropped when ``collapse`` (the consumer
    runs after the producer on the same worker).  Event 0 is the end-of-iteration event.
    """
    n = len(preds)
    has_succ = [False] * n
    groups: dict[tuple[int, ...], list[int]] = {}
    n_edges = 0
    for c in range(n):
        ps = preds[c]
        if ps:
            n_edges += len(ps)
            groups.setdefault(ps, []).append(c)
    for ps in groups:
        for p in ps:
            has_succ[p] = True
    after: list[int | None] = [None] * n
    dep_events: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    collapsed = 0
    for prods, cons in sorted(groups.items(), key=lambda kv: kv[1][0]):
        if collapse and len(prods) == 1 and len(cons) == 1:
            after[cons[0]] = prods[0]
            collapsed += 1
            continue
        dep_events.append((prods, tuple(cons)))
    sinks = tuple(t for t in range(n) if not has_succ[t])
    sources = tuple(t for t in range(n) if not preds[t])
    events = [Event(0, sinks, sources, "end")]
    wait: list[int | None] = [None] * n
    for c in sources:
        wait[c] = 0
    for i, (prods, cons) in enumerate(dep_events, start=1):
        events.append(Event(i, prods, cons))
        for c in cons:
            wait[c] = i
    stats = {
        "events_before_fusion": sum(has_succ) + 1,
        "waits_before_fusion": n_edges + len(sources),
        "events_after_fusion": len(groups) + 1,
        "waits_after_fusion": sum(1 for c in range(n) if preds[c]) + len(sources),
        "chains_collapsed": collapsed,
        "events": len(events),
        "waits": sum(1 for w in wait if w is not None),
    }
    stats["events_removed"] = stats["events_before_fusion"] - stats["events"]
    stats["waits_removed"] = stats["waits_before_fusion"] - stats["waits"]
    return events, wait, after, stats


def place(costs: list[float], preds: list[tuple[int, ...]], after: list[int | None], workers: int,
          latency_ns: float):
    """Greedy list scheduling in id order; returns ``(worker per task, est. makespan ns, lists)``."""
    n = len(costs)
    finish = [0.0] * n
    worker = [0] * n
    avail = [0.0] * workers
    heap = [(0.0, w) for w in range(workers)]
    lists: list[list[int]] = [[] for _ in range(workers)]
    memo: dict[int, tuple[float, tuple[int, ...]]] = {}
    for t in range(n):
        ps = preds[t]
        if after[t] is not None:
            ready = finish[after[t]]
        elif ps:
            hit = memo.get(id(ps))
            if hit is None or hit[1] is not ps:
                hit = memo[id(ps)] = (max(finish[p] for p in ps) + latency_ns, ps)
            ready = hit[0]
        else:
            ready = 0.0
        if after[t] is not None:
            w = worker[after[t]]
        else:
            while True:
                a, w = heap[0]
                if a == avail[w]:
                    break
                heapq.heappop(heap)
        start = max(avail[w], ready)
        finish[t] = start + costs[t]
        avail[w] = finish[t]
        heapq.heappush(heap, (avail[w], w))
        worker[t] = w
        lists[w].append(t)
    return worker, max(finish, default=0.0), lists


def critical_path(costs: list[float], preds: list[tuple[int, ...]], latency_ns: float,
                  after: list[int | None]) -> float:
    """Longest path (costs + event latency; a collapsed chain has no latency)."""
    n = len(costs)
    best = [0.0] * n
    memo: dict[int, tuple[float, tuple[int, ...]]] = {}
    for t in range(n):
        ps = preds[t]
        if after[t] is not None:
            best[t] = costs[t] + best[after[t]]
        elif ps:
            hit = memo.get(id(ps))
            if hit is None or hit[1] is not ps:
                hit = memo[id(ps)] = (max(best[p] for p in ps) + latency_ns, ps)
            best[t] = costs[t] + hit[0]
        else:
            best[t] = costs[t]
    return max(best, default=0.0)


def build_task_graph(module: ir.Module, analysis=None, gpu: str | GPU | None = None, graph: str | None = None,
                     workers: int | None = None, collapse: bool = True,
                     drop_edge: tuple[int, int] | None = None) -> TaskGraph:
    """Decompose one graph of ``module`` for ``gpu`` (default: the serve block's target, else H100).

    ``drop_edge`` removes one dependency edge after transitive reduction (testing: necessity).
    """
    t0 = time.perf_counter()
    module, analysis = prepare(module, analysis)
    if gpu is None:
        gpu = getattr(analysis.serve, "target", None) or "h100"
    g = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    nw = workers or g.workers
    dec = Decomposer(module, analysis, g, graph)
    specs: list[TaskSpec] = dec.run()
    t1 = time.perf_counter()
    raw = dependency_preds(specs, dec.tensors)
    t2 = time.perf_counter()
    preds = transitive_reduction(raw)
    if drop_edge is not None:
        p, c = drop_edge
        preds[c] = tuple(x for x in preds[c] if x != p)
    t3 = time.perf_counter()
    events, wait, after, estats = fuse_events(preds, collapse)
    per_stage: dict[int, int] = defaultdict(int)
    for s in specs:
        per_stage[s.stage] += 1
    cost_memo: dict[tuple, float] = {}   # the layers repeat the same tiles

    def cost(s: TaskSpec) -> float:
        key = (s.flops, s.bytes, min(per_stage[s.stage], nw))
        c = cost_memo.get(key)
        if c is None:
            c = cost_memo[key] = task_ns(g, *key)
        return c

    costs = [cost(s) for s in specs]
    worker, makespan, lists = place(costs, preds, after, nw, g.event_latency_ns)
    signals: dict[int, list[int]] = defaultdict(list)
    for e in events:
        for p in e.producers:
            signals[p].append(e.id)
    attr_memo: dict[int, tuple] = {}   # replayed layers share their attrs dicts

    def task_attrs(a: dict) -> tuple:
        hit = attr_memo.get(id(a))
        if hit is None:
            hit = attr_memo[id(a)] = tuple(sorted((k, v) for k, v in a.items() if not k.startswith("_")))
        return hit

    tasks = tuple(
        Task(i, s.kind, s.node, s.variant, s.reads, s.writes, task_attrs(s.attrs),
             s.flops, s.bytes, costs[i], wait[i], tuple(signals.get(i, ())), after[i], worker[i])
        for i, s in enumerate(specs))
    t4 = time.perf_counter()
    gdecl = module.graph(graph)
    n = len(tasks)
    stats = {
        "gpu": g.name, "workers": nw, "tasks": n, "ops": len({s.stage for s in specs}),
        "variants": len({t.variant for t in tasks}),
        "edges_raw": sum(map(len, raw)), "edges": sum(map(len, preds)),
        **estats,
        "waits_per_task": round(estats["waits"] / n, 3) if n else 0.0,
        "max_signals_per_task": max((len(t.signals) for t in tasks), default=0),
        "critical_path_us": round(critical_path(costs, preds, g.event_latency_ns, after) / 1e3, 2),
        "est_step_us": round(makespan / 1e3, 2),
        "work_us": round(sum(costs) / 1e3, 2),
        "time_decompose_s": round(t1 - t0, 3), "time_deps_s": round(t2 - t1, 3),
        "time_reduce_s": round(t3 - t2, 3), "time_events_s": round(t4 - t3, 3),
        "time_total_s": round(t4 - t0, 3),
    }
    outputs = tuple("%" + v.name for s in gdecl.body if isinstance(s, ir.ReturnStmt) for v in s.values)
    return TaskGraph(
        model=module.model_name or "", graph=gdecl.name, gpu=g.name, num_workers=nw, tensors=dec.tensors,
        inputs=tuple("%" + p.name for p in gdecl.params), outputs=outputs, tasks=tasks,
        events=tuple(events), end_event=0, placement=Placement(tuple(tuple(w) for w in lists)),
        edges=tuple([(p, c) for c, ps in enumerate(preds) for p in ps]), dims=dict(analysis.env.dims),
        stats=stats)
