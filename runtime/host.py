"""CuPy host runtime of the megakernel: compile (NVRTC, cached on disk), allocate, launch N steps, watchdog.

``Megakernel(module, batch=B)`` lowers and compiles; ``.init_random(seed)`` fills weights and KV cache;
``.launch(steps)`` runs ``steps`` decode steps in one launch (the kernel feeds each argmax to the next step).
:class:`StepBackend` (``make_step_backend``) is the serving engine's step function: one launch per step;
:class:`ResidentBackend` the same protocol served by ONE resident launch (inputs and outputs through pinned
host memory, see ``mk_megakernel_serve`` in codegen/mk_kernel.cuh).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
import weakref

import numpy as np

from mpkir.codegen.emit import emit_cuda
from mpkir.codegen.lower import NT, SAMPLE_SMEM, Plan, dbits, env_int, halves64, lower
from mpkir.codegen.superopt_tasks import maybe_apply
from mpkir.runtime.jit_queue import event_queues, jit_block

TASK_DTYPE = np.dtype([("p", "<i8", (12,)), ("a", "<i4", (32,))])
assert TASK_DTYPE.itemsize == 224


def fill_step_inputs(block: np.ndarray, views, max_tokens: int, tokens, positions, seq_ids,
                     page_table) -> int:
    """Write one step's inputs into the io block (pinned, uploaded with one copy): ``views`` are its
    (tokens, positions0, positions, seq ids, page table) parts. Rows past the T live tokens are 0, their seq
    ids -1 (padding); the page table is copied as far as both shapes go. Returns T."""
    T = len(tokens)
    if not 1 <= T <= max_tokens:
        raise ValueError(f"step of {T} tokens outside 1..{max_tokens} (serve block's max_tokens)")
    tok, pos0, pos, sid, table = views
    block[:] = 0
    tok[:T] = tokens
    pos0[:T] = positions
    pos[:T] = positions
    sid[:] = -1
    sid[:T] = seq_ids
    pt = np.asarray(page_table, np.int32)
    r, c = min(table.shape[0], pt.shape[0]), min(table.shape[1], pt.shape[1])
    table[:r, :c] = pt[:r, :c]
    return T


def pack_sampling_rows(rows, max_tokens: int) -> np.ndarray:
    """Per-row sampling parameters for the serving kernel's sampled output (8 int32 words a row, see
    mk_kernel.cuh): ``rows`` are (temperature, top_k, top_p, seed, position of the draw); temperature 0 is
    greedy. Rows past ``len(rows)`` are greedy."""
    out = np.zeros((max_tokens, 8), np.int32)
    if len(rows) > max_tokens:
        raise ValueError(f"{len(rows)} sampling rows for at most {max_tokens} tokens")
    for i, (temperature, top_k, top_p, seed, pos) in enumerate(rows):
        out[i] = (*halves64(dbits(temperature)), top_k, *halves64(dbits(top_p)), *halves64(int(seed)), pos)
    return out


class DeviceError(RuntimeError):
    pass


PREFETCH_NEXT_KB = 32  # H100 2026-12-05: Llama-3.2-1B b1 1.41 -> 1.38 ms/step, Qwen3-8B b1 6.65 -> 6.49


def prefetch_settings() -> tuple[bool, int]:
    """(own tile, KiB of the next task's tile) from MPKIR_PREFETCH (default off) and MPKIR_PREFETCH_NEXT_KB
    (default PREFETCH_NEXT_KB; 0 turns it off). Own-tile prefetch takes precedence."""
    own = os.environ.get("MPKIR_PREFETCH", "0") != "0"
    return own, 0 if own else env_int("MPKIR_PREFETCH_NEXT_KB", PREFETCH_NEXT_KB)


def next_task_prefetch(plan: Plan, kb: int) -> dict[int, tuple[str, int, int]]:
    """Task id -> the first ``kb`` KiB of the weight range of the next ahead-of-time task in its SM's list
    (which the task prefetches into L2 before its own wait: the next tile's weights stream while this SM
    would otherwise idle), for every task followed by a task with a weight tile."""
    tasks = [t for o in plan.ops for t in o.tasks]
    out = {}
    for lst in plan.lists:
        aot = [x for x in lst if x >= 0]
        for a, b in itertools.pairwise(aot):
            if tasks[b].prefetch:
                bn, off, nb = tasks[b].prefetch
                out[a] = (bn, off, min(nb, kb * 1024))
    return out


def task_table(plan: Plan, ptr, prefetch: bool = False, prefetch_next_kb: int = 0) -> np.ndarray:
    """The plan's tasks as ``MkTask`` records (``TASK_DTYPE``), in op order: pointers (``ptr``: buffer name ->
    address, plus each task's byte offset), body parameters, variant index, signalled event, waited events
    with their lag bits and triggers, and the L2 weight prefetch issued before the task's wait: with
    ``prefetch`` its own tile, with ``prefetch_next_kb`` the start of the next task's (see
    :func:`next_task_prefetch`); for plans with scheduler warps, the queue that tasks of a launching event
    push it to (:mod:`mpkir.runtime.jit_queue`)."""
    nxt = next_task_prefetch(plan, prefetch_next_kb) if prefetch_next_kb > 0 and not prefetch else {}
    queues = event_queues(plan)
    var = {v: i for i, v in enumerate(plan.variants)}
    tab = np.zeros(plan.num_tasks, dtype=TASK_DTYPE)
    ntr = [len(o.tasks) for o in plan.ops]
    k = 0
    for oi, op in enumerate(plan.ops):
        waits = op.deps
        if len(waits) > 4:
            raise DeviceError(f"op {op.name} waits on {len(waits)} events (max 4)")
        for t in op.tasks:
            row = tab[k]
            for i, (bn, off) in t.p.items():
                row["p"][i] = ptr[bn] + off
            for i, v in t.a.items():
                row["a"][i] = v
            row["a"][0] = var[t.variant]
            row["a"][1] = oi
            if oi in queues:  # the event launches JIT ops: its last task pushes it to this scheduler queue
                row["a"][15] = queues[oi] + 1
            row["a"][2] = len(waits)
            row["a"][3] = sum(1 << j for j, (_, lag) in enumerate(waits) if lag)
            for j, (ev, _) in enumerate(waits):
                row["a"][4 + j] = ev
                row["a"][8 + j] = ntr[ev]
            pf = nxt.get(k) if nxt else (t.prefetch if prefetch else None)
            if pf:
                bn, off, nb = pf
                row["p"][11] = ptr[bn] + off
                row["a"][12] = nb & ~15
            k += 1
    return tab


def launch_inputs(plan: Plan, tokens, positions, seq_ids=None, page_table=None, live: int | None = None):
    """One launch's input buffers {name: int32 array}: ``live`` tokens (default: the plan's batch) at their
    positions (also the step-1 positions the kernel advances from), padding rows with seq id -1, the page
    table (default: request r owns pages r * pages_per_seq ...)."""
    B = plan.batch if live is None else live
    ins = plan.inputs
    tok = np.zeros(plan.max_tokens, np.int32)
    tok[:B] = tokens
    pos = np.zeros(plan.max_tokens, np.int32)
    pos[:B] = positions
    sid = np.full(plan.max_tokens, -1, np.int32)
    sid[:B] = np.arange(B) if seq_ids is None else seq_ids
    R, pps = plan.buffers[ins["page_table"]].shape
    pt = np.arange(R * pps, dtype=np.int32).reshape(R, pps) if page_table is None else page_table
    return {ins["tokens"]: tok, "in:positions0": pos, ins["positions"]: pos, ins["seq_ids"]: sid,
            ins["page_table"]: np.asarray(pt, np.int32)}


def poison_buffers(plan: Plan, bufs) -> None:
    """NaN (bf16/f32/f64) or -1 (i32) in every activation and scratch buffer of ``bufs`` (CuPy or NumPy)."""
    for name, b in plan.buffers.items():
        if b.kind in ("act", "scratch"):
            a = bufs[name]
            if a.dtype == np.uint16:
                a.fill(0x7FC0)
            elif a.dtype in (np.float32, np.float64):
                a.fill(np.nan)
            else:
                a.fill(-1)


def _cupy():
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception as e:  # no CuPy or no GPU
        raise DeviceError(f"no CUDA GPU available ({type(e).__name__}: {e}); use --device cpu") from None


def compile_source(src: str, cache_dir: str | None = None, name: str = "mk_megakernel"):
    """Compile with NVRTC for sm_90a (CuPy's on-disk cache is keyed by the source hash); kernel ``name``."""
    cp = _cupy()
    os.environ.setdefault("CUPY_CACHE_DIR", cache_dir or os.path.expanduser("~/.cache/mpkir/kernels"))
    mod = cp.RawModule(
        code=src, options=("--gpu-architecture=sm_90a", "-std=c++17", "-DNDEBUG"), backend="nvrtc"
    )
    return mod.get_function(name)


def _bf16_from_f32(cp, x):
    u = x.view(cp.uint32)
    r = (u + cp.uint32(0x7FFF) + ((u >> 16) & cp.uint32(1))) >> 16
    return r.astype(cp.uint16)


class Megakernel:
    def __init__(
        self,
        module,
        batch: int | None = None,
        greedy: bool = True,
        spin_limit: int = 20_000_000,
        superopt=None,
        sms: int | None = None,
        numerics: str = "fast",
    ):
        """``sms``: SMs the kernel may use (default: all of the device's); the plan's workers and, with
        scheduler-launched ops, its scheduler CTA fit in them. ``numerics``: ``fast`` or ``exact``
        (``codegen.lower.NUMERICS``; an exact plan runs no found programs)."""
        cp = self.cp = _cupy()
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        self.num_sms = props["multiProcessorCount"]
        if sms is not None:
            if not 1 <= sms <= self.num_sms:
                raise DeviceError(f"sms={sms}: the device has {self.num_sms} SMs")
            self.num_sms = sms
        self.device_name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        self.module, self.greedy, self.numerics = module, greedy, numerics
        t0 = time.time()
        if numerics == "exact" and superopt:
            raise DeviceError("exact numerics run the hand-written task bodies only (no found programs)")
        # found task programs: None = $MPKIR_SUPEROPT (codegen.superopt_tasks)
        self.superopt = False if numerics == "exact" else superopt
        self.plan: Plan = maybe_apply(self._lower(batch), module, self.superopt)
        if self.plan.world > 1:
            raise DeviceError("a tensor-parallel rank module runs on TPMegakernel (python -m "
                              "mpkir.models.shard_launch FILE --gpus N --device gpu)")
        self.src = emit_cuda(self.plan)
        self.source_hash = hashlib.sha256(self.src.encode()).hexdigest()[:16]
        self.lower_s = time.time() - t0
        t0 = time.time()
        self.kernel = compile_source(self.src)
        self.kernel.max_dynamic_shared_size_bytes = self.plan.smem_bytes
        self.compile_s = time.time() - t0
        occ = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            self.kernel.kernel.ptr, NT, self.plan.smem_bytes
        )
        if occ < 1:
            raise DeviceError(
                f"megakernel cannot be resident: {self.kernel.num_regs} registers x {NT} threads, "
                f"{self.plan.smem_bytes} B dynamic smem -> occupancy {occ}; refusing to launch"
            )
        self.spin_limit = spin_limit
        # L2 weight prefetch before each task's wait (bench/RESULTS.md): of its own tile (MPKIR_PREFETCH=1),
        # or of the first KiB of the next task's on its SM (MPKIR_PREFETCH_NEXT_KB)
        self.prefetch_own, self.prefetch_next_kb = prefetch_settings()
        self.bufs: dict[str, object] = {}
        self.B = self.plan.batch
        self._alloc()

    def _lower(self, batch: int | None) -> Plan:
        return lower(self.module, num_sms=self.num_sms, greedy=self.greedy, batch=batch,
                     numerics=self.numerics)

    def set_batch(self, batch: int):
        """Re-plan for ``batch`` live tokens, keeping weights and caches (same kernel source)."""
        self.plan = maybe_apply(self._lower(batch), self.module, self.superopt)
        src = emit_cuda(self.plan)
        if src != self.src:
            self.src = src
            self.kernel = compile_source(src)
            self.kernel.max_dynamic_shared_size_bytes = self.plan.smem_bytes
        self.B = self.plan.batch
        self._alloc()
        self.d_tasks = None

    # ---------------------------------------------------------------- memory
    def _alloc(self):
        cp = self.cp
        for name, b in self.plan.buffers.items():
            dt = _cp_dtype(cp, b.dtype)
            old = self.bufs.get(name)
            if old is not None and (old.shape == tuple(b.shape) or name == "hist"):
                continue
            self.bufs[name] = cp.zeros(b.shape, dtype=dt)
            if b.kind == "const":  # values fixed at compile time (e.g. rope inverse frequencies)
                self.bufs[name][...] = cp.asarray(np.asarray(b.data).reshape(b.shape).astype(dt))

    def resize_hist(self, steps: int):
        self.bufs["hist"] = self.cp.zeros((steps, self.plan.max_tokens), dtype=self.cp.int32)

    def init_random(self, seed: int = 0, kv_scale: float = 1.0):
        """Random bf16 weights (std 0.02; 1-D norm weights 1 + 0.1 N(0,1)) and a random KV cache."""
        cp = self.cp
        rs = cp.random.RandomState(seed)
        for name in sorted(self.plan.buffers):
            b = self.plan.buffers[name]
            if b.kind not in ("weight", "state"):
                continue
            arr = self.bufs[name].reshape(-1)
            n = arr.size
            step = 1 << 27
            for i in range(0, n, step):
                m = min(step, n - i)
                if b.kind == "state":
                    x = rs.standard_normal(m, dtype=cp.float32) * kv_scale
                elif len(b.shape) == 1:
                    x = 1.0 + 0.1 * rs.standard_normal(m, dtype=cp.float32)
                else:
                    x = 0.02 * rs.standard_normal(m, dtype=cp.float32)
                arr[i : i + m] = _bf16_from_f32(cp, x.astype(cp.float32))
        cp.cuda.Device().synchronize()

    # ---------------------------------------------------------------- task table
    def _table(self):
        cp = self.cp
        plan = self.plan
        ptr = {n: int(a.data.ptr) for n, a in self.bufs.items()}
        tab = task_table(plan, ptr, prefetch=self.prefetch_own, prefetch_next_kb=self.prefetch_next_kb)
        off = np.zeros(plan.num_sms + 1, dtype=np.int32)
        off[1:] = np.cumsum([len(lst) for lst in plan.lists])
        flat = np.array([x for lst in plan.lists for x in lst], dtype=np.int32)
        jit = jit_block(plan)
        self.d_tasks = cp.asarray(tab.view(np.uint8))
        self.d_off = cp.asarray(off)
        self.d_list = cp.asarray(flat)
        # one control block, reset by one device copy per launch:
        # counters (u64 per op) | status (4) | per-CTA dump (grid x 8) | JIT ops (runtime/jit_queue.py)
        n_ops = len(plan.ops)
        sizes = (2 * n_ops, 4, plan.grid * 8, jit.size)
        ctrl = cp.zeros(sum(sizes), dtype=cp.int32)
        o = np.cumsum((0, *sizes))
        self.d_counters = ctrl[o[0] : o[1]].view(cp.uint64)
        self.d_status = ctrl[o[1] : o[2]]
        self.d_dump = ctrl[o[2] : o[3]].reshape(plan.grid, 8)
        self.d_jit = ctrl[o[3] : o[4]]
        init = np.zeros(sum(sizes), np.int32)
        init[o[3] : o[4]] = jit
        self.d_ctrl, self.d_ctrl_init = ctrl, cp.asarray(init)
        self.events = (cp.cuda.Event(), cp.cuda.Event())

    # ---------------------------------------------------------------- launch
    def set_inputs(self, tokens, positions, seq_ids=None, page_table=None, live: int | None = None):
        """Upload one launch's inputs; ``live`` tokens (default: the plan's batch) run, the rest pad."""
        cp = self.cp
        for name, a in launch_inputs(self.plan, tokens, positions, seq_ids, page_table,
                                     self.B if live is None else live).items():
            self.bufs[name][...] = cp.asarray(a)

    def launch(self, steps: int, trace_cap: int = 0, live: int | None = None):
        """One launch for ``steps`` decode steps over ``live`` tokens (default the plan's batch; tasks of
        later tokens return at once); returns elapsed ms (device events)."""
        cp = self.cp
        if "hist" not in self.bufs or self.bufs["hist"].shape[0] != steps:
            self.resize_hist(steps)
            self.d_tasks = None
        if getattr(self, "d_tasks", None) is None:
            self._table()
        self.d_ctrl.data.copy_from_device_async(self.d_ctrl_init.data, self.d_ctrl.nbytes)
        self.bufs["hist"].fill(-1)
        self.d_trace = (
            cp.zeros((self.plan.num_sms, max(trace_cap, 1), 4), dtype=cp.uint64) if trace_cap else None
        )
        e0, e1 = self.events
        e0.record()
        self.kernel(
            (self.plan.grid,),
            (NT,),
            (
                self.d_tasks,
                self.d_off,
                self.d_list,
                self.d_counters,
                self.d_status,
                self.d_dump,
                self.d_trace if self.d_trace is not None else np.uint64(0),
                np.int32(trace_cap),
                np.int32(steps),
                np.int32(self.B if live is None else live),
                np.int64(self.spin_limit),
                self.d_jit,
            ),
            shared_mem=self.plan.smem_bytes,
        )
        e1.record()
        e1.synchronize()
        st = cp.asnumpy(self.d_status)
        if st[0] != 0 or st[1] != 0:
            raise DeviceError(self.hang_report(st))
        return cp.cuda.get_elapsed_time(e0, e1)

    def hang_report(self, st) -> str:
        dump = self.cp.asnumpy(self.d_dump)
        names = {}
        k = 0
        for op in self.plan.ops:
            for _ in op.tasks:
                names[k] = op.name
                k += 1
        if st[0] == PAGES_EMPTY_CODE:
            return ("megakernel: a step needed a KV page and the kernel's pool was empty (error 4; the host "
                    "admits a request only with pages for its whole life, so this is a bug)")
        lines = [f"megakernel watchdog: error {st[0]} (first timeout on SM {st[2]}); per-SM state:"]
        for sm, d in enumerate(dump):
            if d[7] and d[0] == -2:  # a wait on a JIT queue (mk_kernel.cuh's mk_wait_stamp)
                what = (f"scheduler warp {-1 - d[1]} waits for entry {d[3]} of its event queue" if d[1] < 0
                        else f"waits for the scheduler to launch {self.plan.ops[d[1]].name} at step {d[3]}")
                lines.append(f"  {'scheduler' if sm >= self.plan.num_sms else 'SM ' + format(sm, '3d')}: "
                             f"{what} (seen {d[4]}){' TIMEOUT' if d[6] else ''}")
            elif d[7]:
                ev = self.plan.ops[d[1]].name if 0 <= d[1] < len(self.plan.ops) else "?"
                lines.append(
                    f"  SM {sm:3d}: task {d[0]} ({names.get(int(d[0]), '?')}) step {d[2]} waits on "
                    f"event {d[1]} ({ev}) counter {d[4]} < {d[3]}{' TIMEOUT' if d[6] else ''}"
                )
        return "\n".join(lines)

    def poison(self):
        """Fill every activation and scratch buffer with NaN (bf16/f32) or -1 (i32) before a check run."""
        poison_buffers(self.plan, self.bufs)

    def tokens(self):
        return self.cp.asnumpy(self.bufs["hist"])[:, : self.B]

    def buffer(self, name):
        return self.bufs[name]


def bf16_bits(a) -> np.ndarray:
    """bf16 bit patterns (uint16): a bf16 array's own bits, else float32 rounded to nearest even."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16" or a.dtype == np.uint16:
        return np.ascontiguousarray(a).view(np.uint16)
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return r.astype(np.uint16)


class StepBackend:
    """The engine's step function on the GPU: one megakernel launch per engine step.

    Built from the module whose entry graph returns the lm_head logits (``logits_module``); the kernel is
    planned once for the serve block's ``max_tokens`` and each step runs its ``T`` live tokens (the tasks
    of later tokens return at once), so nothing is re-planned or recompiled between steps. The real
    weights live in the plan's buffers (tied weights share one), the paged KV cache stays on the device
    between steps; tokens, positions, seq ids and the page table come from the host engine each step.
    ``step`` returns float32 logits [T, V] (the bf16 values the graph computes).
    """

    def __init__(self, module, analysis, weights, graph: str | None = None, spin_limit: int = 20_000_000,
                 numerics: str = "fast"):
        from mpkir.diagnostics import error
        from mpkir.models.backends import _bind_params, logits_module

        m2, changed = logits_module(module, analysis, graph)
        self.params = _bind_params(m2.graph(graph))
        if self.params["positions"] != "positions":
            raise error("the GPU backend needs the graph's positions parameter to be named %positions")
        t0 = time.time()
        self.mk = Megakernel(m2, batch=None, greedy=True, spin_limit=spin_limit, numerics=numerics)
        plan = self.mk.plan
        if changed and plan.logits is None:
            raise error("the GPU plan of the logits graph has no logits buffer")
        self.returns_logits = plan.logits is not None
        self.max_tokens = plan.max_tokens
        self.device_name = self.mk.device_name
        if weights is None:  # benchmarks: random weights and KV cache (timing depends on shapes only)
            self.mk.init_random(0)
        else:
            self.load_weights(weights)
        self._io_block()
        self.mk.resize_hist(1)
        self.mk._table()
        self.setup_s = time.time() - t0
        self.steps = 0
        self.kernel_ms = 0.0

    def _io_block(self) -> None:
        """Put the step inputs (tokens, positions0, positions, seq ids, page table) in one device block
        (views replace the separate buffers), uploaded per step with one copy from pinned host memory."""
        cp, mk = self.mk.cp, self.mk
        ins, p = mk.plan.inputs, self.params
        names = [ins[p["tokens"]], "in:positions0", ins[p["positions"]], ins[p["seq_ids"]]]
        names.append(ins[p["page_table"]])
        shapes = [tuple(mk.bufs[n].shape) for n in names]
        sizes = [int(np.prod(sh)) for sh in shapes]
        blk = cp.zeros(sum(sizes), dtype=cp.int32)
        mem = cp.cuda.alloc_pinned_memory(blk.nbytes)
        self.h_io = np.frombuffer(mem, np.int32, sum(sizes))
        self.h_io_mem, self.d_io = mem, blk
        self.io = {}
        o = 0
        for n, sh, sz in zip(names, shapes, sizes, strict=True):
            mk.bufs[n] = blk[o : o + sz].reshape(sh)
            self.io[n] = self.h_io[o : o + sz].reshape(sh)
            o += sz
        self.io_names = names

    def _fill(self, tokens, positions, seq_ids, page_table) -> int:
        return fill_step_inputs(self.h_io, [self.io[n] for n in self.io_names], self.max_tokens, tokens,
                                positions, seq_ids, page_table)

    def load_weights(self, weights) -> None:
        """Copy every weight buffer's checkpoint tensor to the device (bf16), checking names and shapes."""
        cp, mk = self.mk.cp, self.mk
        missing, bad = [], []
        for name, b in mk.plan.buffers.items():
            if b.kind != "weight":
                continue
            if b.checkpoint not in weights:
                missing.append(b.checkpoint)
                continue
            a = np.asarray(weights[b.checkpoint])
            if tuple(a.shape) != tuple(b.shape):
                bad.append(f"{b.checkpoint}: checkpoint {tuple(a.shape)} vs plan {tuple(b.shape)}")
                continue
            if b.dtype != "bf16":
                raise DeviceError(f"weight {b.checkpoint}: only bf16 weights are supported on the GPU")
            mk.bufs[name][...] = cp.asarray(bf16_bits(a))
        if missing or bad:
            raise DeviceError(
                "weights do not match the plan: "
                + "; ".join([f"missing {', '.join(missing[:8])}" if missing else "", *bad[:8]]).strip("; ")
            )
        cp.cuda.Device().synchronize()

    def step(self, tokens, positions, seq_ids, page_table) -> np.ndarray:
        """One step for the T live tokens: logits [T, V] float32 (token ids [T] for an argmax graph)."""
        cp, mk = self.mk.cp, self.mk
        T = self._fill(tokens, positions, seq_ids, page_table)
        self.d_io.set(self.h_io)  # one copy (pinned source)
        self.kernel_ms += mk.launch(1, live=T)
        self.steps += 1
        if not self.returns_logits:
            return cp.asnumpy(mk.bufs["hist"][0, :T]).astype(np.int64)
        lg = mk.bufs[mk.plan.logits][:T]
        if lg.dtype != cp.float32:  # bf16 bits -> float32 on the device (no host-side conversion pass)
            lg = (lg.astype(cp.uint32) << 16).view(cp.float32)
        return cp.asnumpy(lg)


SERVE_HDR = 16  # int32 words of a ring slot's header (MK_SERVE_HDR in mk_kernel.cuh)
RESIDENT_OUTPUTS = ("logits", "ids", "sample")  # the serving kernel's output modes 0, 1, 2
PAGES_EMPTY_CODE = 4  # status[0] when in-kernel KV pages ran out (MK_PAGES_EMPTY in mk_pages.cuh)
IDLE_CODE = 2  # status[0] when the resident kernel saw no step for idle_s (it ends; the next step relaunches)


def _final_op(plan: Plan) -> int:
    """The op every other op precedes in a step (the lowering makes the output op depend on all leaves)."""
    consumed = {d for o in plan.ops for d, lag in o.deps if lag == 0}
    sinks = [i for i in range(len(plan.ops)) if i not in consumed]
    if len(sinks) != 1:
        raise DeviceError(f"the plan has {len(sinks)} final ops ({sinks[:4]}); the resident kernel needs one")
    return sinks[0]


def ring_slot_ints(released_off: int, page_slots: int) -> int:
    """int32 words per ring slot: header, inputs, sampling rows, released slots, rounded up to 16 bytes
    (the kernel reads the step number as a 64-bit word and the inputs with 16-byte loads from the slot)."""
    return (released_off + page_slots + 3) // 4 * 4


def _publish_step(slot: np.ndarray, it: int) -> None:
    """Write step number ``it`` into a slot's first 64-bit word (the kernel's acquire load)."""
    slot[:2].view(np.uint64)[0] = it


def _stop_resident(state: dict) -> None:
    """Send "stop" through the ring and wait for the kernel to end (also the finaliser of a lost backend)."""
    if not state["running"]:
        return
    state["running"] = False
    it = state["it"] + 1
    slot = state["ring"][(it - 1) % state["ring"].shape[0]]
    slot[2] = 1
    _publish_step(slot, it)
    state["stream"].synchronize()


class ResidentBackend(StepBackend):
    """The engine's step function served by ONE resident megakernel launch (requests join and leave
    between steps).

    The host writes each step (command, live tokens T, output kind, the input block of :class:`StepBackend`:
    tokens, positions, seq ids, page table) into slot ``(s-1) % nslots`` of a ring in pinned host memory,
    then publishes it by writing the step number ``s``. Worker 0 of the kernel waits for that number (system
    scope acquire, bounded by ``idle_s``), copies the block over the device inputs and releases the step to
    all workers; the step runs under the never-reset event counters; the workers copy the logits (f32
    [T, V]), with ``output="ids"`` the row argmaxes, with ``output="sample"`` the tokens drawn with each row's
    parameters (``mk_sample_row``; the slot carries them) into pinned memory, and worker 0 publishes ``s`` as
    the done number (system-scope release), which ``step`` waits for. ``close`` sends "stop". A kernel
    that saw no step for ``idle_s`` ends itself (status code 2) and the next ``step`` relaunches it;
    ``launches`` counts the launches. While it runs, nothing may synchronise the device (its stream is
    non-blocking, so other CuPy work on the default stream still runs).
    """

    def __init__(self, module, analysis, weights, graph: str | None = None, spin_limit: int = 20_000_000,
                 output: str = "logits", nslots: int = 2, idle_s: float = 2.0, timeout_s: float = 120.0,
                 kernel_pages: bool = False, numerics: str = "fast"):
        if output not in RESIDENT_OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(RESIDENT_OUTPUTS)}, not {output!r}")
        super().__init__(module, analysis, weights, graph, spin_limit, numerics)
        mk, cp = self.mk, self.mk.cp
        if not self.returns_logits:
            raise DeviceError("the resident backend needs a graph that returns the logits")
        self.output, self.idle_s, self.timeout_s = output, idle_s, timeout_s
        self.kernel = compile_source(mk.src, name="mk_megakernel_serve")
        self.kernel.max_dynamic_shared_size_bytes = mk.plan.smem_bytes
        occ = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            self.kernel.kernel.ptr, NT, mk.plan.smem_bytes
        )
        if occ < 1:
            raise DeviceError(f"the resident megakernel cannot be resident (occupancy {occ}); not launched")
        lg = mk.bufs[mk.plan.logits]
        if lg.ndim != 2 or lg.shape[0] != self.max_tokens:
            raise DeviceError(f"logits buffer of shape {lg.shape}: expected [max_tokens, V]")
        self.V = int(lg.shape[1])
        self.final = _final_op(mk.plan)
        self.io_n = self.h_io.size
        self.smp_off = SERVE_HDR + (self.io_n + 3) // 4 * 4  # per-row sampling parameters (output "sample")
        self.rel_off = self.smp_off + (8 * self.max_tokens if output == "sample" else 0)  # released slots
        self.io_copy_n, self.d_kpages, self.d_kcfg = self.io_n, None, None
        if kernel_pages:
            self._kernel_pages()
        self.slot_ints = ring_slot_ints(self.rel_off, self.page_slots if kernel_pages else 0)
        if output == "sample" and mk.plan.smem_bytes < SAMPLE_SMEM:
            raise DeviceError(f"in-kernel sampling needs {SAMPLE_SMEM} B of shared memory per worker, the "
                              f"plan has {mk.plan.smem_bytes}")
        n = nslots * self.slot_ints
        self._ring_mem = cp.cuda.alloc_pinned_memory(n * 4)
        ring = np.frombuffer(self._ring_mem, np.int32, n).reshape(nslots, self.slot_ints)
        ring[...] = 0
        nout = self.max_tokens * self.V
        self._out_mem = cp.cuda.alloc_pinned_memory(256 + nout * 4)
        self.h_done = np.frombuffer(self._out_mem, np.uint64, 1)
        self.h_logits = np.frombuffer(self._out_mem, np.float32, nout, offset=256)
        self.h_ids = np.frombuffer(self._out_mem, np.int32, self.max_tokens, offset=256)
        self.d_sctl = cp.zeros(8, dtype=cp.uint64)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.launches = 0
        self._st = {"running": False, "it": 0, "ring": ring, "stream": self.stream}
        self._finalizer = weakref.finalize(self, _stop_resident, self._st)

    def _kernel_pages(self) -> None:
        """The pool of KV pages the kernel allocates and frees itself (codegen/mk_pages.cuh): a fresh pool
        (pages handed out as 0, 1, 2, ...) and its configuration; the page table is no longer uploaded."""
        cp = self.mk.cp
        table = self.io[self.io_names[-1]]
        base = self.h_io.ctypes.data

        def off(name: str) -> int:
            return (self.io[name].ctypes.data - base) // 4

        if off(self.io_names[-1]) + table.size != self.io_n:
            raise DeviceError("the page table must be the last part of the step's input block")
        R, pps = table.shape
        cache = self.mk.plan.buffers.get("s:k_cache[0]")
        if cache is None:
            raise DeviceError("in-kernel KV pages need a paged KV cache (s:k_cache[0])")
        P, page_size = int(cache.shape[0]), int(cache.shape[1])
        kp = np.zeros(1 + R + P, np.int32)
        kp[0], kp[1 + R :] = P, np.arange(P - 1, -1, -1)
        self.d_kpages = cp.asarray(kp)
        cfg = [R, P, pps, page_size, self.rel_off, off(self.io_names[-1]), off(self.io_names[3]),
               off(self.io_names[2])]
        self.d_kcfg = cp.asarray(np.array(cfg, np.int32))
        self.io_copy_n = self.io_n - table.size
        self.page_slots = R

    @property
    def allocates_pages(self) -> bool:
        """True when the kernel allocates the KV pages: ``step`` takes the request slots released since the
        last step and ignores the page table it is given."""
        return self.d_kpages is not None

    # ------------------------------------------------------------------ kernel lifetime
    @property
    def running(self) -> bool:
        return self._st["running"]

    def _launch(self) -> None:
        cp, mk = self.mk.cp, self.mk
        ring = self._st["ring"]
        ring[:, :SERVE_HDR] = 0
        self.h_done[0] = 0
        p = mk.plan
        cp.cuda.Stream.null.synchronize()  # default-stream uploads and fills first
        with self.stream:
            mk.d_ctrl.data.copy_from_device_async(mk.d_ctrl_init.data, mk.d_ctrl.nbytes)
            self.d_sctl.fill(0)
            lg = mk.bufs[p.logits]
            self.kernel(
                (p.grid,),
                (NT,),
                (
                    mk.d_tasks, mk.d_off, mk.d_list, mk.d_counters, mk.d_status, mk.d_dump,
                    np.uint64(0), np.int32(0), np.int64(mk.spin_limit), mk.d_jit,
                    np.uint64(ring.ctypes.data), np.int32(ring.shape[0]), np.int32(self.slot_ints),
                    self.d_io, np.int32(self.io_copy_n), self.d_sctl,
                    np.int32(self.final), np.int32(len(p.ops[self.final].tasks)),
                    lg, np.int32(lg.dtype == cp.float32), np.int32(self.V), np.int32(lg.shape[1]),
                    np.uint64(self.h_logits.ctypes.data), np.uint64(self.h_done.ctypes.data),
                    np.int64(int(self.idle_s * 1e9)), np.int32(self.smp_off),
                    self.d_kpages if self.d_kpages is not None else np.uint64(0),
                    self.d_kcfg if self.d_kcfg is not None else np.uint64(0),
                ),
                shared_mem=p.smem_bytes,
            )
        self.launches += 1
        self._st.update(running=True, it=0)

    def _ended(self) -> int:
        """The kernel ended by itself: 0 when it went idle (relaunch), else raise with the watchdog report."""
        self._st["running"] = False
        self.stream.synchronize()
        st = self.mk.cp.asnumpy(self.mk.d_status)
        if st[0] == IDLE_CODE:
            return 0
        raise DeviceError("resident " + self.mk.hang_report(st))

    def close(self) -> None:
        """Stop the resident kernel (the next ``step`` would launch it again)."""
        if self.running:
            _stop_resident(self._st)
            st = self.mk.cp.asnumpy(self.mk.d_status)
            if st[0] not in (0, IDLE_CODE):
                raise DeviceError("resident " + self.mk.hang_report(st))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ one engine step
    @property
    def samples_rows(self) -> bool:
        """True when ``step`` takes per-row sampling parameters and returns the drawn ids."""
        return self.output == "sample"

    def step(self, tokens, positions, seq_ids, page_table, sampling=None, released=()) -> np.ndarray:
        """One step for the T live tokens: logits [T, V] float32; argmax ids [T] with ``output='ids'``; with
        ``output='sample'`` the ids drawn in the kernel with ``sampling`` (per row: temperature, top_k, top_p,
        seed, position of the draw; None: all greedy). With in-kernel pages, ``released`` lists the request
        slots whose pages go back to the pool before this step's tokens take theirs."""
        T = self._fill(tokens, positions, seq_ids, page_table)
        params = pack_sampling_rows(sampling or [], T) if self.output == "sample" else None
        if released and not self.allocates_pages:
            raise ValueError("released slots are for a backend that allocates the KV pages itself")
        released = [int(r) for r in released]
        for _ in range(2):  # a second try only after an idle end of the kernel
            if self.running and self.stream.done:
                self._ended()
            if not self.running:
                self._launch()
            it = self._st["it"] + 1
            if self._publish_and_wait(it, T, params, released):
                break
        self._st["it"] = it
        self.steps += 1
        if self.output != "logits":
            return self.h_ids[:T].astype(np.int64)
        return self.h_logits[: T * self.V].reshape(T, self.V).copy()

    def _publish_and_wait(self, it: int, T: int, params: np.ndarray | None, released: list[int]) -> bool:
        ring = self._st["ring"]
        slot = ring[(it - 1) % ring.shape[0]]
        slot[2], slot[3], slot[4] = 0, T, RESIDENT_OUTPUTS.index(self.output)
        slot[SERVE_HDR : SERVE_HDR + self.io_n] = self.h_io
        if params is not None:
            slot[self.smp_off : self.smp_off + params.size] = params.reshape(-1)
        slot[5] = len(released)
        if released:
            slot[self.rel_off : self.rel_off + len(released)] = released
        _publish_step(slot, it)  # publish (x86 stores are seen in order)
        done, t0, n = self.h_done, time.perf_counter(), 0
        while done[0] < it:
            n += 1
            if n % 4096 == 0:
                if self.stream.done:
                    self._ended()
                    return False
                if time.perf_counter() - t0 > self.timeout_s:
                    raise DeviceError(f"resident megakernel: step {it} not done after {self.timeout_s} s")
        return True


def make_step_backend(module, analysis, weights, graph: str | None = None, resident: bool = False,
                      output: str = "logits", kernel_pages: bool = False,
                      numerics: str = "fast") -> StepBackend:
    """The engine's GPU step function: one resident launch for all steps (:class:`ResidentBackend`) or one
    launch per step (:class:`StepBackend`), in ``numerics`` (``codegen.lower.NUMERICS``)."""
    if resident:
        return ResidentBackend(module, analysis, weights, graph, output=output, kernel_pages=kernel_pages,
                               numerics=numerics)
    return StepBackend(module, analysis, weights, graph, numerics=numerics)


def run_cli(args) -> int:
    """``mpkir run FILE --device gpu --steps N [--trace out.json] [--greedy]``: random weights, one launch,
    tokens (sampled in the kernel where the graph samples, unless --greedy)."""
    from mpkir.commands import load
    from mpkir.semantics import build_env

    try:
        _cupy()
    except DeviceError as e:
        print(f"error: {e}")
        return 1
    module, _ = load(args.path)
    env, _ = build_env(module)
    ntok = len(args.tokens) if args.tokens else 1
    mk = Megakernel(module, batch=ntok, greedy=getattr(args, "greedy", False),
                    numerics=getattr(args, "numerics", "fast"))
    mk.init_random(args.seed)
    vocab = int(env.consts.get("vocab", 1000))
    rng = np.random.default_rng(args.seed)
    toks = list(args.tokens) if args.tokens else list(rng.integers(0, vocab, ntok))
    mk.set_inputs(toks, np.zeros(ntok, np.int32))
    steps = max(1, args.steps)
    mk.launch(steps)  # warm-up (first launch loads the module)
    mk.set_inputs(toks, np.zeros(ntok, np.int32))
    ms = mk.launch(steps, trace_cap=4096 if args.trace else 0)
    if not args.quiet:
        print(
            f"device: {mk.device_name}, {mk.num_sms} workers, {mk.plan.num_tasks} tasks, "
            f"{len(mk.plan.ops)} ops; compile {mk.compile_s:.2f} s"
        )
        print(f"tokens in: {toks}")
        print("tokens out (step x batch):")
        for s, row in enumerate(mk.tokens()):
            print(f"  step {s + 1}: {row.tolist()}")
        print(f"{ms:.3f} ms for {steps} steps in one launch: {ms / steps:.3f} ms/step")
    if args.trace:
        from mpkir.runtime.trace import write_trace

        n = write_trace(mk, args.trace)
        if not args.quiet:
            print(f"trace: {n} task events -> {args.trace}")
    return 0


# ---------------------------------------------------------------------------------------- tensor parallel
def upload_weights(mk: Megakernel, weights) -> None:
    """Copy every weight buffer of ``mk``'s plan from ``weights`` (keyed by the buffer's checkpoint key: a
    rank's slices by ``mpkir.models.shard.weight_key``), as bf16; refuse missing or ill-shaped tensors."""
    cp = mk.cp
    bad = []
    for name, b in mk.plan.buffers.items():
        if b.kind != "weight":
            continue
        a = weights.get(b.checkpoint)
        if a is None or tuple(np.shape(a)) != tuple(b.shape) or b.dtype != "bf16":
            bad.append(f"{b.checkpoint}: {None if a is None else np.shape(a)} vs plan {b.dtype}{b.shape}")
            continue
        mk.bufs[name][...] = cp.asarray(bf16_bits(a))
    if bad:
        raise DeviceError("weights do not match the plan: " + "; ".join(bad[:8]))
    cp.cuda.Device().synchronize()


class TPMegakernel(Megakernel):
    """One tensor-parallel rank's megakernel (a rank module of the ``shard`` pass; collectives as tasks).

    Its symmetric buffers (the collectives' inputs) and its event counters live in one ``cudaMalloc`` arena
    laid out identically on every rank (plans are identical), so peer q's copy of buffer X is peer q's arena
    base + X's offset.  Peers exchange arena bases: ``ipc_handle()`` / ``map_peers(handles)`` between
    processes (cudaIpcGetMemHandle / cudaIpcOpenMemHandle), plain pointers for ranks in one process.  No
    managed memory, no NVLink multicast.  A launch is ``prepare(steps)`` (zero the counters) → a barrier of
    all ranks → ``start(steps)`` → ``finish()``; ``num_sms`` workers (e.g. half the SMs when two ranks share
    one GPU: ``co_resident=2`` refuses a kernel whose occupancy would not let both be resident).
    """

    def __init__(self, module, rank: int, world: int, num_sms: int | None = None, co_resident: int = 1,
                 batch: int | None = None, spin_limit: int = 20_000_000):
        from mpkir.codegen.allreduce import with_collectives

        cp = self.cp = _cupy()
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        total = props["multiProcessorCount"]
        self.device_name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        self.num_sms = num_sms or total // co_resident
        self.module, self.greedy, self.superopt = module, True, None
        self.rank, self.world = rank, world
        t0 = time.time()
        self.plan = lower(module, num_sms=self.num_sms, greedy=True, batch=batch, world=world)
        self.src = with_collectives(emit_cuda(self.plan), self.plan)
        self.source_hash = hashlib.sha256(self.src.encode()).hexdigest()[:16]
        self.lower_s = time.time() - t0
        t0 = time.time()
        self.kernel = compile_source(self.src)
        self.kernel.max_dynamic_shared_size_bytes = self.plan.smem_bytes
        self.compile_s = time.time() - t0
        occ = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            self.kernel.kernel.ptr, NT, self.plan.smem_bytes
        )
        if occ * total < self.num_sms * co_resident:
            raise DeviceError(
                f"{co_resident} rank megakernel(s) of {self.num_sms} workers cannot all be resident on "
                f"{total} SMs at occupancy {occ}; refusing to launch"
            )
        self.occupancy = occ
        self.spin_limit = spin_limit
        # own-tile L2 prefetch as Megakernel (MPKIR_PREFETCH); next-tile prefetch: not measured with peers
        self.prefetch_own, self.prefetch_next_kb = prefetch_settings()[0], 0
        self.bufs: dict[str, object] = {}
        self.B = self.plan.batch
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._opened: list[int] = []
        self._alloc()

    # ---------------------------------------------------------------- symmetric memory
    def _alloc(self):
        cp = self.cp
        if getattr(self, "arena_ptr", None) is None:
            off, o = arena_layout(self.plan)
            sym = list(off)
            self.sym_offsets, self.arena_bytes = off, o
            self.arena_ptr = cp.cuda.runtime.malloc(o)
            self._free = weakref.finalize(self, _free_arena, cp, self.arena_ptr, self._opened)
            self.arena_counters = self._view(self.arena_ptr, (len(self.plan.ops),), cp.uint64)
            for n in sym:
                b = self.plan.buffers[n]
                self.bufs[n] = self._view(self.arena_ptr + off[n], b.shape, _cp_dtype(cp, b.dtype))
            cp.cuda.runtime.memset(self.arena_ptr, 0, o)
        super()._alloc()

    def _view(self, ptr: int, shape, dtype):
        cp = self.cp
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        mem = cp.cuda.UnownedMemory(int(ptr), n, self)
        return cp.ndarray(tuple(shape), dtype, cp.cuda.MemoryPointer(mem, 0))

    def ipc_handle(self) -> bytes:
        return bytes(self.cp.cuda.runtime.ipcGetMemHandle(self.arena_ptr))

    def map_peers(self, bases) -> None:
        """``bases[q]``: rank q's arena as an IPC handle (bytes, another process) or a device pointer (int,
        this process); this rank's own entry is ignored.  Fills the peer views and ``MkPeers``."""
        cp = self.cp
        if len(bases) != self.world:
            raise DeviceError(f"{len(bases)} peer arenas for a world of {self.world}")
        base = []
        for q, b in enumerate(bases):
            if q == self.rank:
                base.append(self.arena_ptr)
            elif isinstance(b, (bytes, bytearray)):
                p = cp.cuda.runtime.ipcOpenMemHandle(bytes(b), 1)  # cudaIpcMemLazyEnablePeerAccess
                self._opened.append(p)
                base.append(p)
            else:
                base.append(int(b))
        for q in range(self.world):
            for n, o in self.sym_offsets.items():
                b = self.plan.buffers[n]
                dt = _cp_dtype(cp, b.dtype)
                mine = q == self.rank
                self.bufs[f"peer:{q}:{n}"] = self.bufs[n] if mine else self._view(base[q] + o, b.shape, dt)
        h = np.zeros(9, np.int64)  # struct MkPeers { u64* counters[8]; int rank, world; }
        h[: self.world] = base
        h[8] = self.rank | (self.world << 32)
        self.bufs["mkpeers"] = cp.asarray(h)
        self.peer_bases = base
        self.d_tasks = None

    # ---------------------------------------------------------------- launch in three phases
    def _table(self):
        super()._table()
        self.d_counters = self.arena_counters  # the counters peers read (zeroed by prepare)

    def prepare(self, steps: int) -> None:
        """Before the all-rank barrier: task table, zeroed counters and control block, cleared history."""
        cp = self.cp
        if "mkpeers" not in self.bufs:
            raise DeviceError("map_peers() first: the collective tasks need the peers' arenas")
        if "hist" not in self.bufs or self.bufs["hist"].shape[0] != steps:
            self.resize_hist(steps)
            self.d_tasks = None
        if getattr(self, "d_tasks", None) is None:
            self._table()
        self.d_ctrl.data.copy_from_device_async(self.d_ctrl_init.data, self.d_ctrl.nbytes)
        self.arena_counters.fill(0)
        self.bufs["hist"].fill(-1)
        cp.cuda.Device().synchronize()

    def start(self, steps: int, live: int | None = None) -> None:
        """Launch (asynchronously, on this rank's stream) once every rank has prepared."""
        e0, e1 = self.events
        with self.stream:
            e0.record()
            self.kernel(
                (self.plan.grid,), (NT,),
                (self.d_tasks, self.d_off, self.d_list, self.d_counters, self.d_status, self.d_dump,
                 np.uint64(0), np.int32(0), np.int32(steps), np.int32(self.B if live is None else live),
                 np.int64(self.spin_limit), self.d_jit),
                shared_mem=self.plan.smem_bytes,
            )
            e1.record()

    def finish(self) -> float:
        """Wait for the launch; raise with the watchdog report on a hang; elapsed ms."""
        e0, e1 = self.events
        e1.synchronize()
        st = self.cp.asnumpy(self.d_status)
        if st[0] != 0 or st[1] != 0:
            raise DeviceError(f"rank {self.rank}: " + self.hang_report(st))
        return self.cp.cuda.get_elapsed_time(e0, e1)

    def launch(self, steps: int, trace_cap: int = 0, live: int | None = None):
        if self.world != 1:
            raise DeviceError("a tensor-parallel rank launches with prepare / barrier / start / finish")
        self.prepare(steps)
        self.start(steps, live)
        return self.finish()


def arena_layout(plan: Plan) -> tuple[dict[str, int], int]:
    """Byte offsets of the symmetric buffers in a rank's arena (the event counters, u64 per op, first; every
    piece 256-byte aligned) and the arena's size: a function of the plan alone, so the same on every rank."""
    off, o = {}, (len(plan.ops) * 8 + 255) // 256 * 256
    for n in sorted(n for n, b in plan.buffers.items() if b.kind == "sym"):
        off[n] = o
        o += (plan.buffers[n].nbytes + 255) // 256 * 256
    return off, o


def _cp_dtype(cp, dtype: str):
    return {"bf16": cp.uint16, "f32": cp.float32, "f64": cp.float64, "i32": cp.int32}[dtype]


def _free_arena(cp, ptr: int, opened: list[int]) -> None:
    try:
        for p in opened:
            cp.cuda.runtime.ipcCloseMemHandle(p)
        cp.cuda.runtime.free(ptr)
    except Exception:  # interpreter shutdown: the driver frees it with the context
        pass
