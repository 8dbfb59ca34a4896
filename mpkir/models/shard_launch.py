"""One process per GPU: the tensor-parallel launcher, with a CPU backend that runs each rank's task graph in
its own process over shared memory (the stand-in for CUDA IPC peer memory).

``python -m mpkir.models.shard_launch FILE --gpus N [--steps S] [--seed K] [--workers W]`` runs S decode
steps of FILE's entry graph (random weights from seed K, generated inputs) on N CPU "GPUs" and prints the
tokens of every step.  Rank r's process does what the CUDA launcher will do on GPU r:

1. parse FILE, shard it for rank r (``passes/shard.py``) and build its task graph (``build_rank_graph``);
2. load the checkpoint and keep its slice (``mpkir/models/shard.py``);
3. allocate its *region*: its event counters and its symmetric buffers (one or two slots each, see
   ``runtime/multi_sim.slot_plan``) -- on a GPU: ``cudaMalloc`` + ``cudaIpcGetMemHandle``; here: a
   ``multiprocessing.shared_memory`` block with a name derived from the launch token and the rank;
4. wait for every rank (barrier: the handle exchange), then map the peers' regions
   (``cudaIpcOpenMemHandle``; here: attach by name);
5. run the steps: AOT worker lists, each task waiting on its local event and, for collective tasks, on the
   same event's counter in every peer region it reads; 6. barrier again (peers may still read our region),
   then unmap and free.

The layout of a region depends only on the rank graph, which is the same on every rank.

``--device gpu`` runs the same steps with CUDA megakernels instead (``mpkir/models/shard_gpu.py``): one
process per rank, every rank on the current GPU (``1/N`` of its SMs each), arenas exchanged as CUDA IPC
handles; it prints rank 0's tokens of every step and each rank's launch time.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import random
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np


def decode_inputs(module, analysis, rng: np.random.Generator, steps: int) -> list[dict[str, np.ndarray]]:
    """Inputs of ``steps`` decode steps at the max sizes: tokens drawn from the vocabulary, positions that
    advance, one request per token row, distinct pages per request; float inputs standard normal."""
    g = module.graph()
    types = analysis.graphs[g.name].types
    dims = analysis.env.dims
    shape = {p.name: tuple(dims[d] if isinstance(d, str) else d for d in types[p.name].shape)
             for p in g.params}
    first = shape[g.params[0].name]
    B = first[0] if first else 1
    R, pps = shape.get("page_table", (1, 1))
    table = np.arange(R * pps)[rng.permutation(R * pps)].reshape(R, pps).astype(np.int32)
    vocab = int(analysis.env.consts.get("vocab", 64))
    out = []
    for it in range(steps):
        d = {}
        for p in g.params:
            if p.name == "tokens":
                d[p.name] = rng.integers(0, vocab, size=shape[p.name]).astype(np.int32)
            elif p.name == "positions":
                d[p.name] = (it * (B // R + 1) + np.arange(B) // R).astype(np.int32)
            elif p.name == "seq_ids":
                d[p.name] = (np.arange(B) % R).astype(np.int32)
            elif p.name == "page_table":
                d[p.name] = table
            elif types[p.name].dtype.is_float:
                d[p.name] = rng.standard_normal(shape[p.name]).astype(np.float32)
            else:
                d[p.name] = rng.integers(0, 4, size=shape[p.name]).astype(types[p.name].dtype.numpy)
        out.append(d)
    return out


@dataclass(frozen=True)
class Layout:
    """Byte offsets of a rank's region: counters, then (data, tags) of each symmetric buffer."""

    counters: int
    buffers: tuple[tuple[str, int, int, tuple[int, ...], str], ...]  # name, data off, tags off, shape, dtype
    size: int


def region_layout(tg, symmetric, slots: Mapping[str, int]) -> Layout:
    from mpkir.ir import DType

    off = 8 * len(tg.events)
    bufs = []
    for name in sorted(symmetric):
        t = tg.tensors[name]
        dt = np.dtype(np.float32) if DType(t.dtype).is_float else DType(t.dtype).numpy
        shp = (slots[name], *t.shape)
        n = int(np.prod(shp))
        data = -(-off // 64) * 64
        tags = -(-(data + n * dt.itemsize) // 64) * 64
        off = tags + 8 * n
        bufs.append((name, data, tags, shp, dt.str))
    return Layout(0, tuple(bufs), max(off, 64))


def _arrays(buf, layout: Layout, n_events: int):
    counters = np.ndarray((n_events,), np.int64, buf, layout.counters)
    sym = {name: (np.ndarray(shp, np.dtype(dt), buf, d), np.ndarray(shp, np.int64, buf, g))
           for name, d, g, shp, dt in layout.buffers}
    return counters, sym


class _Peer:
    """Another rank's mapped region, read the way :class:`RankSim` reads its own."""

    def __init__(self, tg, sym, nslots, rank):
        self.tg, self.sym, self.nslots, self.rank = tg, sym, nslots, rank

    def _storage(self, name: str) -> str:
        while self.tg.tensors[name].base is not None:
            name = self.tg.tensors[name].base
        return name

    def _sym_views(self, acc, it: int):
        from mpkir.runtime.multi_sim import RankSim

        return RankSim._sym_views(self, acc, it)  # type: ignore[arg-type]


def _attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name)
    try:  # the owner frees it; this process must not (Python < 3.13 registers attachments too)
        from multiprocessing import resource_tracker
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
    return shm


def _rank_main(rank: int, n: int, text: str, path: str, steps: int, seed: int, workers: int, token: str,
               barrier, results, timeout_s: float) -> None:
    from mpkir.interpreter import random_weights
    from mpkir.models.shard import shard_weights
    from mpkir.parser import parse
    from mpkir.passes.shard import shard_module
    from mpkir.passes.tasks import prepare
    from mpkir.runtime.multi_sim import MultiGraph, RankSim, build_rank_graph, slot_plan
    from mpkir.runtime.multi_sim import symmetric_tensors as symmetric_of

    shm = None
    peers_shm: list = []
    try:
        module = parse(text, path)
        mu, au = prepare(module)
        rm = shard_module(module, rank, n)
        tg = build_rank_graph(rm, workers=workers)
        sym = symmetric_of(tg)
        slots = slot_plan(tg, sym)
        weights = shard_weights(rm, random_weights(module, au, seed=seed))   # each rank loads its slice
        inputs = decode_inputs(mu, au, np.random.default_rng(seed), steps)
        layout = region_layout(tg, sym, slots)
        shm = shared_memory.SharedMemory(name=f"{token}_{rank}", create=True, size=layout.size)
        counters, mine = _arrays(shm.buf, layout, len(tg.events))
        counters[:] = 0
        mg = MultiGraph((rm,) * n, (tg,) * n, frozenset(sym), tuple(sorted(slots.items())))
        sim = RankSim(mg, rank, weights, None)
        for name, (data, tags) in mine.items():
            data[...] = sim.sym[name][0]
            tags[...] = 0
        sim.sym = mine
        barrier.wait(timeout_s)                                   # every region exists: map the peers'
        peer_counters, views = [], []
        for q in range(n):
            if q == rank:
                peer_counters.append(counters)
                views.append(sim)
                continue
            s = _attach(f"{token}_{q}")
            peers_shm.append(s)
            c, arrs = _arrays(s.buf, layout, len(tg.events))
            peer_counters.append(c)
            views.append(_Peer(tg, arrs, sim.nslots, q))
        sim.peers = views
        outs = _run_rank(mg, sim, rank, counters, peer_counters, inputs, seed, timeout_s)
        results.put((rank, "ok", [[o.tolist() for o in step] for step in outs]))
    except Exception as e:  # Deadlock, StaleRead, ...: reported, never a silent hang of the others
        results.put((rank, "error", f"{type(e).__name__}: {e}"))
    finally:
        with contextlib.suppress(Exception):
            barrier.wait(timeout_s)                               # peers may still read this region
        for s in peers_shm:
            s.close()
        if shm is not None:
            shm.close()
            shm.unlink()


def _run_rank(mg, sim, rank: int, counters, peer_counters, inputs, seed: int, timeout_s: float):
    """AOT lists of one rank; a task runs when its local event and (collectives) its peers' counters allow."""
    from mpkir.runtime.simulator import Deadlock

    tg = mg.graphs[rank]
    tasks, events, end = tg.tasks, tg.events, tg.end_event
    iters = len(inputs)
    rng = random.Random(seed * 1000 + rank)
    queues = [deque((tid, it) for it in range(1, iters + 1) for tid in lst) for lst in tg.placement.workers]
    done: set = set()
    peers = {t.id: mg.peers(t, rank) for t in tasks}
    outs = []

    def need(e: int, it: int) -> int:
        return events[e].num_triggers * (it - 1 if e == end else it)

    def ready(t, it) -> bool:
        if t.after is not None and (t.after, it) not in done:
            return False
        if t.wait is None:
            return True
        target = need(t.wait, it)
        return counters[t.wait] >= target and all(peer_counters[q][t.wait] >= target for q in peers[t.id])

    sim.begin_iteration(inputs[0])
    total, executed = len(tasks) * iters, 0
    last = time.monotonic()
    while executed < total:
        cands = [w for w, q in enumerate(queues) if q and ready(tasks[q[0][0]], q[0][1])]
        if not cands:
            if time.monotonic() - last > timeout_s:
                raise Deadlock(f"rank {rank}: nothing runnable for {timeout_s} s after {executed} of {total}")
            time.sleep(0.0002)                                    # spin: a peer's flag will come
            continue
        last = time.monotonic()
        tid, it = queues[rng.choice(cands)].popleft()
        t = tasks[tid]
        sim.it = it
        sim.execute(t)
        done.add((tid, it))
        executed += 1
        for e in t.signals:
            counters[e] += 1                                      # this rank is the only writer
            if e == end and counters[e] == events[e].num_triggers * it:
                outs.append(sim.outputs())
                if it < iters:
                    sim.begin_iteration(inputs[it])
    return outs


def launch(text: str, gpus: int, steps: int = 2, seed: int = 0, workers: int = 4, path: str = "<input>",
           timeout_s: float = 60.0) -> list[list[list]]:
    """Run ``steps`` steps of the module in ``text`` on ``gpus`` CPU processes; every rank's outputs
    (``[rank][step][output]`` as lists).  Raises RuntimeError with every rank's error."""
    from mpkir.parser import parse
    from mpkir.passes.shard import shard_module

    shard_module(parse(text, path), 0, gpus)   # a module that cannot be sharded: a located error, here
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    token = f"mpkir_{uuid.uuid4().hex[:12]}"
    barrier = ctx.Barrier(gpus)
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, gpus, text, path, steps, seed, workers, token, barrier,
                                                  results, timeout_s)) for r in range(gpus)]
    for p in procs:
        p.start()
    got: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s * 3
    while len(got) < gpus and time.monotonic() < deadline:
        try:
            r, status, payload = results.get(timeout=1.0)
            got[r] = (status, payload)
        except Exception:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.kill()
    errors = [f"rank {r}: {got[r][1]}" for r in sorted(got) if got[r][0] != "ok"]
    missing = [r for r in range(gpus) if r not in got]
    if errors or missing:
        raise RuntimeError("; ".join(errors + [f"rank {r}: no result" for r in missing]))
    return [got[r][1] for r in range(gpus)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpkir.models.shard_launch",
                                 description="run a .mpk decode graph tensor-parallel on N CPU processes")
    ap.add_argument("file")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="gpu: one rank megakernel per process, all on the current GPU (CUDA IPC)")
    args = ap.parse_args(argv)
    from mpkir.diagnostics import MpkError

    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    try:
        if args.device == "gpu":
            from mpkir.models.shard_gpu import launch_gpu

            res = launch_gpu(text, args.gpus, args.steps, args.seed, args.file)
            for step, row in enumerate(res[0][0]):
                print(f"step {step}: " + " ".join(map(str, row)))
            for r, (_, ms, dev, nsm) in enumerate(res):
                print(f"rank {r}: {ms:.3f} ms for {args.steps} steps, {nsm} workers on {dev}")
            return 0
        outs = launch(text, args.gpus, args.steps, args.seed, args.workers, args.file)
    except MpkError as e:
        print(e.render(text) if hasattr(e, "render") else str(e), file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for step, o in enumerate(outs[0]):
        print(f"step {step}: " + " | ".join(" ".join(map(str, np.ravel(out))) for out in o))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
