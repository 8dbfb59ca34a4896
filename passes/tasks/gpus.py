"""GPU descriptions as data (public spec-sheet numbers; bf16 dense tensor-core peak)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """What the cost model needs to know about a GPU."""

    name: str
    sms: int
    smem_per_sm: int          # bytes of shared memory one block may use
    regs_per_sm: int
    bandwidth: float          # HBM/GDDR bytes per second
    peak_flops: float         # bf16 dense tensor-core FLOP/s
    l2_bytes: int
    task_overhead_ns: float = 1500.0   # fetch + wait + signal of one task in a persistent kernel
    event_latency_ns: float = 700.0    # signal → consumer sees the counter

    @property
    def workers(self) -> int:
        """One worker per SM."""
        return self.sms


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h100", 132, 227 * 1024, 65536, 3.35e12, 989e12, 50 << 20),
    GPU("h200", 132, 227 * 1024, 65536, 4.8e12, 989e12, 50 << 20),
    GPU("a100", 108, 163 * 1024, 65536, 2.039e12, 312e12, 40 << 20),
    GPU("b200", 148, 227 * 1024, 65536, 8.0e12, 2250e12, 126 << 20),
    GPU("l40s", 142, 99 * 1024, 65536, 0.864e12, 362e12, 96 << 20),
    GPU("rtx4090", 128, 99 * 1024, 65536, 1.008e12, 165e12, 72 << 20),
)}

_ALIASES = {"h100-sxm": "h100", "sm90": "h100", "a100-80g": "a100", "4090": "rtx4090", "rtx-4090": "rtx4090",
            "l40": "l40s", "sm100": "b200"}


def get_gpu(name: str) -> GPU:
    """The GPU description for a name (case-insensitive); KeyError lists the known names."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}")
    return GPUS[key]
