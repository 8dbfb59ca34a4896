"""Tensor-parallel megakernels: rank plans (CPU: consistent across ranks, collectives wait on the right
producers, compile for sm_90a) and, on ONE GPU, N = 2 ranks sharing the GPU (each on half of the SMs) give
the single-GPU megakernel's greedy tokens: ranks in one process (two streams, co-resident kernels) and ranks
in two processes (CUDA IPC between them, as ``python -m mpkir.models.shard_launch FILE --device gpu``)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from mpkir.codegen.allreduce import BODIES, with_collectives
from mpkir.codegen.emit import emit_cuda
from mpkir.codegen.lower import lower
from mpkir.parser import parse
from mpkir.passes.shard import shard_module
from mpkir.testing.nvcc import NVCC, nvcc_sm90a

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# the examples shrunk to shapes the GPU bodies support (head_dim 64, K multiple of 32, GQA group 2)
GPU_SMALL = {"vocab": 512, "hidden": 256, "layers": 2, "heads": 8, "kv_heads": 4, "head_dim": 64, "ffn": 512,
             "max_seq_len": 64, "page_size": 16, "max_tokens": 4, "max_requests": 4}
PEER_VARIANTS = ("mk_allreduce_bf16", "mk_allreduce_f32", "mk_argmax_merge_peers", "mk_allgather_peer")


def small_source(name: str, n: int) -> str:
    text = (EXAMPLES / name).read_text()

    def sub(m):
        return f"const {m.group(1)} = {GPU_SMALL[m.group(1)]}" if m.group(1) in GPU_SMALL else m.group(0)

    text = re.sub(r"^const (\w+) = [0-9.e+-]+\s*$", sub, text, flags=re.M)
    return re.sub(r"serve \{", f"serve {{\n  gpus = {n}", text, count=1)


def rank_plans(name: str, n: int, num_sms: int = 66):
    full = parse(small_source(name, n))
    return [lower(shard_module(full, r, n), num_sms=num_sms, greedy=True) for r in range(n)]


@pytest.mark.parametrize("name", ["qwen3_0_6b.mpk", "llama3_2_1b.mpk"])
@pytest.mark.parametrize("n", [2, 4])
def test_rank_plans_are_consistent_and_collectives_wait_on_their_producers(name, n):
    plans = rank_plans(name, n)
    p0 = plans[0]
    assert all(p.world == n for p in plans)
    def structure(p):
        return [(o.name, o.kind, o.deps, len(o.tasks), o.jit, [t.variant for t in o.tasks]) for o in p.ops]

    for p in plans[1:]:  # identical ops, hence identical event ids on every rank
        assert structure(p) == structure(p0)
        assert p.variants == p0.variants and p.lists == p0.lists
        assert {k: (b.shape, b.dtype) for k, b in p.buffers.items() if b.kind == "sym"} == \
            {k: (b.shape, b.dtype) for k, b in p0.buffers.items() if b.kind == "sym"}
    kinds = [o.kind for o in p0.ops]
    layers = GPU_SMALL["layers"]
    assert kinds.count("allreduce") == 2 * layers and kinds[-2:] == ["argmax_pairs", "argmax_merge"]
    for p in plans:
        producer = {}
        for i, o in enumerate(p.ops):
            for t in o.tasks:
                for k in (1, 2, 8):
                    b = p.buffers.get(t.p[k][0]) if k in t.p else None
                    if b is not None and b.kind == "sym":
                        producer[t.p[k][0]] = i
        n_peer = 0
        for i, o in enumerate(p.ops):
            assert all(t.a.get(14, 0) == (1 if any(i == producer.get(b) for b in producer) else 0)
                       for t in o.tasks), f"op {o.name}: system-scope signal iff peers wait on it"
            for t in o.tasks:
                if t.variant not in PEER_VARIANTS:
                    continue
                n_peer += 1
                assert not o.jit
                srcs = {t.p[q][0].split(":", 2)[2] for q in range(n) if q in t.p} if t.variant != \
                    "mk_allgather_peer" else {t.p[0][0].split(":", 2)[2]}
                assert len(srcs) == 1
                (src,) = srcs
                assert p.buffers[src].kind == "sym"
                ev = t.a[19]
                assert ev == producer[src] and ev < i and t.a[20] == len(p.ops[ev].tasks)
                assert (ev, 0) in o.deps                            # the local producer too
                if t.variant != "mk_allgather_peer":
                    assert all(t.p[q][0] == f"peer:{q}:{src}" for q in range(n))
                assert t.p[9] == ("mkpeers", 0)
        assert n_peer > 0
    V = GPU_SMALL["vocab"]
    if "allgather" in kinds:  # a sampling model: logits gathered, greedy argmax of all of them on each rank
        assert [p.ops[-2].tasks[0].a[18] for p in plans] == [0] * n and kinds[-3] == "allgather"
        ag = p0.ops[-3]
        assert [t.a[22] for t in ag.tasks] == list(range(n))
        gathered = ag.tasks[0].p[8][0]
        assert p0.buffers[gathered].shape == (GPU_SMALL["max_tokens"], V)       # the whole vocabulary
        assert ag.tasks[0].a[18] == V * 2 and p0.ops[-2].tasks[0].a[16] == V
        assert [t.p[8][1] for t in ag.tasks] == [q * V // n * 2 for q in range(n)]
    else:  # vocabulary-parallel argmax: rank r's pairs carry global indices from r * V / n
        assert [p.ops[-2].tasks[0].a[18] for p in plans] == [r * V // n for r in range(n)]
    assert p0.ops[-1].tasks[0].p[10] == ("hist", 0)                  # the next step's embedding reads it
    out = p0.buffers[p0.ops[-1].tasks[0].p[8][0]]
    assert (out.shape, out.dtype) == ((GPU_SMALL["max_tokens"],), "i32")


@pytest.mark.parametrize("name", ["qwen3_0_6b.mpk", "llama3_2_1b.mpk"])
@pytest.mark.parametrize("n", [2, 4])
def test_rank_plans_run_the_protocol_without_deadlock_or_stale_peer_reads(name, n):
    """All ranks' workers (AOT lists, JIT tickets) in random interleavings, several steps per launch: every
    peer read sees exactly the current step's tile (one slot per symmetric buffer is enough); without the
    peer waits some read comes before the peer wrote it."""
    from mpkir.runtime.multi_sim import StaleRead, check_plans

    plans = rank_plans(name, n, num_sms=6)
    for seed in range(3):
        assert check_plans(plans, steps=3, seed=seed) > 0
    with pytest.raises(StaleRead, match="not yet written"):
        check_plans(plans, steps=3, seed=0, peer_waits=False)


def test_allreduce_tiles_cover_the_row_and_fuse_the_residual_add():
    p = rank_plans("qwen3_0_6b.mpk", 2)[0]
    H = GPU_SMALL["hidden"]
    for o in p.ops:
        if o.kind != "allreduce":
            continue
        offs = sorted(t.p[8][1] // 2 for t in o.tasks)
        cols = o.tasks[0].a[16]
        assert offs == list(range(0, H, cols)) and all(t.a[17] == H for t in o.tasks)
        assert all(10 in t.p and t.p[10][1] == t.p[8][1] for t in o.tasks)   # residual tile, same offset
        assert not any(x.kind == "eltwise" for x in p.ops)


def test_arena_layout_is_the_same_on_every_rank_and_holds_every_symmetric_buffer():
    from mpkir.runtime.host import arena_layout

    plans = rank_plans("llama3_2_1b.mpk", 4)
    layouts = [arena_layout(p) for p in plans]
    assert all(lay == layouts[0] for lay in layouts)
    off, total = layouts[0]
    sym = {n: b for n, b in plans[0].buffers.items() if b.kind == "sym"}
    assert set(off) == set(sym) and len(sym) == 2 * GPU_SMALL["layers"] + 2   # partials, logits, pairs
    spans = sorted((o, o + sym[n].nbytes) for n, o in off.items())
    assert spans[0][0] >= len(plans[0].ops) * 8                                 # after the counters
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)) and spans[-1][1] <= total
    assert all(o % 256 == 0 for o in off.values())


def test_single_gpu_source_has_no_collectives():
    full = parse(small_source("qwen3_0_6b.mpk", 1))
    plan = lower(full, num_sms=132, greedy=True)
    src = emit_cuda(plan)
    assert with_collectives(src, plan) == src
    assert "#define MK_COLLECTIVES" not in src and not any(b in src for b in BODIES)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", ["qwen3_0_6b.mpk", "llama3_2_1b.mpk"])
def test_rank_kernel_compiles_for_sm90a(name, tmp_path):
    plans = rank_plans(name, 2)
    srcs = [with_collectives(emit_cuda(p), p) for p in plans]
    # rank sources differ only in nothing: parameters are data (task table), not code
    assert srcs[0] == srcs[1] and "#define MK_COLLECTIVES 1" in srcs[0]
    r = nvcc_sm90a(srcs[0], tmp_path, output="rank.ptx", ptx=True)
    assert r.returncode == 0, r.stderr[-4000:]
    ptx = (tmp_path / "rank.ptx").read_text()
    assert "red.release.sys" in ptx and "ld.acquire.sys" in ptx and "multimem" not in ptx


# ------------------------------------------------------------------------------------------------ GPU
def _reference(text: str, steps: int, seed: int):
    """The single-GPU megakernel (all SMs) on the full weights: tokens [steps, B] and its plan/buffers."""
    from mpkir.interpreter import random_weights
    from mpkir.models.shard_gpu import first_tokens
    from mpkir.runtime.host import Megakernel, upload_weights
    from mpkir.verify import analyze

    full = parse(text)
    mk = Megakernel(full, greedy=True)
    upload_weights(mk, random_weights(full, analyze(full), seed=seed))
    tok = first_tokens(full, mk.B, seed)
    mk.set_inputs(tok, np.zeros(len(tok), np.int32))
    mk.ref_ms = mk.launch(steps)
    return mk.tokens(), mk


@pytest.mark.gpu
def test_two_ranks_in_one_process_share_the_gpu():
    _in_process("qwen3_0_6b.mpk")


def _in_process(name: str):
    from mpkir.models.shard_gpu import run_in_process

    steps, seed = 8, 3
    text = small_source(name, 2)
    want, ref = _reference(text, steps, seed)
    got, ms, mks = run_in_process(text, 2, steps, seed)
    print(f"{name}: TP=2 on one GPU ({mks[0].plan.num_sms} workers each, occupancy {mks[0].occupancy}) "
          f"{ms} ms for {steps} steps (single GPU, 132 workers: {ref.ref_ms:.3f} ms, first launch); tokens "
          f"{got.tolist()}; single GPU {want.tolist()}")
    assert (got >= 0).all()
    np.testing.assert_array_equal(got, want)
    from mpkir.models.shard_gpu import first_tokens, launch_all

    again, _ = launch_all(mks, first_tokens(parse(text), ref.B, seed), steps)   # counters re-zeroed
    np.testing.assert_array_equal(again, want)
    # the last step's vocabulary slices agree with the single-GPU logits (same inputs: same tokens)
    lref = ref.cp.asnumpy(ref.bufs[ref.plan.logits]).astype(np.uint32) << 16
    V2 = GPU_SMALL["vocab"] // 2
    B = ref.B
    for r, mk in enumerate(mks):
        lr = mk.cp.asnumpy(mk.bufs[mk.plan.logits]).astype(np.uint32) << 16
        a = lr.view(np.float32)[:B].astype(np.float64)
        cols = slice(None) if a.shape[1] == 2 * V2 else slice(r * V2, (r + 1) * V2)  # gathered or a slice
        b = lref.view(np.float32)[:B, cols].astype(np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


@pytest.mark.gpu
def test_two_rank_processes_share_the_gpu_through_cuda_ipc():
    from mpkir.models.shard_gpu import launch_gpu

    steps, seed = 8, 5
    text = small_source("qwen3_0_6b.mpk", 2)
    want, _ = _reference(text, steps, seed)
    res = launch_gpu(text, 2, steps, seed, timeout_s=120.0)
    print(f"TP=2, two processes on one GPU: {[(r[1], r[3]) for r in res]} (ms, workers); tokens {res[0][0]}")
    for r in res:
        np.testing.assert_array_equal(np.asarray(r[0]), want)


@pytest.mark.gpu
def test_two_ranks_in_one_process_gathered_logits():
    """Llama (a sampling graph): the logits are allgathered, every rank takes the greedy argmax of all."""
    _in_process("llama3_2_1b.mpk")
