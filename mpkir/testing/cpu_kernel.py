"""A lowered GPU plan (``codegen.lower.Plan``) run on the CPU with the megakernel's own task bodies.

The task table is packed exactly as ``runtime.host.Megakernel`` packs it (pointers into NumPy buffers instead
of device buffers), and each step runs every task in op order (ops are topologically ordered, so every
event a task would wait on has fired) through :func:`mpkir.testing.cta.compile_tasks`: one emulated CTA of
real threads per task. What it checks without a GPU: the lowering's pointers, offsets and parameters, the
task bodies' indexing and numerics, and multi-step state (positions, token history, the paged KV cache).
What it does not: the device's memory model, the worker loop and the event protocol (see
``mpkir.testing.plans`` for the protocol).
"""

from __future__ import annotations

import ctypes

import numpy as np

from mpkir.runtime.host import bf16_bits, launch_inputs, poison_buffers, task_table
from mpkir.testing.cta import compile_tasks

_NUMPY = {"bf16": np.uint16, "f32": np.float32, "f64": np.float64, "i32": np.int32}


class CpuMegakernel:
    def __init__(self, plan, nt: int = 512):
        self.plan, self.nt = plan, nt
        self.bufs: dict[str, np.ndarray] = {}
        for name, b in plan.buffers.items():
            a = np.zeros(b.shape, _NUMPY[b.dtype])
            if b.kind == "const":
                a[...] = np.asarray(b.data).reshape(b.shape).astype(a.dtype)
            self.bufs[name] = a
        from mpkir.codegen.emit import so_source

        # found programs' bodies, if any; an exact plan's bodies accumulate in float64 (lower.NUMERICS)
        self.lib = compile_tasks(plan.variants, nt, so_source(plan), exact=plan.numerics == "exact")

    def load_weights(self, weights) -> None:
        """Every weight buffer from ``weights`` (keyed by checkpoint name), as bf16."""
        for name, b in self.plan.buffers.items():
            if b.kind == "weight":
                self.bufs[name][...] = bf16_bits(weights[b.checkpoint]).reshape(b.shape)

    def set_inputs(self, tokens, positions, seq_ids=None, page_table=None) -> int:
        """One run's inputs, as ``Megakernel.set_inputs``; returns the live token count."""
        for name, a in launch_inputs(self.plan, tokens, positions, seq_ids, page_table, len(tokens)).items():
            self.bufs[name][...] = a
        return len(tokens)

    def poison(self) -> None:
        """NaN (bf16/f32) or -1 (i32) in every activation and scratch buffer, as ``Megakernel.poison``."""
        poison_buffers(self.plan, self.bufs)

    def run(self, steps: int, live: int | None = None) -> None:
        """``steps`` decode steps over ``live`` tokens (default: the plan's batch), as one launch would."""
        B = self.plan.batch if live is None else live
        self.bufs["hist"] = np.full((steps, self.plan.max_tokens), -1, np.int32)
        tab = task_table(self.plan, {n: a.ctypes.data for n, a in self.bufs.items()})
        ptr = tab.ctypes.data_as(ctypes.c_void_p)
        for it in range(1, steps + 1):
            self.lib.mk_cpu_run_tasks(ptr, len(tab), it, B, self.plan.smem_bytes)

    def tokens(self) -> np.ndarray:
        """The token history [steps, batch] (as ``Megakernel.tokens``)."""
        return self.bufs["hist"][:, : self.plan.batch].copy()

    def greedy(self, tokens, positions, seq_ids, page_table, steps: int) -> list[list[int]]:
        """The tokens of ``steps`` steps of an argmax plan run once from these inputs (each step embeds the
        previous step's tokens)."""
        self.set_inputs(tokens, positions, seq_ids, page_table)
        self.run(steps)
        return self.tokens().tolist()


class CpuStepBackend:
    """The engine's step function over the GPU plan run on the CPU (what ``runtime.host.StepBackend`` does
    on the device): the logits graph lowered once for the serve block's ``max_tokens``, weights and the paged
    KV cache kept in the plan's buffers between steps, each step's live tokens run, float32 logits back.
    ``post``: a post-pass ``post(plan, module)`` on the lowered plan (e.g. found programs placed)."""

    def __init__(self, module, analysis, weights, nt: int = 128, num_sms: int = 8, post=None):
        from mpkir.codegen.lower import lower
        from mpkir.models.backends import logits_module

        m2, _ = logits_module(module, analysis)
        plan = lower(m2, num_sms=num_sms, greedy=True, batch=None)
        self.mk = CpuMegakernel(plan if post is None else post(plan, m2), nt)
        self.mk.load_weights(weights)
        self.steps = 0

    def step(self, tokens, positions, seq_ids, page_table) -> np.ndarray:
        T = self.mk.set_inputs(tokens, positions, seq_ids, page_table)
        self.mk.run(1, live=T)
        self.steps += 1
        lg = self.mk.bufs[self.mk.plan.logits][:T]
        if lg.dtype == np.uint16:
            return (lg.astype(np.uint32) << 16).view(np.float32)
        return lg.astype(np.float32)
