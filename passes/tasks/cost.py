"""The cost model: time of one task from the bytes it moves and the FLOPs it does on one SM.

A task streams its operands at its share of the sustained bandwidth (``sustained_bandwidth / active``
while ``active`` SMs stream: decode is bandwidth bound; one SM alone reaches at most 3x its fair share)
and computes at ``peak_flops / sms``; the two overlap, and each task pays a fixed overhead (fetch, wait,
signal).  An operator's time is the number of waves over the workers times the slowest task; the
placement adds one event latency per dependent hop.  The H100's bandwidth and hop latency are measured
(:mod:`.gpus`); the estimated step times are compared with the measured ones in
tests/test_tasks_graph.py (the model is optimistic: measured / estimated is 1.1-1.7).
"""

from __future__ import annotations

import math

from mpkir.passes.tasks.gpus import GPU


def sm_bandwidth(gpu: GPU, active: int) -> float:
    """Bytes/s one SM gets while ``active`` SMs stream (one SM alone reaches about 3x its fair share)."""
    bw = gpu.sustained_bandwidth
    return min(3.0 * bw / gpu.sms, bw / max(1, min(active, gpu.sms)))


def task_ns(gpu: GPU, flops: float, nbytes: float, active: int | None = None) -> float:
    """Estimated nanoseconds of one task on one SM while ``active`` SMs work (default: all)."""
    mem = nbytes / sm_bandwidth(gpu, gpu.sms if active is None else active) * 1e9
    comp = flops / (gpu.peak_flops / gpu.sms) * 1e9
    return max(mem, comp) + gpu.task_overhead_ns


def stage_ns(gpu: GPU, n_tasks: int, flops: float, nbytes: float) -> float:
    """Estimated time of ``n_tasks`` equal tasks (per-task flops/bytes) spread over all workers."""
    return math.ceil(n_tasks / gpu.workers) * task_ns(gpu, flops, nbytes, min(n_tasks, gpu.workers))


def pick(options: list, slack: float = 0.1):
    """The option with the fewest tasks among those within ``slack`` of the fastest; options are
    ``(time, n_tasks, ...)`` tuples."""
    best = min(o[0] for o in options)
    return min((o for o in options if o[0] <= best * (1 + slack)), key=lambda o: (o[1], o[0]))
