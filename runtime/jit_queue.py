"""The control block of just-in-time ops (int32 words), as ``mk_kernel.cuh`` reads it.

Header (``HDR`` words): ops, scheduler queues S, slots per queue L (a power of two), the word offsets of
the queues, the event lists and the per-queue event counts, and 1 when there are scheduler queues. Then one
record of ``REC`` words per op: two step-stamped heads (u64, one per step parity: ``step << 32 | tasks
taken``), the ready counter (u64: same-step events of this op that have fired), its first task, its task
count, the number of same-step events it waits on and its ticket (ticket mode). Then S event queues (a u32
tail and L u64 slots, each ``(position + 1) << 32 | event``), each event's JIT consumers and the events each
queue gets per step.

Workers that signal the last task of a launching event push it to queue ``a[15] - 1`` of their task
(:func:`event_queues`); scheduler warp s pops queue s, counts the event into each consumer's ready counter,
and the warp that completes a count opens that op's head for the step; a worker's take of index i there is
task ``first + i``.
"""

from __future__ import annotations

import numpy as np

from mpkir.codegen.lower import Plan, jit_consumers, jit_events

HDR = 16
REC = 16
# record fields (word offsets)
HEAD0, HEAD1, READY, FIRST, COUNT, NREADY, TICKET = 0, 2, 4, 6, 7, 8, 10


def event_queues(plan: Plan) -> dict[int, int]:
    """Launching event -> its scheduler queue (round robin), for plans with scheduler warps."""
    if not plan.sched_warps:
        return {}
    return {e: k % plan.sched_warps for k, e in enumerate(jit_events(plan.ops))}


def queue_slots(per_step: int) -> int:
    """Slots per queue: a power of two of at least four steps' events (at most two steps are ever pending)."""
    n = 32
    while n < 4 * per_step:
        n *= 2
    return n


def jit_block(plan: Plan) -> np.ndarray:
    """The block's initial contents (static fields set, counters and heads zero)."""
    n_ops = len(plan.ops)
    S = plan.sched_warps
    queues = event_queues(plan)
    per_queue = [sum(1 for q in queues.values() if q == s) for s in range(S)]
    L = queue_slots(max(per_queue, default=0))
    consumers = jit_consumers(plan.ops) if S else {}
    q0 = HDR + REC * n_ops
    e0 = q0 + S * (2 + 2 * L)
    evl = [0]
    flat: list[int] = []
    for e in range(n_ops):
        flat += consumers.get(e, [])
        evl.append(len(flat))
    c0 = e0 + len(evl) + len(flat)
    blk = np.zeros(c0 + S, np.int32)
    blk[:7] = (n_ops, S, L, q0, e0, c0, 1 if S else 0)
    for i, o in enumerate(plan.ops):
        rec = blk[HDR + REC * i : HDR + REC * (i + 1)]
        rec[FIRST], rec[COUNT] = o.first_task, len(o.tasks)
        if S and o.jit:
            rec[NREADY] = sum(1 for _, lag in o.deps if lag == 0)
    blk[e0 : e0 + len(evl)] = evl
    blk[e0 + len(evl) : c0] = flat
    blk[c0 : c0 + S] = per_queue
    return blk
