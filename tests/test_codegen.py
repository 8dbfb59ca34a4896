"""CUDA codegen (no GPU needed): lowering invariants, and every example's kernel compiles with nvcc for
sm_90a (``nvcc -gencode arch=compute_90a,code=sm_90a -c``)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from mpkir.codegen.emit import emit_cuda
from mpkir.codegen.lower import lower
from mpkir.diagnostics import MpkError
from mpkir.parser import parse, parse_file
from mpkir.testing.nvcc import NVCC, nvcc_sm90a

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = ["smollm2_135m", "qwen3_0_6b", "llama3_2_1b", "qwen3_1_7b", "qwen3_8b"]


def _plan(name: str, batch=None):
    m, _ = parse_file(str(EXAMPLES / f"{name}.mpk"))
    return lower(m, greedy=True, batch=batch)


@pytest.mark.parametrize("name", ["smollm2_135m", "qwen3_0_6b", "llama3_2_1b"])
@pytest.mark.parametrize("batch", [1, 3])
def test_plan_invariants(name, batch):
    p = _plan(name, batch)
    assert p.batch == batch
    seen = set()
    for lst in p.lists:  # every AOT task exactly once; JIT slots name ops
        for t in lst:
            if t >= 0:
                assert t not in seen
                seen.add(t)
    jit_tasks = sum(len(o.tasks) for o in p.ops if o.jit)
    assert len(seen) + jit_tasks == p.num_tasks
    op_of = {}
    for i, o in enumerate(p.ops):
        for j in range(len(o.tasks)):
            op_of[o.first_task + j] = i
        for d, lag in o.deps:  # same-step waits only on earlier ops (topological: no deadlock)
            assert lag == 1 or d < i
    for lst in p.lists:  # each SM's list is in op order
        ops = [op_of[t] if t >= 0 else -t - 1 for t in lst]
        assert ops == sorted(ops)
    emb = next(o for o in p.ops if o.kind == "embedding")
    assert any(lag == 1 for _, lag in emb.deps)  # next step's embedding waits for this step's token
    # per-token tasks exist only for live tokens
    assert all(t.a[17] < batch for t in emb.tasks)
    assert p.smem_bytes <= 227 * 1024


def test_kernel_source_independent_of_batch_within_a_kernel_family():
    assert emit_cuda(_plan("qwen3_0_6b", 3)) == emit_cuda(_plan("qwen3_0_6b", 8))


def test_unsupported_is_a_diagnostic():
    m, _ = parse_file(str(EXAMPLES / "rmsnorm_linear.mpk"))
    with pytest.raises(MpkError):
        lower(m, greedy=True)


def _nvcc(src: str, tmp_path: Path) -> None:
    r = nvcc_sm90a(src, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", MODELS)
def test_example_kernel_compiles(name, tmp_path):
    # batch 8 uses the tensor-core GEMV; batch 1 the CUDA-core one (compiled for two models: same bodies)
    for batch in (1, 8) if name in ("smollm2_135m", "llama3_2_1b") else (8,):
        _nvcc(emit_cuda(_plan(name, batch)), tmp_path)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_small_example_kernel_compiles(tmp_path):
    _nvcc(emit_cuda(_plan("mlp")), tmp_path)


def _text(name: str) -> str:
    return (EXAMPLES / f"{name}.mpk").read_text()


def test_logits_graph_and_kv_append_in_rope_task():
    """The engine's variant (the graph returns the logits) lowers; k/v reach the caches in the k rope task,
    before any attention of the step reads them (prefill chunks: tokens of one request see each other)."""
    from mpkir.models.backends import logits_module
    from mpkir.verify import analyze

    m, _ = parse_file(str(EXAMPLES / "qwen3_0_6b.mpk"))
    m2, changed = logits_module(m, analyze(m))
    assert changed
    p = lower(m2, greedy=True, batch=4)
    assert p.logits == "v:logits" and p.buffers["v:logits"].dtype == "bf16"
    assert p.ops[-1].kind == "linear" and not any(o.kind == "argmax" for o in p.ops)
    att = [i for i, o in enumerate(p.ops) if o.kind == "attention"]
    assert len(att) == 28 and not any(o.kind == "kv_append" for o in p.ops)
    for i in att:
        assert all(t.a[24] == 0 for t in p.ops[i].tasks)  # the attention itself appends nothing
        deps = [p.ops[d] for d, _ in p.ops[i].deps]
        appenders = [o for o in deps if o.kind == "norm_rope" and o.tasks[0].a[20] & 4]
        assert len(appenders) == 1


def test_f32_logits_when_the_module_casts():
    src = _text("llama3_2_1b").replace(
        "%logits = linear(%hf, @lm_head)", "%hf32 = cast(%hf, dtype=f32)\n  %logits = linear(%hf32, @lm_head)"
    )
    p = lower(parse(src, "x.mpk"), greedy=True, batch=2)
    assert p.buffers[p.logits].dtype == "f32"
    lm = next(o for o in p.ops if o.name == "logits")
    assert all(t.a[25] == 1 and t.a[20] == 1 for t in lm.tasks)  # f32 output, final rmsnorm still fused
    assert lm.tasks[1].p[2][1] == lm.tasks[0].a[17] * 4  # output pointers step by float32 columns


def _rope_variant(extra: str) -> str:
    old = "%q_rot = rope(%q_heads, %positions, theta=rope_theta, style=neox)"
    src = _text("llama3_2_1b")
    assert old in src
    return src.replace(old, old[:-1] + ", " + extra + ")")


def test_unknown_rope_scaling_is_refused_with_a_location():
    for extra in ("scaling=yarn, factor=4.0", "mscale=2.0"):
        with pytest.raises(MpkError, match=r"rope attribute") as e:
            lower(parse(_rope_variant(extra), "x.mpk"), greedy=True, batch=1)
        assert e.value.diagnostics[0].span is not None


def test_llama3_rope_scaling_becomes_the_interpreters_frequency_table():
    import numpy as np

    from mpkir.ops import attention
    extra = "scaling=llama3, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, "
    extra += "original_max_position=8192"
    p = lower(parse(_rope_variant(extra), "x.mpk"), greedy=True, batch=1)
    tables = {n: b for n, b in p.buffers.items() if b.kind == "const"}
    assert len(tables) == 2  # the scaled q rope of layer 0.., and the plain k rope
    want = attention.rope_inv_freq(64, 500000.0, scaling="llama3", factor=32.0).astype(np.float32)
    plain = attention.rope_inv_freq(64, 500000.0).astype(np.float32)
    got = sorted((b.data for b in tables.values()), key=lambda a: float(a[-1]))
    assert np.array_equal(got[0], want) and np.array_equal(got[1], plain)
    assert not np.array_equal(want, plain)
    q0 = next(o for o in p.ops if o.name == "q_rot.0")
    assert p.buffers[q0.tasks[0].p[9][0]].data is not None


@pytest.mark.parametrize("name", ["smollm2_135m", "qwen3_0_6b", "llama3_2_1b"])
def test_resident_kernel_final_op_follows_every_op(name):
    """The resident serving kernel (``mk_megakernel_serve``) publishes a step once its final op is done: that
    op must be the plan's one sink, with every other op an ancestor over same-step edges (so no task of the
    step still reads the inputs the next step overwrites); its bodies see every step as a first step (tokens
    and positions fresh from the host), and the kernel is in every emitted program."""
    from mpkir.models.backends import logits_module
    from mpkir.runtime.host import _final_op
    from mpkir.verify import analyze

    m, _ = parse_file(str(EXAMPLES / f"{name}.mpk"))
    m2, _ = logits_module(m, analyze(m))
    p = lower(m2, greedy=True, batch=3)
    f = _final_op(p)
    assert p.ops[f].kind == "linear" and p.ops[f].tasks
    anc, todo = set(), [f]
    while todo:
        for d, lag in p.ops[todo.pop()].deps:
            if lag == 0 and d not in anc:
                anc.add(d)
                todo.append(d)
    assert anc == set(range(len(p.ops))) - {f}
    src = emit_cuda(p)
    assert "mk_megakernel_serve(" in src and "mk_dispatch(s_task, body_it, B, smem)" in src
    broken = dataclasses.replace(p, ops=[*p.ops, dataclasses.replace(p.ops[0], deps=[])])
    with pytest.raises(RuntimeError, match="final ops"):
        _final_op(broken)


def test_step_inputs_fill_the_io_block_and_pad_the_rest():
    """The GPU backends' per-step io block (pinned, one upload): live rows, padding rows (seq id -1, zeros),
    the page table cut to the block's shape; a step outside 1..max_tokens is refused."""
    from mpkir.runtime.host import fill_step_inputs

    rng = np.random.default_rng()
    T_max, R, P = 4, 3, 5
    sizes = [T_max, T_max, T_max, T_max, R * P]
    block = rng.integers(1, 99, sum(sizes)).astype(np.int32)  # stale values from an earlier step
    views, o = [], 0
    for sz in sizes:
        views.append(block[o:o + sz])
        o += sz
    views[4] = views[4].reshape(R, P)
    tokens, positions, seq_ids = [7, 8], [30, 2], [2, 0]
    table = rng.integers(0, 50, (R + 1, P + 2))   # larger than the block's table: cut
    assert fill_step_inputs(block, views, T_max, tokens, positions, seq_ids, table) == 2
    tok, pos0, pos, sid, pt = views
    assert tok.tolist() == [7, 8, 0, 0] and pos0.tolist() == pos.tolist() == [30, 2, 0, 0]
    assert sid.tolist() == [2, 0, -1, -1]
    assert np.array_equal(pt, table[:R, :P])
    for bad in ([], [1] * (T_max + 1)):
        with pytest.raises(ValueError, match=r"outside 1\.\.4"):
            fill_step_inputs(block, views, T_max, bad, bad, bad, table)


def test_a_sampling_graph_lowers_to_sample_tasks_that_nvcc_compiles(tmp_path):
    """Llama-3.2-1B's graph samples (temperature 0.6, top-p 0.9): one mk_sample task per token row ends the
    step, after the logits and the positions, with the attributes as float64 / u64 task parameters."""
    import struct

    from mpkir.codegen.lower import SAMPLE_SMEM
    from mpkir.testing.plans import simulate_plan, unordered_reads

    m = parse((EXAMPLES / "llama3_2_1b.mpk").read_text(), "llama3_2_1b.mpk")
    p = lower(m, greedy=False, batch=3)
    final = p.ops[-1]
    assert final.kind == "sample" and [t.variant for t in final.tasks] == ["mk_sample"] * 3
    t = final.tasks[2]

    def f64(lo, hi):
        return struct.unpack("<d", struct.pack("<ii", lo, hi))[0]

    assert t.a[17] == 2 and t.a[16] == 128256 and t.a[23] == 0
    assert f64(t.a[21], t.a[22]) == 0.6 and f64(t.a[24], t.a[25]) == 0.9 and (t.a[26], t.a[27]) == (0, 0)
    kinds = {p.ops[d].kind for d, lag in final.deps if lag == 0}
    assert {"linear", "embedding"} <= kinds
    assert p.smem_bytes >= SAMPLE_SMEM
    # the sample tasks read the logits and positions of their own step, and the protocol runs every task
    # once per step without a deadlock (the next step's embedding waits for the sampled tokens)
    assert unordered_reads(p) == []
    consumed = {d for o in p.ops for d, lag in o.deps if lag == 0}
    assert [i for i in range(len(p.ops)) if i not in consumed] == [len(p.ops) - 1]
    emb = next(o for o in p.ops if o.kind == "embedding")
    assert (len(p.ops) - 1, 1) in emb.deps
    assert simulate_plan(p, steps=3) == 3 * p.num_tasks
    # greedy lowering of the same graph still ends in the two-stage argmax
    assert lower(m, greedy=True, batch=3).ops[-1].kind == "argmax"
    if NVCC is not None:
        r = nvcc_sm90a(emit_cuda(p), tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]


def test_sampling_under_tensor_parallelism_is_refused_by_location():
    from mpkir.passes.shard import shard_module

    text = (EXAMPLES / "llama3_2_1b.mpk").read_text().replace("serve {", "serve {\n  gpus = 2", 1)
    rank = shard_module(parse(text, "llama3_2_1b.mpk"), 0)
    with pytest.raises(MpkError, match="temperature > 0 is not implemented with tensor parallelism"):
        lower(rank, greedy=False, batch=1, world=2)


def test_sampling_rows_pack_as_the_serving_kernel_reads_them():
    """8 int32 words a row (mk_kernel.cuh, output 2): temperature f64 lo/hi, top_k, top_p f64 lo/hi, seed u64
    lo/hi, the draw's position; rows not given are greedy (temperature 0)."""
    from mpkir.runtime.host import pack_sampling_rows

    rows = [(0.7, 40, 0.95, -3, 17), (0.0, 0, 1.0, 2**64 - 1, 5)]
    w = pack_sampling_rows(rows, 4)
    assert w.shape == (4, 8) and w.dtype == np.int32
    for (temperature, top_k, top_p, seed, pos), r in zip(rows, w, strict=False):
        assert r[0:2].view(np.float64)[0] == temperature and r[3:5].view(np.float64)[0] == top_p
        assert r[2] == top_k and r[7] == pos
        assert int(r[5:7].view(np.uint64)[0]) == seed % 2**64
    assert not w[2:].any()
    with pytest.raises(ValueError, match="at most 1"):
        pack_sampling_rows(rows, 1)


@pytest.mark.parametrize("kb", [0, 64])
def test_next_task_prefetch_points_at_the_next_tile_on_the_same_sm(kb):
    """MPKIR_PREFETCH_NEXT_KB: each task's L2 prefetch range is the start of the weight tile of the next
    ahead-of-time task in its SM's list (JIT slots skipped), at most ``kb`` KiB; off, no task prefetches."""
    from mpkir.runtime.host import task_table

    plan = _plan("llama3_2_1b", 1)
    tasks = [t for o in plan.ops for t in o.tasks]
    ptr = {n: (i + 1) << 32 for i, n in enumerate(plan.buffers)}
    tab = task_table(plan, ptr, prefetch_next_kb=kb)
    checked = 0
    for lst in plan.lists:
        aot = [x for x in lst if x >= 0]
        for a, b in itertools.pairwise(aot):
            got = (int(tab[a]["p"][11]), int(tab[a]["a"][12]))
            if kb == 0 or not tasks[b].prefetch:
                assert got == (0, 0)
                continue
            bn, off, nb = tasks[b].prefetch
            assert got == (ptr[bn] + off, min(nb, kb * 1024) & ~15)
            checked += 1
    assert checked > (plan.num_tasks // 2 if kb else -1)


def test_prefetch_settings_default_and_switches(monkeypatch):
    """By default each task prefetches the start of its SM's next tile; MPKIR_PREFETCH=1 (own tile) replaces
    it, MPKIR_PREFETCH_NEXT_KB sizes it (0: off)."""
    from mpkir.runtime.host import PREFETCH_NEXT_KB, prefetch_settings

    monkeypatch.delenv("MPKIR_PREFETCH", raising=False)
    monkeypatch.delenv("MPKIR_PREFETCH_NEXT_KB", raising=False)
    assert prefetch_settings() == (False, PREFETCH_NEXT_KB) and PREFETCH_NEXT_KB > 0
    monkeypatch.setenv("MPKIR_PREFETCH_NEXT_KB", "0")
    assert prefetch_settings() == (False, 0)
    monkeypatch.setenv("MPKIR_PREFETCH", "1")
    assert prefetch_settings() == (True, 0)
    monkeypatch.delenv("MPKIR_PREFETCH")
    monkeypatch.setenv("MPKIR_PREFETCH_NEXT_KB", "32k")
    with pytest.raises(ValueError, match="MPKIR_PREFETCH_NEXT_KB='32k': expected an integer"):
        prefetch_settings()


def test_integer_switches_name_themselves_when_malformed(monkeypatch):
    monkeypatch.setenv("MPKIR_TILE_KB", "big")
    with pytest.raises(ValueError, match="MPKIR_TILE_KB='big'"):
        _plan("smollm2_135m")
    monkeypatch.setenv("MPKIR_TILE_KB", "256")
    assert _plan("smollm2_135m").num_tasks > 0


@pytest.mark.parametrize("name", ["qwen3_8b", "llama3_2_1b", "qwen3_0_6b"])
@pytest.mark.parametrize("workers", [131, 132, 97])
def test_sibling_linears_fill_whole_waves(name, workers):
    """q/k/v (and gate/up) are tiled together: their tile counts, each rounded up, still fit the fewest waves
    of workers the tile size allows (Qwen3-8B on 131 workers used to get 88 + 22 + 22 = 132 q/k/v tasks:
    one worker ran two)."""
    from mpkir.codegen.lower import LINEAR_TILE_BYTES

    m, _ = parse_file(str(EXAMPLES / f"{name}.mpk"))
    p = lower(m, greedy=True, batch=1, num_sms=workers)
    layer0 = {o.name.split(".")[0]: o for o in p.ops if o.kind == "linear" and o.name.endswith(".0")}
    for group in (("q", "k", "v"), ("gate", "up")):
        ops = [layer0[g] for g in group]
        rows = [o.tasks[0].a[18] for o in ops]  # each linear's N
        K = p.buffers[ops[0].tasks[0].p[1][0]].shape[1]
        waves = 1
        while -(-sum(rows) // (workers * waves)) * K * 2 > LINEAR_TILE_BYTES:
            waves += 1
        assert sum(len(o.tasks) for o in ops) <= workers * waves, (group, [len(o.tasks) for o in ops])
