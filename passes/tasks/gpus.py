"""GPU descriptions as data: public spec-sheet numbers (bf16 dense tensor-core peak) and, for the H100,
the rates the megakernel measured on it (bench/RESULTS.md); other GPUs scale the H100's measured ratios."""

from __future__ import annotations

from dataclasses import dataclass

# ---- H100 calibration (bench/RESULTS.md, NVIDIA H100 80GB HBM3, 2026-11-25; /work/shared/anchors)
H100_SPEC_BW = 3.35e12
H100_SPEC_FLOPS = 989e12
# The megakernel's own %globaltimer trace (Llama-3.2-1B, batch 1): linear tasks stream their weights at
# ~2.2 TB/s while busy (65-70 % of the 3.0-3.1 TB/s copy / read bandwidth of the anchors).
H100_STREAM_BW = 2.2e12
# Compute stays at the spec peak: decode tiles are far below the ridge point (batch 8: 8 FLOP per 2-byte
# weight vs ~295 FLOP/byte).  NOT modelled: today's batch-8 tensor-core GEMV adds its MMA time to the
# streaming time (step time at batch 8 minus batch 1 over the extra FLOPs: Qwen3-8B (13.43 - 8.02) ms for
# 2·7·7.6e9 FLOP → 20 TFLOP/s; Llama-3.2-1B → 22 TFLOP/s).  That is a kernel defect to fix, not a property
# of the GPU; modelling it as a per-SM compute limit doubles the task counts at batch 8.
# ~3-4 µs of wait + task start per dependent phase in the same trace (the raw SM→SM flag hand-off is
# 0.54 µs and a counter barrier 1.0 µs, anchors' h100_floors.txt): one event hop costs the lower end.
H100_EVENT_NS = 3000.0
H100_TASK_NS = 1500.0


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
    task_overhead_ns: float = H100_TASK_NS   # fetch + wait + signal of one task (H100's, unless measured)
    event_latency_ns: float = H100_EVENT_NS  # signal → consumer starts: one dependent hop (H100's)
    stream_bandwidth: float = 0.0      # bytes/s task tiles reach with every SM streaming (0: see below)

    @property
    def workers(self) -> int:
        """One worker per SM."""
        return self.sms

    @property
    def sustained_bandwidth(self) -> float:
        """Measured where known (H100), else the spec bandwidth scaled by the H100's measured ratio."""
        return self.stream_bandwidth or self.bandwidth * (H100_STREAM_BW / H100_SPEC_BW)


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h100", 132, 227 * 1024, 65536, H100_SPEC_BW, H100_SPEC_FLOPS, 50 << 20,
        stream_bandwidth=H100_STREAM_BW),
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
