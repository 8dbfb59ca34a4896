"""Per-op-kind time from the megakernel's own trace (batch 1, 2 steps): where the time goes."""

import sys

import numpy as np

from mpkir.parser import parse_file
from mpkir.runtime.host import Megakernel
from mpkir.runtime.trace import summarize, trace_events

for name in sys.argv[1].split(","):
    m, _ = parse_file(f"examples/{name}.mpk")
    mk = Megakernel(m, batch=1)
    mk.init_random(0)
    mk.set_inputs([7], [1024])
    mk.launch(2)
    ms = mk.launch(2, trace_cap=2048)
    ev = [e for e in trace_events(mk) if e.get("ph") == "X"]
    span = max(e["ts"] + e["dur"] for e in ev) - min(e["ts"] for e in ev)
    print(f"{name}: {ms / 2:.3f} ms/step traced; span {span / 2:.0f} us/step; {mk.num_sms} SMs")
    for s in summarize(mk):
        print(
            f"  {s['kind']:<16} n={s['n']:>7} SM-time {s['busy_us'] / 2 / mk.num_sms:8.1f} us/step/SM "
            f"mean {s['busy_us'] / max(s['n'], 1):7.2f} us"
        )
    del mk
    np.zeros(1)
