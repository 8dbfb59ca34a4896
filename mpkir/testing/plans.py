"""Checks of a GPU plan (``codegen.lower.Plan``) without a GPU: the megakernel's event protocol walked on the
CPU (deadlock freedom, every task once per step) and the same-step read-after-write order of its buffers."""

from __future__ import annotations


def op_index(plan) -> dict[int, int]:
    """Task id -> index of its op."""
    return {o.first_task + j: i for i, o in enumerate(plan.ops) for j in range(len(o.tasks))}


def simulate_plan(plan, steps: int = 2) -> int:
    """The kernel's protocol (mk_kernel.cuh): each SM walks its list once per step; a task waits until
    counter[d] >= len(tasks(d)) * (step - lag) for each dep, then signals its op; JIT slots claim tickets.
    SMs run ahead into later steps. Returns the tasks run; raises on deadlock."""
    op_of = op_index(plan)
    n = [len(o.tasks) for o in plan.ops]
    cnt = [0] * len(plan.ops)
    tickets = [0] * len(plan.ops)
    state = [[1, 0] for _ in plan.lists]
    ran = 0

    def ready(op, it):
        return all(cnt[d] >= n[d] * (it - lag) for d, lag in plan.ops[op].deps if it - lag > 0)

    while True:
        progress = False
        for sm, lst in enumerate(plan.lists):
            st = state[sm]
            while st[0] <= steps:
                if st[1] == len(lst):
                    st[0], st[1] = st[0] + 1, 0
                    continue
                x = lst[st[1]]
                if x >= 0:
                    if not ready(op_of[x], st[0]):
                        break
                    cnt[op_of[x]] += 1
                    st[1] += 1
                else:
                    op = -x - 1
                    if tickets[op] >= n[op] * st[0]:
                        st[1] += 1
                        continue
                    if not ready(op, st[0]):
                        break
                    tickets[op] += 1
                    cnt[op] += 1
                ran += 1
                progress = True
        if all(st[0] > steps for st in state):
            return ran
        if not progress:
            raise AssertionError(f"deadlock: SM states {state[:4]}...")


def _ancestors(plan) -> list[int]:
    anc = []
    for o in plan.ops:
        a = 0
        for d, lag in o.deps:
            if lag == 0:
                a |= anc[d] | (1 << d)
        anc.append(a)
    return anc


def unordered_reads(plan) -> list[tuple[str, str, str]]:
    """(op, buffer, first writer) where an op references a buffer after its first writer without waiting on it
    (directly or transitively) in the same step."""
    anc = _ancestors(plan)
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
