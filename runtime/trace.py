"""Per-SM task timeline of a megakernel launch (``%globaltimer`` start / wait-done / end per task) as
Chrome trace / Perfetto JSON: one track per SM, a 'wait' slice and a task slice per task."""

from __future__ import annotations

import json

from mpkir.commands import write_atomic


def trace_events(mk) -> list[dict]:
    """Chrome trace events from the last ``Megakernel.launch(..., trace_cap=N)``."""
    if getattr(mk, "d_trace", None) is None:
        raise ValueError("no trace recorded: launch with trace_cap > 0")
    raw = mk.cp.asnumpy(mk.d_trace)  # [sm, cap, 4]: meta, t0, t1 (wait done), t2 (end)
    names, kinds = {}, {}
    k = 0
    for op in mk.plan.ops:
        for _ in op.tasks:
            names[k], kinds[k] = op.name, op.kind
            k += 1
    valid = raw[:, :, 3] != 0
    t_min = int(raw[:, :, 1][valid].min()) if valid.any() else 0
    ev: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"megakernel {mk.plan.model}"}}
    ]
    for sm in range(raw.shape[0]):
        ev.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": sm, "args": {"name": f"SM {sm}"}})
        for meta, t0, t1, t2 in raw[sm][valid[sm]]:
            tid, step = int(meta) & 0xFFFFFFFF, int(meta) >> 32
            t0, t1, t2 = (int(t0) - t_min) / 1e3, (int(t1) - t_min) / 1e3, (int(t2) - t_min) / 1e3
            if t1 > t0:
                ev.append(
                    {"name": "wait", "cat": "wait", "ph": "X", "pid": 0, "tid": sm, "ts": t0, "dur": t1 - t0}
                )
            ev.append(
                {
                    "name": names.get(tid, str(tid)),
                    "cat": kinds.get(tid, "task"),
                    "ph": "X",
                    "pid": 0,
                    "tid": sm,
                    "ts": t1,
                    "dur": max(t2 - t1, 0.001),
                    "args": {"task": tid, "step": step},
                }
            )
    return ev


def write_trace(mk, path: str) -> int:
    """Write the trace JSON atomically; returns the number of task events."""
    ev = trace_events(mk)
    write_atomic(path, lambda f: json.dump({"traceEvents": ev, "displayTimeUnit": "ns"}, f))
    return sum(1 for e in ev if e.get("ph") == "X" and e.get("cat") != "wait")


def summarize(mk) -> list[dict]:
    """Per op kind: tasks, mean/total busy and wait time (µs), from the last traced launch."""
    stats: dict[str, dict] = {}
    for e in trace_events(mk):
        if e.get("ph") != "X":
            continue
        s = stats.setdefault(e.get("cat", "?"), {"kind": e.get("cat", "?"), "n": 0, "busy_us": 0.0})
        if e["cat"] == "wait":
            s["busy_us"] += e["dur"]
            s["n"] += 1
        else:
            s["busy_us"] += e["dur"]
            s["n"] += 1
    return sorted(stats.values(), key=lambda s: -s["busy_us"])
