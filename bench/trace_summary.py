"""Where a decode step's time goes, from the megakernel's own trace: per op kind and per op (layer index
dropped), the SM-time spent waiting for each op's events and running its tasks.

Use: python bench/trace_summary.py qwen3_8b,llama3_2_1b [BATCHES, default 1]"""

import re
import sys
from collections import defaultdict

import numpy as np

from mpkir.parser import parse_file
from mpkir.runtime.host import Megakernel
from mpkir.runtime.trace import summarize, trace_events


def by_op(events: list[dict]) -> list[tuple[str, int, float, float, float]]:
    """(op name without layer digits, tasks, busy µs, wait-before µs, gap-before µs), busiest first. The gap
    is the SM's time between the previous task's end and this task's start (signal, JIT claim, descriptor)."""
    acc: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    pending_wait: dict[int, float] = defaultdict(float)
    start: dict[int, float] = {}
    prev_end: dict[int, float] = {}
    for e in sorted(events, key=lambda e: (e["tid"], e["ts"])):
        sm = e["tid"]
        start.setdefault(sm, e["ts"])
        if e["cat"] == "wait":
            pending_wait[sm] += e["dur"]
            continue
        a = acc[re.sub(r"\d+", "#", e["name"])]
        a[0] += 1
        a[1] += e["dur"]
        a[2] += pending_wait.pop(sm, 0.0)
        t0 = start.pop(sm)
        if sm in prev_end:
            a[3] += max(0.0, t0 - prev_end[sm])
        prev_end[sm] = e["ts"] + e["dur"]
    return sorted(((k, n, b, w, g) for k, (n, b, w, g) in acc.items()), key=lambda r: -(r[2] + r[3] + r[4]))


def main(models: str, batches: str = "1") -> None:
    for name in models.split(","):
        for batch in map(int, batches.split(",")):
            m, _ = parse_file(f"examples/{name}.mpk")
            mk = Megakernel(m, batch=batch)
            mk.init_random(0)
            mk.set_inputs([7 + b for b in range(batch)], [1024] * batch)
            mk.launch(2)
            ms = mk.launch(2, trace_cap=4096)
            ev = [e for e in trace_events(mk) if e.get("ph") == "X"]
            span = max(e["ts"] + e["dur"] for e in ev) - min(e["ts"] for e in ev)
            per = 2 * mk.plan.num_sms  # workers (a scheduler CTA is not traced)
            print(f"{name} b{batch}: {ms / 2:.3f} ms/step traced; span {span / 2:.0f} us/step")
            for s in summarize(mk):
                print(f"  {s['kind']:<16} n={s['n']:>7} {s['busy_us'] / per:8.1f} us/step/SM "
                      f"mean {s['busy_us'] / max(s['n'], 1):7.2f} us")
            print("  per op (us/step/SM busy, waiting before it, gap before it; mean task us):")
            for op, n, busy, wait, gap in by_op(ev)[:14]:
                b, w, g = busy / per, wait / per, gap / per
                print(f"    {op:<24} n={n:>6} busy {b:7.1f} wait {w:7.1f} gap {g:6.1f} mean {busy / n:6.2f}")
            del mk
            np.zeros(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
