"""Precise dependencies from tile intersections, and transitive reduction.

A consumer task depends on exactly the earlier tasks whose written boxes intersect a box it reads
(read-after-write), plus write-after-write and write-after-read on state tensors (KV caches).  Boxes of
a view (``reshape``) and of its storage are compared as flat element intervals of the storage; other
tensors compare boxes directly.  Each stage's boxes are tested against earlier stages' boxes of the same
storage in bulk (NumPy), not task by task in Python.
"""

from __future__ import annotations

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


def _hits(q: np.ndarray, qt: np.ndarray, w: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (query owner, indexed owner) pairs whose boxes intersect: q [n, d, 2] vs w [m, d, 2]."""
    if not len(q) or not len(w):
        return qt[:0], wt[:0]
    cs, ct = [], []
    step = max(1, 4_000_000 // (len(w) * max(1, q.shape[1])))  # bound the [n, m] temporaries
    for a in range(0, len(q), step):
        qq = q[a:a + step]
        hit = np.ones((len(qq), len(w)), dtype=bool)
        for d in range(q.shape[1]):
            hit &= (qq[:, None, d, 0] < w[None, :, d, 1]) & (w[None, :, d, 0] < qq[:, None, d, 1])
        i, j = np.nonzero(hit)
        cs.append(qt[a:a + step][i])
        ct.append(wt[j])
    return np.concatenate(cs), np.concatenate(ct)


class _Boxes:
    """Boxes (one storage, one rank) with their task ids, gathered then frozen into arrays."""

    __slots__ = ("arr", "boxes", "tarr", "tids")

    def __init__(self):
        self.boxes: list = []
        self.tids: list[int] = []
        self.arr = self.tarr = None

    def freeze(self) -> _Boxes:
        if self.arr is None:
            ndim = len(self.boxes[0]) if self.boxes else 0
            self.arr = np.array(self.boxes, dtype=np.int64).reshape(len(self.boxes), ndim, 2)
            self.tarr = np.array(self.tids, dtype=np.int64)
        return self


def dependency_preds(specs, tensors: dict[str, Tensor]) -> list[tuple[int, ...]]:
    """For each task spec (id = position), the sorted ids of the earlier tasks it depends on.

    Tasks with the same predecessor set share one tuple object (the later passes memoise on it).
    Each stage's boxes are intersected with the earlier stages' boxes of the same storage in bulk
    (NumPy broadcasting per storage), never task by task.
    """

    def storage(name: str) -> str:
        while tensors[name].base is not None:
            name = tensors[name].base
        return name

    viewed = {storage(t.name) for t in tensors.values() if t.base is not None}
    # name → (storage, shape when the storage is viewed (boxes compare as flat intervals), else None)
    tinfo = {}
    for name, t in tensors.items():
        st = storage(name)
        tinfo[name] = (st, t.shape if st in viewed else None)
    flat_cache: dict = {}

    def add(qs: dict, acc, tid: int) -> None:
        st, shape = tinfo[acc.tensor]
        q = qs.get(st)
        if q is None:
            q = qs[st] = _Boxes()
        if shape is None:
            q.boxes.append(acc.box)
            q.tids.append(tid)
            return
        fk = (shape, acc.box)
        flat = flat_cache.get(fk)
        if flat is None:
            flat = flat_cache[fk] = [((x, y),) for x, y in box_to_flat(shape, acc.box)]
        q.boxes.extend(flat)
        q.tids.extend([tid] * len(flat))

    is_state = {name: t.kind == "state" for name, t in tensors.items()}
    writers: dict[str, list[_Boxes]] = defaultdict(list)   # per storage: one frozen _Boxes per stage
    readers: dict[str, list[_Boxes]] = defaultdict(list)   # state tensors only (write-after-read)
    by_stage: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(specs):
        by_stage[s.stage].append(i)
    preds: list[tuple[int, ...]] = [()] * len(specs)
    interned: dict[tuple[int, ...], tuple[int, ...]] = {}

    for stage in sorted(by_stage):
        rq: dict[str, _Boxes] = {}   # what this stage reads (queries: RAW)
        wq: dict[str, _Boxes] = {}   # what it writes (queries: WAW, WAR; then indexed)
        for tid in by_stage[stage]:
            s = specs[tid]
            for acc in s.reads:
                add(rq, acc, tid)
            for acc in s.writes:
                add(wq, acc, tid)
        cons: list[np.ndarray] = []
        prods: list[np.ndarray] = []
        for qs, sources in ((rq, (writers,)), (wq, (writers, readers))):
            for st, q in qs.items():
                idxs = [ix for src in sources for ix in src.get(st, ())]
                if not idxs:
                    continue
                q.freeze()
                for ix in idxs:
                    c, p = _hits(q.arr, q.tarr, ix.arr, ix.tarr)
                    cons.append(c)
                    prods.append(p)
        if cons:
            c = np.concatenate(cons)
            p = np.concatenate(prods)
            if len(c):
                pairs = np.unique(c * len(specs) + p)     # sorted by consumer, then producer
                c, p = np.divmod(pairs, len(specs))
                cuts = (np.flatnonzero(np.diff(c)) + 1).tolist()
                pl = p.tolist()
                for cc, a, b in zip(c[[0, *cuts]].tolist(), [0, *cuts], [*cuts, len(pl)], strict=True):
                    t = tuple(pl[a:b])
                    preds[cc] = interned.setdefault(t, t)
        for st, q in wq.items():
            writers[st].append(q.freeze())
        for st, q in rq.items():
            if is_state[st]:
                readers[st].append(q.freeze())
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
