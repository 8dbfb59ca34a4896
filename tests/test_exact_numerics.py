"""Exact numerics (``lower(numerics="exact")``): the megakernel's task bodies accumulate in float64 and round
only where the IR rounds, so their bf16 results are a float64 reference's bit for bit. Checked without a GPU:
the plan's shape, nvcc compiling the exact kernels for sm_90a, and the exact plan of tiny random Llama / Qwen3
checkpoints run on the CPU with the kernel's own bodies (mpkir.testing.cpu_kernel) against
mpkir.testing.exact_ref, over a random KV-cache prefix that spans pages and attention splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpkir.codegen.emit import emit_cuda
from mpkir.codegen.lower import lower
from mpkir.models.loader import load_model
from mpkir.parser import parse
from mpkir.runtime.host import bf16_bits
from mpkir.semantics import build_env
from mpkir.testing.cta import compiler
from mpkir.testing.exact_ref import ExactRef
from mpkir.testing.nvcc import NVCC, nvcc_sm90a
from mpkir.testing.tiny_models import write_tiny_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SERVE = {"max_requests": 4, "max_tokens": 8, "max_seq_len": 128, "page_size": 16}
TABLE = np.random.default_rng(7).permutation(4 * 8).astype(np.int32).reshape(4, 8)  # pages out of order


def _example(name):
    return parse((EXAMPLES / f"{name}.mpk").read_text(), f"{name}.mpk")


def test_an_exact_plan_keeps_every_linear_on_cuda_cores_and_its_partials_in_float64():
    m = _example("llama3_2_1b")
    fast, exact = (lower(m, greedy=True, batch=8, numerics=n) for n in ("fast", "exact"))
    assert any(v.startswith("mk_linear_mma") for v in fast.variants)
    assert exact.numerics == "exact" and not any("mma" in v or "bulk" in v for v in exact.variants)
    parts = [b for n, b in exact.buffers.items() if n.startswith("attnpart:")]
    assert parts and {b.dtype for b in parts} == {"f64"}
    assert {b.dtype for n, b in fast.buffers.items() if n.startswith("attnpart:")} == {"f32"}
    assert "#define MK_EXACT 1" in emit_cuda(exact) and "MK_EXACT 1" not in emit_cuda(fast)


def test_unknown_numerics_and_found_programs_in_an_exact_plan_are_refused():
    with pytest.raises(ValueError, match="numerics='fp8'"):
        lower(_example("qwen3_0_6b"), batch=1, numerics="fp8")
    from mpkir.codegen.superopt_tasks import lower_superopt

    with pytest.raises(ValueError, match="fast numerics only"):
        lower_superopt(_example("qwen3_0_6b"), batch=1, numerics="exact")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("name,batch", [("llama3_2_1b", 1), ("qwen3_0_6b", 8)])
def test_exact_kernels_compile_for_sm90a(name, batch, tmp_path):
    src = emit_cuda(lower(_example(name), greedy=True, batch=batch, numerics="exact"))
    r = nvcc_sm90a(src, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    ck = write_tiny_checkpoint(tmp_path_factory.mktemp("exact_" + request.param), request.param, seed=11)
    return ck, load_model(ck["dir"], serve=SERVE)


def _random_caches(cpu, plan, rng) -> dict:
    """Random bf16 k/v in every page (an already-decoded context); returns a copy of them."""
    for name, b in plan.buffers.items():
        if name.startswith(("s:k_cache", "s:v_cache")):
            cpu.bufs[name][...] = bf16_bits(rng.standard_normal(b.shape))
    return {n: a.copy() for n, a in cpu.bufs.items() if n.startswith(("s:k_cache", "s:v_cache"))}


@pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
@pytest.mark.parametrize("batch", [1, 3])
def test_exact_plan_matches_the_float64_reference_bit_for_bit(tiny, batch):
    """Teacher forced for 3 steps at positions 37.. (three pages, attention split over several tasks), then
    6 free-running steps in one run: every bf16 logit equal to the reference's, and the greedy tokens."""
    from mpkir.testing.cpu_kernel import CpuMegakernel

    _, m = tiny
    rng = np.random.default_rng()
    plan = lower(m.module, num_sms=16, greedy=True, batch=batch, numerics="exact")
    assert any(v.startswith("mk_attention_merge") for v in plan.variants)  # split-KV partials in float64
    cpu = CpuMegakernel(plan, nt=64)
    cpu.load_weights(m.weights)
    caches = _random_caches(cpu, plan, rng)
    consts = build_env(m.module)[0].consts
    V = int(consts["vocab"])
    seq = np.arange(batch, dtype=np.int32)
    tok0 = tok = rng.integers(0, V, batch)
    cpu.set_inputs(tok, np.full(batch, 37), seq, TABLE)
    ref = ExactRef(plan, cpu.bufs, consts)
    for s in range(3):
        pos = np.full(batch, 37 + s)
        cpu.set_inputs(tok, pos, seq, TABLE)
        cpu.poison()
        cpu.run(1)
        want = ref.step(tok, pos, seq)
        got = cpu.bufs[plan.logits][:batch]
        wb = bf16_bits(want)
        assert np.array_equal(got, wb), f"step {s}: {int((got != wb).sum())} logits differ"
        assert cpu.tokens()[0].tolist() == want.argmax(-1).tolist()
        tok = want.argmax(-1)
    # free running from the same start: the kernel feeds its own tokens back
    for name, a in caches.items():
        cpu.bufs[name][...] = a
    ref = ExactRef(plan, cpu.bufs, consts)
    tok = tok0
    cpu.set_inputs(tok, np.full(batch, 37), seq, TABLE)
    cpu.run(6)
    want = []
    for s in range(6):
        tok = ref.step(tok, np.full(batch, 37 + s), seq).argmax(-1)
        want.append(tok.tolist())
    assert cpu.tokens().tolist() == want


def test_exact_numerics_on_the_cpu_path_are_refused(tiny):
    from mpkir.diagnostics import MpkError
    from mpkir.models.backends import make_backend

    with pytest.raises(MpkError, match="GPU kernel setting"):
        make_backend(tiny[1], "cpu", numerics="exact")
