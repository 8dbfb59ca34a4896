"""Precise dependencies from tile intersections, and transitive reduction.

A consumer task depends on exactly the earlier tasks whose written boxes intersect a box it reads
(read-after-write), plus write-after-write and write-after-read on state tensors (KV caches).  Boxes of
a view (``reshape``) and of its storage are compared as flat element intervals of the storage; other
tensors compare boxes directly.  Lookups use a per-stage index sorted along the most selective dim
(sweep + bisect), never all pairs of tasks.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict

import numpy as np

from mpkir.passes.tasks.graph import Range, Tensor


def box_to_flat(shape: tuple[int, ...], box: Range) -> list[tuple[int, int]]:
    """The row-major flat intervals covered by a box, adjacent ones merged."""
    r = len(shape)
    if r == 0:
        return [(0, 1)]
    if any(b <= a for a, b in box):
        return []
    k = r - 1
    while k > 0 and box[k] == (0, shape[k]):
        k -= 1
    inner = math.prod(shape[k + 1:])
    strides = [math.prod(shape[i + 1:]) for i in range(r)]
    out: list[tuple[int, int]] = []
    for idx in itertools.product(*(range(a, b) for a, b in box[:k])):
        base = sum(i * s for i, s in zip(idx, strides, strict=False))
        a, b = base + box[k][0] * inner, base + box[k][1] * inner
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class _Index:
    """The boxes of one stage on one storage, for intersection queries."""

    def __init__(self, boxes: list[tuple[Range, int]]):
        ndim = len(boxes[0][0])
        arr = np.array([b for b, _ in boxes], dtype=np.int64).reshape(len(boxes), ndim, 2)
        self.tids = np.array([t for _, t in boxes], dtype=np.int64)
        self.d = max(range(ndim), key=lambda d: len(set(map(tuple, arr[:, d, :].tolist())))) if ndim else 0
        order = np.argsort(arr[:, self.d, 0], kind="stable") if ndim else np.arange(len(boxes))
        self.arr = arr[order]
        self.tids = self.tids[order]
        self.starts = self.arr[:, self.d, 0].tolist() if ndim else []
        stops = self.arr[:, self.d, 1] if ndim else np.zeros(0)
        self.maxstop = np.maximum.accumulate(stops).tolist() if len(stops) else []

    def query(self, box: Range) -> np.ndarray:
        if not box:
            return self.tids
        qa, qb = box[self.d]
        hi = bisect.bisect_left(self.starts, qb)          # boxes with start < qb
        lo = bisect.bisect_right(self.maxstop, qa)        # first box whose running max stop > qa
        if lo >= hi:
            return self.tids[:0]
        sub = self.arr[lo:hi]
        q = np.array(box, dtype=np.int64)
        hit = np.all((sub[:, :, 0] < q[:, 1]) & (q[:, 0] < sub[:, :, 1]), axis=1)
        return self.tids[lo:hi][hit]


def dependency_preds(specs, tensors: dict[str, Tensor]) -> list[tuple[int, ...]]:
    """For each task spec (id = position), the sorted ids of the earlier tasks it depends on.

    Tasks with the same accesses share one tuple object (the later passes memoise on it).
    """

    def storage(name: str) -> str:
        while tensors[name].base is not None:
            name = tensors[name].base
        return name

    viewed = {storage(t.name) for t in tensors.values() if t.base is not None}
    canon_cache: dict = {}

    def canon(acc) -> tuple[str, list[Range]]:
        key = (acc.tensor, acc.box)
        hit = canon_cache.get(key)
        if hit is None:
            st = storage(acc.tensor)
            if st in viewed:
                hit = (st, [((a, b),) for a, b in box_to_flat(tensors[acc.tensor].shape, acc.box)])
            else:
                hit = (st, [acc.box])
            canon_cache[key] = hit
        return hit

    writers: dict[str, list[_Index]] = defaultdict(list)
    readers: dict[str, list[_Index]] = defaultdict(list)
    by_stage: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(specs):
        by_stage[s.stage].append(i)
    preds: list[tuple[int, ...]] = [()] * len(specs)
    qcache: dict = {}
    tcache: dict = {}

    def query(kind: str, st: str, box: Range) -> tuple[int, ...]:
        key = (kind, st, box)
        hit = qcache.get(key)
        if hit is None:
            idxs = writers.get(st, ()) if kind == "r" else \
                itertools.chain(writers.get(st, ()), readers.get(st, ()))
            found: list[int] = []
            for idx in idxs:
                found.extend(idx.query(box).tolist())
            hit = qcache[key] = tuple(found)
        return hit

    for stage in sorted(by_stage):
        qcache.clear()
        tcache.clear()
        wnew: dict[str, list[tuple[Range, int]]] = defaultdict(list)
        rnew: dict[str, list[tuple[Range, int]]] = defaultdict(list)
        for tid in by_stage[stage]:
            s = specs[tid]
            keys = []
            for acc in s.reads:
                st, boxes = canon(acc)
                for box in boxes:
                    keys.append(("r", st, box))
                    if tensors[st].kind == "state":
                        rnew[st].append((box, tid))
            for acc in s.writes:
                st, boxes = canon(acc)
                for box in boxes:
                    keys.append(("w", st, box))
                    wnew[st].append((box, tid))
            k = tuple(keys)
            ps = tcache.get(k)
            if ps is None:
                found: set[int] = set()
                for kind, st, box in keys:
                    found.update(query(kind, st, box))
                ps = tcache[k] = tuple(sorted(found))
            preds[tid] = ps
        for st, bx in wnew.items():
            writers[st].append(_Index(bx))
        for st, bx in rnew.items():
            readers[st].append(_Index(bx))
    return preds


def transitive_reduction(preds: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Drop every edge u→v implied by a longer path (ids must be a topological order)."""
    n = len(preds)
    anc = [0] * n
    out: list[tuple[int, ...]] = [()] * n
    memo: dict[int, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}
    for c in range(n):
        ps = preds[c]
        if not ps:
            continue
        hit = memo.get(id(ps))
        if hit is None or hit[2] is not ps:
            assert ps[-1] < c, "task ids must be topological"
            union = 0
            for p in ps:
                union |= anc[p]
            keep = tuple(p for p in ps if not (union >> p) & 1)
            for p in keep:
                union |= 1 << p
            hit = memo[id(ps)] = (union, keep, ps)
        anc[c] = hit[0]
        out[c] = hit[1]
    return out
