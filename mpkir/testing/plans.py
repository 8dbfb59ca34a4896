"""Checks of a GPU plan (``codegen.lower.Plan``) without a GPU: the megakernel's event protocol walked on the
CPU (deadlock freedom, every task once per step) and the same-step read-after-write order of its buffers."""

from __future__ import annotations

import random


def op_index(plan) -> dict[int, int]:
    """Task id -> index of its op."""
    return {o.first_task + j: i for i, o in enumerate(plan.ops) for j in range(len(o.tasks))}


def simulate_plan(plan, steps: int = 2, rng=None, slow=()) -> int:
    """The kernel's protocol (mk_kernel.cuh): each SM walks its list once per step; a task waits until
    counter[d] >= len(tasks(d)) * (step - lag) for each dep, then signals its op. JIT slots claim tickets, or,
    for plans with scheduler warps, take tasks from the op's frame for the step once a scheduler has opened
    it: the task that completes a launching event pushes it to its queue, a scheduler pops it into the ready
    counts of the ops that wait on it, and the count that completes a step opens that step's frame (checked:
    no visitor of the frame's previous step is still at the slot). SMs run ahead into later steps; with
    ``rng`` (a ``random.Random``) SMs and schedulers move in a random order, one action at a time, each at
    its own random rate; the SMs in ``slow`` move only when nothing else can. Returns the tasks run; raises
    on deadlock."""
    from mpkir.codegen.lower import jit_consumers
    from mpkir.runtime.jit_queue import event_queues

    op_of = op_index(plan)
    n = [len(o.tasks) for o in plan.ops]
    cnt = [0] * len(plan.ops)
    tickets = [0] * len(plan.ops)
    queues = event_queues(plan)
    fifo: list[list[int]] = [[] for _ in range(plan.sched_warps)]
    consumers = jit_consumers(plan.ops)
    nready = [sum(1 for _, lag in o.deps if lag == 0) for o in plan.ops]
    ready_cnt = [0] * len(plan.ops)
    head: dict[tuple[int, int], list[int]] = {}  # (op, parity) -> [step, taken]
    at_slot: dict[tuple[int, int], set[int]] = {}  # (op, step) -> SMs that took no "none left" yet
    state = [[1, 0] for _ in plan.lists]
    ran = 0

    def ready(op, it):
        return all(cnt[d] >= n[d] * (it - lag) for d, lag in plan.ops[op].deps if it - lag > 0)

    def signal(op, it):
        cnt[op] += 1
        if op in queues and cnt[op] == n[op] * it:
            fifo[queues[op]].append(op)

    def schedule(w) -> bool:
        if not fifo[w]:
            return False
        e = fifo[w].pop(0)
        for q in consumers[e]:
            ready_cnt[q] += 1
            if ready_cnt[q] % nready[q] == 0:
                it = ready_cnt[q] // nready[q]
                late = at_slot.get((q, it - 2), set())
                if late:
                    raise AssertionError(f"frame of {plan.ops[q].name} reopened for step {it} while SMs "
                                         f"{sorted(late)} are still at its slot of step {it - 2}")
                head[(q, it & 1)] = [it, 0]
        return True

    def move(sm) -> bool:
        """One action of SM ``sm``; False when it is blocked or done."""
        nonlocal ran
        st, lst = state[sm], plan.lists[sm]
        while st[0] <= steps and st[1] == len(lst):
            st[0], st[1] = st[0] + 1, 0
        if st[0] > steps:
            return False
        x = lst[st[1]]
        if x >= 0:
            if not ready(op_of[x], st[0]):
                return False
            signal(op_of[x], st[0])
            st[1] += 1
        elif plan.sched_warps:
            op, it = -x - 1, st[0]
            at_slot.setdefault((op, it), set()).add(sm)
            h = head.get((op, it & 1))
            if h is None or h[0] != it:
                return False
            if h[1] >= n[op]:
                h[1] += 1
                at_slot[(op, it)].discard(sm)
                st[1] += 1
                return True
            if not ready(op, it):
                return False  # (taken at once in the kernel, then waited on: the same order of events)
            h[1] += 1
            signal(op, it)
        else:
            op = -x - 1
            if tickets[op] >= n[op] * st[0]:
                st[1] += 1
                return True
            if not ready(op, st[0]):
                return False
            tickets[op] += 1
            signal(op, st[0])
        ran += 1
        return True

    actors = [("sm", k) for k in range(len(plan.lists))] + [("sched", w) for w in range(plan.sched_warps)]
    if slow and rng is None:
        rng = random.Random(0)
    speed = {a: max(0.01, rng.random() ** 3) for a in actors} if rng is not None else {}
    while True:
        order = list(actors)
        if rng is not None:
            rng.shuffle(order)
        progress = False
        # a random round (each actor at its rate); if none moved, every actor but the slow ones; then those
        for rnd in range(3):
            for a in order:
                if rng is not None and (a[0] == "sm" and a[1] in slow) != (rnd == 2):
                    continue
                if rng is not None and rnd == 0 and rng.random() > speed[a]:
                    continue
                act = schedule if a[0] == "sched" else move
                while act(a[1]):
                    progress = True
                    if rng is not None:
                        break
            if progress or rng is None:
                break
        if all(st[0] > steps for st in state) and not any(fifo):
            return ran
        if not progress:
            raise AssertionError(f"deadlock: SM states {state[:4]}...")


def unordered_reads(plan) -> list[tuple[str, str, str]]:
    """(op, buffer, first writer) where an op references a buffer after its first writer without waiting on it
    (directly or transitively) in the same step."""
    from mpkir.codegen.lower import same_step_ancestors

    anc = same_step_ancestors(plan.ops)
    first, bad = {}, []
    for i, o in enumerate(plan.ops):
        for t in o.tasks:
            for b, _ in t.p.values():
                kind = plan.buffers[b].kind if b in plan.buffers else "?"
                if kind in ("act", "scratch", "state") or b == "in:positions":
                    w = first.setdefault(b, i)
                    if w != i and not anc[i] >> w & 1:
                        bad.append((o.name, b, plan.ops[w].name))
    return bad
