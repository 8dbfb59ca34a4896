"""The GPU plan of tiny random Llama / Qwen3 checkpoints run on the CPU with the megakernel's own task bodies
(mpkir.testing.cpu_kernel: the CUDA text compiled as C++, one emulated CTA per task, warps and tensor-core
mma emulated): the lowering's pointers and parameters and the bodies' numerics, checked against the
reference interpreter without a GPU. The mixed step runs CTAs of 512 threads, as on the device; the
multi-step runs use 128 (the bodies are written for any MK_NT; 512 threads cost seconds per step here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpkir.codegen.lower import lower
from mpkir.models.backends import InterpreterBackend, logits_module
from mpkir.models.loader import load_model
from mpkir.testing.cta import compiler
from mpkir.testing.tiny_models import write_tiny_checkpoint

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
SERVE = {"max_requests": 4, "max_tokens": 8, "max_seq_len": 128, "page_size": 16}
TABLE = np.arange(4 * 8, dtype=np.int32).reshape(4, 8)


FEW_THREADS = 128


def _tiny(kind, tmp_path_factory):
    ck = write_tiny_checkpoint(tmp_path_factory.mktemp("cpu_mk_" + kind), kind, seed=5)
    return ck, load_model(ck["dir"], serve=SERVE)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    return _tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny("llama", tmp_path_factory)


def _f(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a.astype(np.float32)


@pytest.mark.parametrize("pipe", ["0", "3"])
def test_a_mixed_step_gives_the_interpreters_logits(tiny, pipe, monkeypatch):
    """Prefill of 5 tokens of request 0 and the first token of request 1, two padding rows, buffers poisoned:
    the tensor-core linears (plain and with the pipelined weight stream), head norm + rope, the k/v append to
    the paged cache and paged attention."""
    from mpkir.testing.cpu_kernel import CpuMegakernel

    monkeypatch.setenv("MPKIR_MMA_PIPE", pipe)
    ck, m = tiny
    m2, _ = logits_module(m.module, m.analysis)
    plan = lower(m2, num_sms=8, greedy=True, batch=None)
    assert any(v.startswith("mk_linear_mma") and v.endswith(f",{pipe}>") for v in plan.variants)
    cpu = CpuMegakernel(plan)
    cpu.load_weights(m.weights)
    toks = [*ck["prompts"][0][:5], ck["prompts"][1][0]]
    pos, sid = [0, 1, 2, 3, 4, 0], [0, 0, 0, 0, 0, 1]
    T = cpu.set_inputs(toks, pos, sid, TABLE)
    cpu.poison()
    cpu.run(1, live=T)
    got = _f(cpu.bufs[plan.logits][:T]).astype(np.float64)
    ref = np.asarray(InterpreterBackend(m.module, m.analysis, m.weights).step(
        np.array(toks, np.int32), np.array(pos, np.int32), np.array(sid, np.int32), TABLE), np.float64)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def _greedy_tokens(m, tok, pos, steps):
    """The interpreter's greedy tokens for two requests, one step at a time."""
    ref = InterpreterBackend(m.module, m.analysis, m.weights)
    want = []
    for _ in range(steps):
        lg = ref.step(np.array(tok, np.int32), np.array(pos, np.int32), np.arange(len(tok), dtype=np.int32),
                      TABLE)
        tok = [int(x) for x in np.argmax(lg, -1)]
        pos = [p + 1 for p in pos]
        want.append(tok)
    return want


def test_greedy_steps_in_one_run_give_the_interpreters_tokens(tiny):
    """The argmax graph at batch 3 (tensor-core linears, the argmax split over the lm_head tiles and merged):
    4 steps in one run, each step's embedding reading the previous step's tokens, positions advancing."""
    from mpkir.testing.cpu_kernel import CpuMegakernel

    ck, m = tiny
    plan = lower(m.module, num_sms=8, greedy=True, batch=3)
    assert plan.ops[-1].kind == "argmax" and any(v.startswith("mk_linear_mma") for v in plan.variants)
    cpu = CpuMegakernel(plan, nt=FEW_THREADS)
    cpu.load_weights(m.weights)
    tok, pos = [ck["prompts"][0][0], ck["prompts"][2][0], ck["prompts"][3][1]], [0, 0, 0]
    cpu.set_inputs(tok, pos, [0, 1, 2], TABLE)
    cpu.run(4)
    assert cpu.tokens().tolist() == _greedy_tokens(m, tok, pos, 4)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama whose linears have K = 256 and 512: the bulk-copied GEMV applies to every one of them."""
    ck = write_tiny_checkpoint(tmp_path_factory.mktemp("cpu_mk_wide"), "llama", seed=6, hidden=256,
                               intermediate=512)
    return ck, load_model(ck["dir"], serve=SERVE)


@pytest.mark.parametrize("gemv", ["regs", "bulk"])
def test_cuda_core_linears_of_a_small_batch(tiny_llama, wide_llama, gemv, monkeypatch):
    """Batch 2 takes a CUDA-core GEMV (slow to emulate: one step): mk_linear<U> (weights streamed through
    registers), or mk_linear_bulk (a ring of 2 bulk-copied stages of 2 rows each, wrapped many times: the
    rmsnorm and silu prologues, the residual and argmax epilogues), q/k/v and gate/up tiled together."""
    from mpkir.testing.cpu_kernel import CpuMegakernel

    monkeypatch.setenv("MPKIR_GEMV", gemv)
    monkeypatch.setenv("MPKIR_BULK_STAGE_KB", "1")
    monkeypatch.setenv("MPKIR_BULK_KB", "2")
    ck, m = tiny_llama if gemv == "regs" else wide_llama
    plan = lower(m.module, num_sms=8, greedy=True, batch=2)
    linears = [t.variant for o in plan.ops if o.kind == "linear" for t in o.tasks]
    assert all(v.startswith("mk_linear<" if gemv == "regs" else "mk_linear_bulk<2>") for v in linears)
    if gemv == "bulk":
        q, k, v = (o for o in plan.ops if o.kind == "linear" and o.name in ("q.0", "k.0", "v.0"))
        assert len(q.tasks) + len(k.tasks) + len(v.tasks) == 8
        assert {t.a[17] for o in (q, k, v) for t in o.tasks} == {64}
    cpu = CpuMegakernel(plan, nt=64)
    cpu.load_weights(m.weights)
    tok, pos = [ck["prompts"][1][0], ck["prompts"][2][0]], [0, 0]
    cpu.set_inputs(tok, pos, [0, 1], TABLE)
    cpu.run(1)
    assert cpu.tokens().tolist() == _greedy_tokens(m, tok, pos, 1)


def test_sampling_steps_in_one_run_draw_the_operators_tokens(tiny_llama):
    """The graph's own sample op (the Llama file: temperature 0.6, top-p 0.9) as mk_sample tasks over 3 steps:
    the tokens the interpreter's sample op draws from its logits at the same positions."""
    from mpkir.interpreter import init_state, run_graph
    from mpkir.testing.cpu_kernel import CpuMegakernel

    ck, m = tiny_llama
    plan = lower(m.module, num_sms=8, greedy=False, batch=3)
    assert plan.ops[-1].kind == "sample"
    cpu = CpuMegakernel(plan, nt=FEW_THREADS)
    cpu.load_weights(m.weights)
    tok, pos, sid = [ck["prompts"][1][0], ck["prompts"][3][0], ck["prompts"][0][2]], [0, 0, 0], [0, 1, 2]
    cpu.set_inputs(tok, pos, sid, TABLE)
    cpu.run(3)
    state = init_state(m.module, m.analysis)
    want = []
    for _ in range(3):
        (out,) = run_graph(m.module, {"tokens": np.array(tok, np.int32), "positions": np.array(pos, np.int32),
                                      "seq_ids": np.array(sid, np.int32), "page_table": TABLE[:, :]},
                           m.weights, state, analysis=m.analysis)
        tok = [int(x) for x in out]
        pos = [p + 1 for p in pos]
        want.append(tok)
    assert cpu.tokens().tolist() == want
    first = [ck["prompts"][1][0], ck["prompts"][3][0], ck["prompts"][0][2]]
    assert want != _greedy_tokens(m, first, [0, 0, 0], 3)   # the draws are not the argmax


def test_found_paged_attention_forced_into_a_real_plan(tmp_path):
    """Qwen3-0.6B cut to one layer (the found programs match its real sizes): the search's split-KV attention
    over the paged cache, forced into the plan in place of mk_attention, run with a prefill chunk at
    positions 30..37 (masked tails, empty splits): its output and the logits are the interpreter's."""
    from mpkir.codegen.superopt_tasks import apply_found_programs, load_programs
    from mpkir.interpreter import init_state, random_weights, run_graph
    from mpkir.models import config as mconfig
    from mpkir.parser import parse
    from mpkir.testing.cpu_kernel import CpuMegakernel
    from mpkir.verify import analyze

    path = Path(__file__).resolve().parent.parent / "examples" / "qwen3_0_6b.mpk"
    src = path.read_text()
    m = mconfig.apply_config(parse(src, str(path)), {"num_hidden_layers": 1, "vocab_size": 512}, source=src)
    m, _ = logits_module(m, analyze(m))
    an = analyze(m)
    plan = apply_found_programs(lower(m, num_sms=16, greedy=True, batch=None), m, load_programs(),
                                force=("decode_attention",))
    assert {d.kind for d in plan.replaced()} == {"decode_attention"}
    assert any("attn_split_kv_paged" in v for v in plan.variants)
    assert not any(v.startswith("mk_attention<") for v in plan.variants)
    w = random_weights(m, an, seed=1)
    cpu = CpuMegakernel(plan, nt=FEW_THREADS)
    cpu.load_weights(w)
    T = 8
    inputs = {"tokens": np.random.default_rng().integers(0, 512, T).astype(np.int32),
              "positions": np.arange(30, 30 + T, dtype=np.int32), "seq_ids": np.zeros(T, np.int32)}
    R, pps = cpu.bufs[plan.inputs["page_table"]].shape
    inputs["page_table"] = np.random.default_rng().permutation(R * pps).astype(np.int32).reshape(R, pps)
    cpu.set_inputs(inputs["tokens"], inputs["positions"], inputs["seq_ids"], inputs["page_table"])
    cpu.poison()
    cpu.run(1, live=T)
    rec: dict = {}
    run_graph(m, inputs, w, init_state(m, an), analysis=an, record=rec)
    for name in ("attn.0", "logits"):
        got = _f(cpu.bufs["v:" + name][:T]).astype(np.float64).reshape(T, -1)
        ref = np.asarray(rec[name], np.float64).reshape(T, -1)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2, name


def test_the_engine_over_the_cpu_megakernel_generates_the_interpreters_tokens(tiny):
    """Continuous batching over the GPU plan (on the CPU): 5 prompts through 4 slots, chunked prefill mixed
    with decoding, the engine's own page tables and padding rows: each request gets the interpreter path's
    tokens (the KV cache persists in the plan's buffers between steps)."""
    from mpkir.models.engine import Engine, EngineConfig, SamplingParams
    from mpkir.testing.cpu_kernel import CpuStepBackend

    ck, m = tiny
    prompts = [*ck["prompts"], ck["prompts"][0][:2]]
    serve = EngineConfig.from_serve(m.serve)

    def generate(backend):
        e = Engine(backend, serve)
        return [r.output for r in e.generate(prompts, 5, SamplingParams(), stop_ids=())], e

    want, _ = generate(InterpreterBackend(m.module, m.analysis, m.weights))
    got, e = generate(CpuStepBackend(m.module, m.analysis, m.weights))
    assert got == want
    assert e.stats.max_batch == serve.max_requests and e.stats.steps == e.backend.steps
