"""Just-in-time ops launched by scheduler warps: the plan, the control block the kernel reads, the protocol
walked on the CPU under adversarial interleavings, and the generated kernel compiled for sm_90a."""

from __future__ import annotations

import dataclasses
import random
import types
from pathlib import Path

import numpy as np
import pytest

from mpkir.codegen.emit import emit_cuda
from mpkir.codegen.lower import gated_ops, jit_events, jit_queue_mode, lower
from mpkir.parser import parse_file
from mpkir.runtime.host import task_table
from mpkir.runtime.jit_queue import COUNT, FIRST, HDR, NREADY, REC, event_queues, jit_block
from mpkir.testing.nvcc import NVCC, nvcc_sm90a
from mpkir.testing.plans import simulate_plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _plan(name, monkeypatch, queue="sched", num_sms=132, batch=1):
    monkeypatch.setenv("MPKIR_JIT", "1")
    monkeypatch.setenv("MPKIR_JIT_QUEUE", queue)
    m, _ = parse_file(str(EXAMPLES / f"{name}.mpk"))
    return lower(m, greedy=True, batch=batch, num_sms=num_sms)


@pytest.mark.parametrize("name", ["qwen3_0_6b", "llama3_2_1b"])
def test_scheduler_plan_gives_up_one_sm_and_launches_only_gated_ops(name, monkeypatch):
    p = _plan(name, monkeypatch)
    assert (p.num_sms, p.grid) == (131, 132) and 1 <= p.sched_warps <= 4
    gated = gated_ops(p.ops)
    assert all(gated)  # every op of these models waits (through its step) on the previous step's token
    jit = [o for o in p.ops if o.jit]
    assert jit and all(o.kind == "attention" for o in jit)
    for o in jit:
        assert any(lag == 0 for _, lag in o.deps)
    for lst in p.lists:  # a worker that visits JIT slots has a placed task too
        assert not any(x < 0 for x in lst) or any(x >= 0 for x in lst)
    ticket = _plan(name, monkeypatch, "ticket")
    assert (ticket.num_sms, ticket.grid, ticket.sched_warps) == (132, 132, 0)


def test_queue_mode_switch_is_checked(monkeypatch):
    monkeypatch.setenv("MPKIR_JIT_QUEUE", "fifo")
    with pytest.raises(ValueError, match="MPKIR_JIT_QUEUE"):
        jit_queue_mode()
    monkeypatch.delenv("MPKIR_JIT_QUEUE")
    assert jit_queue_mode() == "sched"


def test_control_block_matches_the_plan(monkeypatch):
    p = _plan("qwen3_0_6b", monkeypatch, num_sms=40)
    blk = jit_block(p)
    n_ops, S, L, q0, e0, c0, mode = (int(x) for x in blk[:7])
    assert (n_ops, S, mode) == (len(p.ops), p.sched_warps, 1)
    assert L & (L - 1) == 0 and q0 == HDR + REC * n_ops and q0 % 2 == 0
    queues = event_queues(p)
    assert sorted(queues) == jit_events(p.ops) and set(queues.values()) == set(range(S))
    counts = blk[c0 : c0 + S]
    assert sum(counts) == len(queues) and 4 * max(counts) <= L
    evl = blk[e0 : e0 + n_ops + 1]
    assert c0 == e0 + n_ops + 1 + evl[-1] and blk.size == c0 + S
    for e in range(n_ops):
        consumers = sorted(blk[e0 + n_ops + 1 + evl[e] : e0 + n_ops + 1 + evl[e + 1]])
        assert consumers == [i for i, o in enumerate(p.ops) if o.jit and (e, 0) in o.deps]
    for i, o in enumerate(p.ops):
        rec = blk[HDR + REC * i : HDR + REC * (i + 1)]
        assert (rec[FIRST], rec[COUNT]) == (o.first_task, len(o.tasks))
        if o.jit:
            assert rec[NREADY] == sum(1 for _, lag in o.deps if lag == 0)
    # the task that completes a launching event knows its queue; no other task pushes
    tab = task_table(p, {n: 0 for n in p.buffers})
    for i, o in enumerate(p.ops):
        got = set(tab["a"][o.first_task : o.first_task + len(o.tasks), 15].tolist())
        assert got == ({queues[i] + 1} if i in queues else {0})


@pytest.mark.parametrize("seed", range(6))
def test_protocol_survives_random_interleavings_and_slow_workers(seed, monkeypatch):
    p = _plan("qwen3_0_6b", monkeypatch, num_sms=12)
    rng = random.Random(seed)
    slow = set(rng.sample(range(p.num_sms), 2))
    assert simulate_plan(p, 4, rng, slow) == 4 * p.num_tasks


def test_protocol_model_catches_a_visitor_two_steps_behind(monkeypatch):
    """The rule the lowering keeps (no visitor without a placed task) matters: a worker with JIT slots only,
    kept slow, finds its frame reopened for a later step."""
    p = _plan("qwen3_0_6b", monkeypatch, num_sms=8)
    slots = [-(i + 1) for i, o in enumerate(p.ops) if o.jit]
    bad = dataclasses.replace(p, lists=[*p.lists, slots], num_sms=p.num_sms + 1)
    with pytest.raises(AssertionError, match=r"deadlock|reopened"):
        simulate_plan(bad, 4, random.Random(0), {p.num_sms})


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_scheduler_kernel_compiles(monkeypatch, tmp_path):
    p = _plan("smollm2_135m", monkeypatch)
    src = emit_cuda(p)
    assert f"#define MK_SCHED_WARPS {p.sched_warps}" in src and p.sched_warps > 0
    r = nvcc_sm90a(src, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]


def test_hang_report_names_the_jit_waits(monkeypatch):
    """A worker that timed out waiting for a launch, and a scheduler warp waiting for its queue, are named in
    the host's watchdog report (dump rows of mk_wait_stamp; the scheduler CTA's row follows the workers')."""
    from mpkir.runtime.host import Megakernel

    p = _plan("qwen3_0_6b", monkeypatch, num_sms=8)
    q = next(i for i, o in enumerate(p.ops) if o.jit)
    dump = np.zeros((p.grid, 8), np.int32)
    dump[3] = [-2, q, 5, 5, 3, 4, 1, 1]
    dump[p.num_sms] = [-2, -3, 0, 77, 76, 0, 0, 1]
    mk = Megakernel.__new__(Megakernel)
    mk.plan, mk.d_dump, mk.cp = p, dump, types.SimpleNamespace(asnumpy=np.asarray)
    rep = mk.hang_report(np.array([1, 1, 3, 0]))
    assert f"SM   3: waits for the scheduler to launch {p.ops[q].name} at step 5 (seen 3) TIMEOUT" in rep
    assert "scheduler: scheduler warp 2 waits for entry 77 of its event queue (seen 76)\n" in rep + "\n"
