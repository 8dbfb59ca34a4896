"""CPU simulator of the megakernel runtime: runs a :class:`~mpkir.passes.tasks.graph.TaskGraph` on NumPy.

It follows the runtime protocol: N workers, per-worker queues, monotonic event counters (a task of
iteration ``it`` waiting on event ``e`` runs once ``counter[e] >= num_triggers * it``; the end event with
``it - 1``), tasks placed after a producer (collapsed chains) on its worker.  Modes:

``aot``   every worker's queue holds its placement list for every iteration up front (MPK's AOT launch);
``jit``   a scheduler pushes a task to a random worker when the event it waits on fires;
``free``  any task whose wait condition holds may run (all interleavings the events allow).

A seed picks which runnable worker/task steps next.  Task bodies compute exactly their tile with the
operator's reference on the sliced operands.  Split-K and split-KV partials: with ``float_storage="f32"``
(the reference mode) the scratch tensors (declared f32, what the GPU stores) are a float64 workspace;
partial tasks compute the interpreter's float64 sums over their slice and merge tasks combine them in
split order and round to float32 once, so the result equals the interpreter's bits unless float64
reassociation straddles a float32 rounding boundary (see :mod:`mpkir.interpreter`).  Reading memory no
task has written (in this iteration, for activations and scratch) raises :class:`UnwrittenRead`; no
runnable task while work remains raises :class:`Deadlock`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np

from mpkir.ops.basic import dot_f64
from mpkir.ops.common import contig64, f64, out32
from mpkir.passes.tasks.graph import Access, Task, TaskGraph


class SimError(Exception):
    """A protocol violation found by the simulator."""


class UnwrittenRead(SimError):
    """A task read elements that no task had written."""


class Deadlock(SimError):
    """No task can run but work remains."""


def _state_key(name: str):
    # "@k_cache[3]" -> ("k_cache", 3); "@s" -> ("s", None)
    n = name[1:]
    if n.endswith("]"):
        base, idx = n[:-1].split("[")
        return base, int(idx)
    return n, None


class Simulator:
    """One run of a task graph over several iterations (see module docstring)."""

    def __init__(self, tg: TaskGraph, weights: Mapping[str, np.ndarray], state: Mapping | None = None,
                 float_storage: str | None = "f32"):
        import ml_dtypes  # noqa: F401  (bf16 storage)

        from mpkir.ir import DType

        self.tg = tg
        self.f32 = float_storage == "f32"
        self.state_in = dict(state or {})
        self.mem: dict[str, np.ndarray] = {}
        self.mask: dict[str, np.ndarray] = {}
        for t in tg.tensors.values():
            if t.base is not None:
                continue
            dt = DType(t.dtype)
            widen = self.f32 and dt.is_float and t.kind not in ("weight", "state")
            np_dt = np.float32 if widen else dt.numpy
            if widen and t.kind == "scratch":  # split-K / split-KV partials: a float64 workspace
                np_dt = np.float64
            if t.kind == "weight":
                arr = np.asarray(weights[t.checkpoint]).reshape(t.shape)
            elif t.kind == "state":
                key = _state_key(t.name)
                src = state.get(key) if state is not None else None
                if src is not None:
                    arr = np.array(src, copy=True).reshape(t.shape)
                else:
                    arr = np.zeros(t.shape, dt.numpy)
                if self.f32 and dt.is_float and src is not None:
                    arr = arr.astype(src.dtype, copy=False)
            else:
                arr = np.full(t.shape, np.nan if np.dtype(np_dt).kind == "f" else -7, dtype=np_dt)
            self.mem[t.name] = np.ascontiguousarray(arr)
            written = t.kind in ("weight", "state")
            self.mask[t.name] = np.full(t.shape, written, dtype=bool)

    # ------------------------------------------------------------------ memory
    def _storage(self, name: str) -> str:
        ts = self.tg.tensors
        while ts[name].base is not None:
            name = ts[name].base
        return name

    def _view(self, arrs: dict[str, np.ndarray], acc: Access) -> np.ndarray:
        t = self.tg.tensors[acc.tensor]
        st = self._storage(acc.tensor)
        v = arrs[st].reshape(t.shape)
        if not acc.box:
            return v[...]  # a 0-d view (v[()] would be a scalar copy)
        return v[tuple(slice(a, b) for a, b in acc.box)]

    def read(self, task: Task, acc: Access) -> np.ndarray:
        m = self._view(self.mask, acc)
        if not m.all():
            raise UnwrittenRead(f"task {task.id} ({task.kind} of {task.node}) reads {acc.tensor}"
                                f"{list(acc.box)} before it is written")
        return np.array(self._view(self.mem, acc), copy=True)

    def write(self, acc: Access, value: np.ndarray) -> None:
        dst = self._view(self.mem, acc)
        dst[...] = np.asarray(value).reshape(dst.shape).astype(dst.dtype, copy=False)
        self._view(self.mask, acc)[...] = True

    def begin_iteration(self, inputs: Mapping[str, np.ndarray]) -> None:
        for t in self.tg.tensors.values():
            if t.base is None and t.kind in ("activation", "output", "scratch"):
                self.mask[t.name][...] = False
                self.mem[t.name][...] = np.nan if self.mem[t.name].dtype.kind == "f" else -7
        for name in self.tg.inputs:
            t = self.tg.tensors[name]
            arr = np.asarray(inputs[name[1:]])
            st = self._storage(name)
            self.mem[st][...] = arr.reshape(self.mem[st].shape).astype(self.mem[st].dtype, copy=False)
            self.mask[st][...] = True
            _ = t

    def outputs(self) -> tuple[np.ndarray, ...]:
        out = []
        for name in self.tg.outputs:
            acc = Access(name, tuple((0, d) for d in self.tg.tensors[name].shape))
            m = self._view(self.mask, acc)
            if not m.all():
                raise UnwrittenRead(f"graph output {name} is not fully written")
            out.append(np.array(self._view(self.mem, acc), copy=True))
        return tuple(out)

    def final_state(self) -> dict:
        """The state after the run: every state given (untouched ones as they were) plus those written."""
        out = {k: np.array(v, copy=True) for k, v in self.state_in.items()}
        out.update({_state_key(t.name): self.mem[t.name].copy() for t in self.tg.tensors.values()
                    if t.kind == "state"})
        return out

    # ------------------------------------------------------------------ task bodies
    def _attention_partial(self, task: Task, attrs: dict) -> None:
        """Unnormalised attention of the task's tokens/heads over positions [kv_start, kv_stop)."""
        q, _k, _v, kc, vc, table, pos, sid = (self.read(task, r) for r in task.reads)
        c0, c1 = attrs["kv_start"], attrs["kv_stop"]
        t, g, d = q.shape
        hkv = kc.shape[2]
        page = kc.shape[1]
        scale = attrs.get("scale", 0.0) or 1.0 / np.sqrt(d)
        o = np.zeros((t, g, d), np.float64)
        ml = np.zeros((t, g, 2), np.float64)
        ml[..., 0] = -np.inf
        q64 = f64(q)
        for i in range(t):
            r, p = int(sid[i]), int(pos[i])
            hi = min(c1, p + 1)
            if r < 0 or hi <= c0:
                continue
            js = np.arange(c0, hi)
            pg = np.asarray(table)[r, js // page].astype(np.int64)
            kt = np.ascontiguousarray(f64(kc[pg, js % page]).transpose(1, 2, 0))   # [hkv, D, n]
            vt = np.ascontiguousarray(f64(vc[pg, js % page]).transpose(1, 0, 2))   # [hkv, n, D]
            # the interpreter's attend_one with the normalisation left to the merge
            s = np.matmul(q64[i].reshape(hkv, g // hkv, d), kt) * scale              # [hkv, grp, n]
            m = np.max(s, axis=-1, keepdims=True)
            e = np.exp(s - m)
            o[i] = np.matmul(e, vt).reshape(g, d)
            ml[i, :, 0] = m.reshape(g)
            ml[i, :, 1] = np.sum(e, axis=-1).reshape(g)
        # f64 workspace in reference mode (float_storage="f32"), else rounded to the declared f32
        self.write(task.writes[0], o[None])
        self.write(task.writes[1], ml[None])

    def execute(self, task: Task) -> None:
        from mpkir.ops.base import RefCtx
        from mpkir.ops.registry import OPS

        attrs = dict(task.attrs)
        k = task.kind
        if k == "copy":
            self.write(task.writes[0], self.read(task, task.reads[0]))
            return
        if k == "linear_partial":  # float64 dot products over the K slice (as the interpreter's linear)
            x = self.read(task, task.reads[0])
            w = self.read(task, task.reads[1])
            lead = x.shape[:-1]
            y = dot_f64(contig64(x).reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[0])
            self.write(task.writes[0], y[None])
            return
        if k == "linear_merge":    # partials added in split order in float64, + bias, rounded once
            p = f64(self.read(task, task.reads[0]))
            acc = p[0].copy()
            for s in range(1, p.shape[0]):
                acc = acc + p[s]
            if len(task.reads) > 1:
                acc = acc + f64(self.read(task, task.reads[1]))
            self.write(task.writes[0], out32(acc))
            return
        if k == "kv_append":
            from mpkir.ops.attention import write_cache

            kk, vv, table, pos, sid, kc, vc = (self.read(task, r) for r in task.reads)
            table, pos, sid = (np.asarray(a).astype(np.int64) for a in (table, pos, sid))
            write_cache(kc, kk, table, pos, sid, sid >= 0)
            write_cache(vc, vv, table, pos, sid, sid >= 0)
            self.write(task.writes[0], kc)
            self.write(task.writes[1], vc)
            return
        if k == "attention_partial":
            self._attention_partial(task, attrs)
            return
        if k == "attention_merge":
            o = f64(self.read(task, task.reads[0]))      # [S, t, g, D]
            ml = f64(self.read(task, task.reads[1]))     # [S, t, g, 2]
            m, el = ml[..., 0], ml[..., 1]
            big = np.max(m, axis=0)
            safe = np.where(np.isfinite(big), big, 0.0)
            w = np.where(np.isfinite(m), np.exp(m - safe), 0.0)          # [S, t, g]
            den = np.sum(w * el, axis=0)
            num = np.sum(w[..., None] * o, axis=0)
            out = np.where(den[..., None] > 0, num / np.where(den > 0, den, 1.0)[..., None], 0.0)
            self.write(task.writes[0], out32(out))
            return
        op = OPS[k]
        if attrs.pop("halves", False):
            a, b = (self.read(task, r) for r in task.reads)
            operands = [np.concatenate([a, b], axis=-1)]
        else:
            operands = [self.read(task, r) for r in task.reads]
        if k == "paged_attention":  # like the GPU task: use the cache as kv_append left it (no append here)
            kc, vc, table, pos, sid = operands[3:8]
            table, pos, sid = (np.asarray(a).astype(np.int64) for a in (table, pos, sid))
            ok = sid >= 0
            if ok.any():
                page = kc.shape[1]
                pg, slot = table[sid[ok], pos[ok] // page], pos[ok] % page
                operands[1] = np.array(operands[1], copy=True)
                operands[2] = np.array(operands[2], copy=True)
                operands[1][ok] = kc[pg, slot]
                operands[2][ok] = vc[pg, slot]
        results = op.reference(operands, attrs, RefCtx(dict(self.tg.dims)))
        if k == "paged_attention":   # the caches were appended by kv_append; the re-append is discarded
            self.write(task.writes[0], results[0])
            return
        n_res = len(task.writes) - len(op.mutates)
        for acc, val in zip(task.writes[:n_res], results, strict=False):
            self.write(acc, val)
        for acc, i in zip(task.writes[n_res:], op.mutates, strict=False):
            self.write(acc, operands[i])


def simulate(tg: TaskGraph, weights: Mapping[str, np.ndarray], inputs: Sequence[Mapping[str, np.ndarray]],
             state: Mapping | None = None, *, mode: str = "aot", seed: int = 0,
             float_storage: str | None = "f32",
             delay: frozenset[int] = frozenset(), snapshot: dict | None = None):
    """Run ``len(inputs)`` iterations in one launch; returns ``(outputs per iteration, final state)``.

    ``delay``: task ids the interleaving postpones as long as anything else can run (adversarial order).
    ``snapshot``: receives the value of every activation (``%name`` without ``%``) after the last iteration.
    """
    if mode not in ("aot", "jit", "free"):
        raise ValueError(f"unknown mode {mode!r}")
    rng = random.Random(seed)
    sim = Simulator(tg, weights, state, float_storage)
    tasks = tg.tasks
    events = tg.events
    iters = len(inputs)
    end = tg.end_event
    counters = [0] * len(events)
    done: set[tuple[int, int]] = set()
    results: list[tuple[np.ndarray, ...]] = []
    total = len(tasks) * iters
    W = tg.num_workers
    local = tg.successors_local

    def ready(t: Task, it: int) -> bool:
        if t.after is not None and (t.after, it) not in done:
            return False
        if t.wait is None:
            return True
        need = events[t.wait].num_triggers * (it - 1 if t.wait == end else it)
        return counters[t.wait] >= need

    queues: list[deque] = [deque() for _ in range(W)]
    pool: list[tuple[int, int]] = []  # free mode: not yet run
    if mode == "aot":
        for it in range(1, iters + 1):
            for w, lst in enumerate(tg.placement.workers):
                queues[w].extend((tid, it) for tid in lst)
    elif mode == "free":
        pool = [(t.id, it) for it in range(1, iters + 1) for t in tasks]

    def dispatch(tid: int, it: int) -> None:
        if mode != "jit":
            return
        if tasks[tid].after is None:   # collapsed-chain tasks follow their producer (below)
            queues[rng.randrange(W)].append((tid, it))

    def fire(e: int, it_done: int) -> None:
        ev = events[e]
        if e == end:
            results.append(sim.outputs())
            if snapshot is not None:
                for t in tg.tensors.values():
                    if t.kind in ("activation", "output"):
                        acc = Access(t.name, tuple((0, d) for d in t.shape))
                        snapshot[t.name[1:]] = np.array(sim._view(sim.mem, acc), copy=True)
            if it_done < iters:
                sim.begin_iteration(inputs[it_done])
                for c in ev.consumers:
                    dispatch(c, it_done + 1)
        else:
            for c in ev.consumers:
                dispatch(c, it_done)

    sim.begin_iteration(inputs[0])
    if mode == "jit":
        for c in events[end].consumers:
            dispatch(c, 1)
    executed = 0
    while executed < total:
        if mode == "free":
            cands = [i for i, (tid, it) in enumerate(pool) if ready(tasks[tid], it)]
        else:
            cands = [w for w in range(W) if queues[w] and ready(tasks[queues[w][0][0]], queues[w][0][1])]
        if not cands:
            raise Deadlock(f"no runnable task after {executed} of {total} task runs")
        if delay:
            def delayed(c):
                return (pool[c] if mode == "free" else queues[c][0])[0] in delay
            pref = [c for c in cands if not delayed(c)]
            cands = pref or cands
        c = rng.choice(cands)
        if mode == "free":
            tid, it = pool.pop(c)
            w = -1
        else:
            tid, it = queues[c].popleft()
            w = c
        t = tasks[tid]
        sim.execute(t)
        done.add((tid, it))
        executed += 1
        if mode == "jit":
            for cid in local.get(tid, ()):
                queues[w].append((cid, it))
        for e in t.signals:
            counters[e] += 1
            if counters[e] == events[e].num_triggers * it:
                fire(e, it)
    return results, sim.final_state()
