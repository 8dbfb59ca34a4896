"""Tensor-parallel collective tasks for the megakernel (bodies in ``mk_allreduce.cuh``): parameter layout,
host-side packing, and a self-contained probe program (compiled in CI, run where a GPU exists).

Task parameters (``MkTask``; see ``mk_allreduce.cuh``):

==========  =============================================================================================
``p[q]``    rank q's input tile (slot 0; mapped peer memory for q != rank), q < world <= 8
``p[8]``    this rank's output tile
``p[9]``    ``MkPeers*``: every rank's event-counter array as mapped here, this rank, world size
``a[16]``   columns per row (allreduce), rows (argmax merge), bytes per row (allgather)
``a[17]``   row stride in elements (allreduce), source row stride in bytes (allgather)
``a[18]``   output row stride in bytes (allgather), global index of column 0 (argmax pairs)
``a[19]``   the event whose counter the task reads on the peers (the producers of its tile)
``a[20]``   that event's triggers per iteration
``a[21]``   distance from slot 0 to slot 1 of the symmetric buffer (elements; pairs; bytes for allgather);
            0 when the buffer has one slot (``mpkir.runtime.multi_sim.slot_plan``)
``a[22]``   source rank (allgather)
==========  =============================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

HEADER = "mk_allreduce.cuh"
MAX_RANKS = 8
BODIES = ("mk_allreduce_bf16", "mk_allreduce_f32", "mk_argmax_pairs_bf16", "mk_argmax_merge_peers",
          "mk_allgather_peer")
"""The task bodies the header defines (variant names for the dispatch switch)."""


def header_source() -> str:
    return resources.files("mpkir.codegen").joinpath(HEADER).read_text(encoding="utf-8")


@dataclass(frozen=True)
class AllreduceTile:
    """One allreduce tile task of one rank (what ``lower`` would put in an ``MkTask``)."""

    world: int
    cols: int          # columns of the tile (multiple of 8 for bf16, of 4 for f32)
    row_stride: int    # elements between rows of the tensor
    event: int         # the tile producers' event (local id = peer id: every rank has the same graph)
    triggers: int      # producers of that event
    slot_stride: int   # elements from slot 0 to slot 1 of the symmetric buffer (0: one slot)
    dtype: str = "bf16"

    def check(self) -> None:
        if not 1 <= self.world <= MAX_RANKS:
            raise ValueError(f"world size {self.world} is outside 1..{MAX_RANKS}")
        vec = 8 if self.dtype == "bf16" else 4
        if self.cols % vec or self.row_stride % vec or self.slot_stride % vec:
            raise ValueError(f"{self.dtype} allreduce tiles need columns, row stride and slot stride that "
                             f"are multiples of {vec} (16-byte loads), got {self.cols}, {self.row_stride}, "
                             f"{self.slot_stride}")
        if self.triggers < 1 or self.event < 0:
            raise ValueError("an allreduce tile waits on a real event with at least one producer")

    @property
    def body(self) -> str:
        return "mk_allreduce_bf16" if self.dtype == "bf16" else "mk_allreduce_f32"

    def params(self) -> dict[int, int]:
        """``a[k]`` values of the task (indices 16..21)."""
        self.check()
        return {16: self.cols, 17: self.row_stride, 19: self.event, 20: self.triggers, 21: self.slot_stride}


def probe_source(nt: int = 512) -> str:
    """A CUDA program that runs the allreduce body for ``world`` emulated ranks on ONE GPU: block q plays
    rank q (its partial tile, its counters), writes its partial, signals its counter with a system-scope
    release, then reduces.  ``mk_probe`` is what the GPU test launches; CI only compiles it."""
    runtime = resources.files("mpkir.codegen").joinpath("mk_runtime.cuh").read_text(encoding="utf-8")
    strip = "\n".join(line for line in (runtime + "\n" + header_source()).splitlines()
                      if line.strip() != "#pragma once")
    return f"""#define MK_NT {nt}
{strip}

// x: [world][2 slots][rows][cols] partials, y: [world][rows][cols], counters: [world][4], peers: [world]
extern "C" __global__ void __launch_bounds__(MK_NT, 1)
mk_probe(const __nv_bfloat16* src, __nv_bfloat16* x, __nv_bfloat16* y, unsigned long long* counters,
         MkPeers* peers, int* status, int rows, int cols, int it, int world) {{
  const int q = blockIdx.x;  // probe only: the emulated rank (task bodies never read blockIdx)
  const size_t n = (size_t)rows * cols, slot = (size_t)(it & 1) * n;
  for (size_t i = threadIdx.x; i < n; i += MK_NT) x[(size_t)q * 2 * n + slot + i] = src[(size_t)q * n + i];
  __syncthreads();
  if (threadIdx.x == 0) {{
    mk_red_release_sys(counters + q * 4 + 1, 1ull);
    mk_wctx.counters = counters + q * 4; mk_wctx.status = status; mk_wctx.dump = status + 4;
    mk_wctx.spin_limit = 1ll << 26; mk_wctx.it = it; mk_wctx.ok = 1; mk_wctx.waited = 1;
  }}
  __syncthreads();
  MkTask t;
  for (int k = 0; k < 12; ++k) t.p[k] = 0;
  for (int k = 0; k < 32; ++k) t.a[k] = 0;
  for (int r = 0; r < world; ++r) t.p[r] = (long long)(x + (size_t)r * 2 * n);
  t.p[8] = (long long)(y + (size_t)q * n);
  t.p[9] = (long long)(peers + q);
  t.a[16] = cols; t.a[17] = cols; t.a[19] = 1; t.a[20] = 1; t.a[21] = (int)n;
  mk_allreduce_bf16(t, it, rows, nullptr);
}}

// every body instantiated (compile check of the argmax merge and the allgather)
extern "C" __global__ void __launch_bounds__(MK_NT, 1) mk_probe_all(const MkTask* ts, int it, int B) {{
  mk_allreduce_f32(ts[0], it, B, nullptr);
  mk_argmax_merge_peers(ts[1], it, B, nullptr);
  mk_allgather_peer(ts[2], it, B, nullptr);
  extern __shared__ char smem[];
  mk_argmax_pairs_bf16(ts[3], it, B, smem);
}}
"""


DISPATCH_MARK = "// ---- dispatch over the task variants"


def uses_collectives(plan) -> bool:
    return any(v in BODIES for v in plan.variants)


def with_collectives(src: str, plan) -> str:
    """``emit_cuda(plan)`` plus the collective bodies (and ``MK_COLLECTIVES``: producers of events that peers
    wait on signal at system scope) for a plan that uses them; the source unchanged otherwise.  (Equivalent
    to listing ``mk_allreduce.cuh`` in emit.py's headers behind ``#define MK_COLLECTIVES 1``.)"""
    if not uses_collectives(plan) or "#define MK_COLLECTIVES 1" in src:  # (emit.py may add it itself)
        return src
    if DISPATCH_MARK not in src:
        raise ValueError("emitted source has no dispatch section to insert the collective bodies before")
    body = "\n".join(line for line in header_source().splitlines() if line.strip() != "#pragma once")
    head, tail = src.split(DISPATCH_MARK, 1)
    return f"{head}// ---- {HEADER}\n#define MK_COLLECTIVES 1\n{body}\n{DISPATCH_MARK}{tail}"
