"""The task graph: the data model every later stage (CUDA codegen, simulator, emitters) reads.

A :class:`TaskGraph` describes ONE iteration (one decode step) of a graph as tasks (a unit of work for
one SM/worker) and events (monotonic counters).  It is built by :func:`mpkir.passes.tasks.build`
(``build_task_graph(module, analysis, gpu=...)``) from a verified, unrolled module.

Tensors (:class:`Tensor`)
    Every tensor a task touches, by name: weights (``@wq[3]``, ``kind="weight"``, ``checkpoint`` gives the
    checkpoint key; tied weights are separate tensors with the same checkpoint), state (``@k_cache[3]``,
    ``kind="state"``, zero at start, persists across iterations), graph inputs (``%tokens``,
    ``kind="input"``), activations (``%q.3``, ``kind="activation"``), graph outputs (an activation the
    graph returns has ``kind="output"``) and scratch buffers that decomposition adds (split-K / split-KV
    partials, ``kind="scratch"``: ``%y#partial`` f32[S, ..., N] for split-K, ``%o#o`` f32[S, T, Hq, D] and
    ``%o#ml`` f32[S, T, Hq, 2] (running max, sum of exp) for split-KV).  Shapes are concrete: symbolic
    dims are bound to their upper bound (``dim B <= 8`` → 8).  ``base``: a view (``reshape``) has no
    storage of its own; it aliases the row-major storage of tensor ``base`` (same number of elements);
    tasks still name the view and give ranges in the view's shape.

Ranges
    ``Range = tuple[tuple[int, int], ...]``: one half-open ``(start, stop)`` per dimension of the
    tensor (a box).  ``Task.reads`` / ``Task.writes`` are tuples of :class:`Access` (tensor, box) in
    operand order; data-dependent reads (embedding rows, KV-cache positions) list the whole region the
    task may touch.  A task writes exactly its boxes (every element of them).

Tasks (:class:`Task`)
    ``id`` is the index in ``TaskGraph.tasks``; tasks are in a topological order.  ``kind`` is the task
    kind: an operator name (the task computes its write boxes with that operator's semantics on the read
    boxes, operands in order; ``silu_mul`` with ``halves=True`` reads the two halves as two accesses) or
    ``linear_partial`` (x[rows, k-slice] · w[n-tile, k-slice]ᵀ → partial[s]), ``linear_merge``
    (sum of partials in split order, + bias), ``kv_append`` (writes the step's k/v rows of one KV head into
    both caches; reads k, v, page_table, positions, seq_ids, caches), ``paged_attention`` (after
    kv_append: attention of a token range × KV-head range, caches read only), ``attention_partial``
    (positions ``[kv_start, kv_stop)`` only: unnormalised o plus (max, sumexp)), ``attention_merge``,
    ``copy`` (split/concat pieces), ``transpose``.  ``node`` is the SSA result the task helps
    compute (``%q.3``), ``variant`` a deduplication key for code specialisation (kind + tile extents +
    dtypes), ``attrs`` the resolved op attributes plus task parameters (``split``/``splits`` for
    partial tasks) as a sorted tuple of pairs.  ``flops``/``bytes``/``cost_ns`` come from the cost model.

Events (:class:`Event`) and the counter protocol
    Normal form: **every task waits on at most ONE event** (``Task.wait``, or None) and signals a list of
    events (``Task.signals``; usually one or two).  This keeps precision: the event of a consumer is
    the set of consumers sharing exactly the same (transitively reduced) predecessor set, so no task
    waits for a producer it does not depend on.  ``Event.num_triggers == len(Event.producers)``.
    Counters never reset within a launch.  In iteration ``it`` (1-based) a task with ``wait=e`` runs
    once ``counter[e] >= num_triggers(e) * it``; then it runs, then adds 1 to every event in
    ``signals``.  The special event ``TaskGraph.end_event`` (``kind="end"``) is signalled by every sink
    task (no successors); the source tasks of the graph (no predecessors) wait on it with the
    threshold ``num_triggers * (it - 1)`` (so iteration 1 starts at once and iteration ``it`` starts
    after iteration ``it-1`` has finished: this also orders the reuse of activation buffers).
    Collapsed chains: when a producer has exactly one successor and that consumer exactly one
    predecessor, the event between them is removed: ``Task.after`` names the producer, and the
    placement puts the consumer on the producer's worker, right after it (program order replaces
    the event).  Such a task has ``wait=None`` and ``after`` set.

Placement (:class:`Placement`)
    ``workers[w]`` is worker ``w``'s ahead-of-time list of task ids, each list in increasing id
    (topological) order, balanced by estimated cost.  Running all lists with every worker resident
    cannot deadlock (every wait targets lower ids).  ``Task.worker`` repeats it.  JIT data:
    ``Event.consumers`` are the tasks a just-in-time scheduler launches when the event fires
    (contiguous when possible), and ``TaskGraph.successors_local`` maps a task to the collapsed-chain
    tasks to run right after it on the same worker.

``TaskGraph.stats`` holds the numbers the emitters print (tasks, edges, events before/after fusion,
waits per task, critical path, estimated step time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Range = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Tensor:
    """One tensor of the task graph (see module docstring for ``kind`` and ``base``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str  # weight | state | input | activation | output | scratch
    checkpoint: str | None = None
    base: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Access:
    """A box of one tensor: ``box[d] = (start, stop)``."""

    tensor: str
    box: Range

    @property
    def numel(self) -> int:
        n = 1
        for a, b in self.box:
            n *= b - a
        return n


@dataclass(frozen=True)
class Task:
    """One unit of work for one worker; see the module docstring."""

    id: int
    kind: str
    node: str
    variant: str
    reads: tuple[Access, ...]
    writes: tuple[Access, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    flops: float = 0.0
    bytes: float = 0.0
    cost_ns: float = 0.0
    wait: int | None = None
    signals: tuple[int, ...] = ()
    after: int | None = None
    worker: int = -1

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default


@dataclass(frozen=True)
class Event:
    """A counter: fires in iteration ``it`` when ``num_triggers * it`` producers completed."""

    id: int
    producers: tuple[int, ...]
    consumers: tuple[int, ...]
    kind: str = "dep"  # dep | end

    @property
    def num_triggers(self) -> int:
        return len(self.producers)


@dataclass(frozen=True)
class Placement:
    """Per-worker ahead-of-time task lists (ids in increasing order)."""

    workers: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class TaskGraph:
    """One iteration of a graph as tasks and events (see the module docstring)."""

    model: str
    graph: str
    gpu: str
    num_workers: int
    tensors: dict[str, Tensor]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tasks: tuple[Task, ...]
    events: tuple[Event, ...]
    end_event: int
    placement: Placement
    edges: tuple[tuple[int, int], ...] = ()  # transitively reduced dependency edges (producer, consumer)
    dims: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def successors_local(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {}
        for t in self.tasks:
            if t.after is not None:
                out.setdefault(t.after, []).append(t.id)
        return {k: tuple(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (the ``taskjson`` emitter prints it)."""
        return {
            "model": self.model, "graph": self.graph, "gpu": self.gpu, "num_workers": self.num_workers,
            "dims": self.dims, "inputs": list(self.inputs), "outputs": list(self.outputs),
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "kind": t.kind,
                         "checkpoint": t.checkpoint, "base": t.base} for t in self.tensors.values()],
            "tasks": [{"id": t.id, "kind": t.kind, "node": t.node, "variant": t.variant,
                       "reads": [[a.tensor, [list(r) for r in a.box]] for a in t.reads],
                       "writes": [[a.tensor, [list(r) for r in a.box]] for a in t.writes],
                       "attrs": {k: v for k, v in t.attrs}, "flops": t.flops, "bytes": t.bytes,
                       "cost_ns": round(t.cost_ns, 3), "wait": t.wait, "signals": list(t.signals),
                       "after": t.after, "worker": t.worker} for t in self.tasks],
            "events": [{"id": e.id, "kind": e.kind, "num_triggers": e.num_triggers,
                        "producers": list(e.producers), "consumers": list(e.consumers)}
                       for e in self.events],
            "end_event": self.end_event,
            "placement": [list(w) for w in self.placement.workers],
            "stats": self.stats,
        }
