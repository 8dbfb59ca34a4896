"""The megakernel on a GPU (skipped without one): poisoned buffers, one launch, device outputs vs NumPy
recomputed from the kernel's own inputs; multi-step launches keep advancing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpkir.parser import parse_file

pytestmark = pytest.mark.gpu
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smollm2_135m.mpk"


def _bf16(cp_arr) -> np.ndarray:
    u = cp_arr.get().astype(np.uint32) << 16
    return u.view(np.float32)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_linear_rmsnorm_and_argmax_match_numpy(batch):
    from mpkir.runtime.host import Megakernel

    m, _ = parse_file(str(EXAMPLE))
    mk = Megakernel(m, batch=batch)
    mk.init_random(1)
    rng = np.random.default_rng(batch)
    mk.set_inputs(rng.integers(0, 49152, batch), rng.integers(1, 200, batch))
    mk.poison()
    mk.launch(1)
    x = _bf16(mk.bufs["v:x"])[:batch].astype(np.float64)
    ln = _bf16(mk.bufs["w:model.layers.0.input_layernorm.weight"]).astype(np.float64)
    wq = _bf16(mk.bufs["w:model.layers.0.self_attn.q_proj.weight"]).astype(np.float64)
    xn = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * ln
    xn = xn.astype(np.float32).astype(np.float64)
    ref = xn @ wq.T
    got = _bf16(mk.bufs["v:q.0"])[:batch]
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2
    logits = _bf16(mk.bufs["v:logits"])[:batch]
    assert np.isfinite(logits).all()
    assert (mk.bufs["v:next"].get()[:batch] == logits.argmax(-1)).all()


def test_multi_step_launch_advances():
    from mpkir.runtime.host import Megakernel

    m, _ = parse_file(str(EXAMPLE))
    mk = Megakernel(m, batch=2)
    mk.init_random(0)
    mk.set_inputs([1, 2], [5, 9])
    mk.launch(6)
    toks = mk.tokens()
    assert toks.shape == (6, 2) and (toks >= 0).all()
    assert mk.bufs["in:positions"].get()[:2].tolist() == [10, 14]


@pytest.mark.parametrize("batch", [1, 8])
def test_attention_launched_just_in_time_gives_the_placed_plans_tokens(batch, monkeypatch):
    """The launch modes of the attention tasks (MPKIR_JIT=1: handed out at run time, by scheduler warps that
    open a queue frame when the events fire, or by tickets the workers claim; MPKIR_JIT=0: placed in the
    ahead-of-time lists) run the same bodies on the same inputs: the same 8 greedy tokens as the placed plan
    of as many workers (the scheduler CTA takes one SM), over two launches (the control block is reset
    between them)."""
    import cupy

    from mpkir.runtime.host import Megakernel

    n_sms = cupy.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    m, _ = parse_file(str(EXAMPLE))
    toks = {}
    for jit, queue, fewer in (("1", "sched", 0), ("0", "sched", 1), ("1", "ticket", 0), ("0", "sched", 0)):
        monkeypatch.setenv("MPKIR_JIT", jit)
        monkeypatch.setenv("MPKIR_JIT_QUEUE", queue)
        mk = Megakernel(m, batch=batch, sms=n_sms - fewer)
        assert any(o.jit for o in mk.plan.ops) == (jit == "1")
        assert (mk.plan.sched_warps > 0) == (jit == "1" and queue == "sched")
        assert mk.plan.grid == mk.num_sms
        mk.init_random(2)
        for _ in range(2):
            mk.set_inputs(np.arange(batch) * 101 + 7, np.full(batch, 150))
            mk.launch(8)
            toks.setdefault((jit, queue, fewer), []).append(mk.tokens())
        del mk
    for got in toks.values():
        assert (got[0] >= 0).all() and np.array_equal(got[0], got[1])
    assert np.array_equal(toks[("1", "sched", 0)][0], toks[("0", "sched", 1)][0])  # 131 workers
    assert np.array_equal(toks[("1", "ticket", 0)][0], toks[("0", "sched", 0)][0])  # 132 workers


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 50, 0.9), (1.0, 0, 1.0), (0.6, 0, 0.9)])
def test_sample_task_draws_the_operators_token(temperature, top_k, top_p):
    """A graph that samples: the mk_sample tasks' tokens equal the sample operator's reference on the
    kernel's own (poisoned-first) logits and positions, at step 1 and at the last step of a 4-step launch."""
    from mpkir.ops.sampling import sample_ref
    from mpkir.parser import parse
    from mpkir.runtime.host import Megakernel

    src = EXAMPLE.read_text().replace(
        "%next = argmax(%logits)",
        f"%next = sample(%logits, %positions, temperature={temperature}, top_k={top_k}, top_p={top_p}, "
        "seed=11)")
    m = parse(src, "sampled.mpk")
    batch = 5
    mk = Megakernel(m, batch=batch, greedy=False)
    assert "mk_sample" in mk.plan.variants
    mk.init_random(3)
    rng = np.random.default_rng()
    for steps in (1, 4):
        mk.set_inputs(rng.integers(0, 49152, batch), rng.integers(1, 200, batch))
        mk.poison()
        mk.launch(steps)
        logits = _bf16(mk.bufs["v:logits"])[:batch]
        assert np.isfinite(logits).all()
        pos = mk.bufs["in:positions"].get()[:batch]
        want = sample_ref(logits, pos, temperature, top_k, top_p, 11)
        toks = mk.tokens()
        assert toks.shape == (steps, batch)
        assert toks[-1].tolist() == want.tolist()
        assert (mk.bufs["v:next"].get()[:batch] == want).all()


@pytest.mark.parametrize("name", ["llama3_2_1b", "qwen3_0_6b"])
@pytest.mark.parametrize("batch", [1, 8])
def test_exact_plan_gives_the_float64_references_bits(name, batch):
    """numerics="exact" (float64 sums, rounded only where the IR rounds) with the example's real sizes cut to
    two layers, random weights and KV cache: two teacher-forced steps at position 300 whose bf16 logits are
    mpkir.testing.exact_ref's bit for bit (buffers poisoned first), then 8 greedy steps in one launch equal to
    the reference's."""
    from mpkir.models import config as mconfig
    from mpkir.parser import parse
    from mpkir.runtime.host import Megakernel, bf16_bits
    from mpkir.semantics import build_env
    from mpkir.testing.exact_ref import ExactRef

    path = EXAMPLE.parent / f"{name}.mpk"
    src = path.read_text()
    m = mconfig.apply_config(parse(src, str(path)), {"num_hidden_layers": 2}, source=src, strict=False)
    consts = build_env(m)[0].consts
    mk = Megakernel(m, batch=batch, numerics="exact")
    assert not any("mma" in v for v in mk.plan.variants)
    mk.init_random(batch)
    plan, rng = mk.plan, np.random.default_rng()
    tok0 = tok = rng.integers(0, int(consts["vocab"]), batch)
    seq = np.arange(batch)
    mk.set_inputs(tok, np.full(batch, 300))

    def host_ref():
        keep = ("w:", "s:", "const:", plan.inputs["page_table"])
        return ExactRef(plan, {n: a.get() for n, a in mk.bufs.items() if n.startswith(keep)}, consts)

    ref = host_ref()
    for s in range(2):
        mk.set_inputs(tok, np.full(batch, 300 + s))
        mk.poison()
        mk.launch(1)
        want = ref.step(tok, np.full(batch, 300 + s), seq)
        wbits = bf16_bits(want)
        got = mk.bufs[plan.logits].get()[:batch]
        assert np.array_equal(got, wbits), f"step {s}: {int((got != wbits).sum())} of {got.size} differ"
        tok = want.argmax(-1)
        assert mk.tokens()[0].tolist() == tok.tolist()
    mk.set_inputs(tok0, np.full(batch, 300))  # the cache rows at 300, 301 are rewritten with the same values
    ref = host_ref()
    mk.launch(8)
    want, tok = [], tok0
    for s in range(8):
        tok = ref.step(tok, np.full(batch, 300 + s), seq).argmax(-1)
        want.append(tok.tolist())
    assert mk.tokens().tolist() == want
