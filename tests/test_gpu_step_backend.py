"""The engine's per-step-launch GPU backend (``make_backend(..., gpu_backend="step")``) on tiny random
checkpoints (the resident one, the default, is tested in test_gpu_persistent.py).

Tiny Llama- and Qwen3-style safetensors checkpoints are written here (head dims the GPU kernels support:
64 and 128) and loaded into the example ``.mpk`` files; the GPU engine (one megakernel launch per step)
must produce the greedy tokens of the CPU interpreter running the same bf16 graph, batched, alone, and
with chunked prefill (several tokens of one request in one step), and one step's logits must match the
interpreter's within bf16 error. Needs an NVIDIA GPU and CuPy (skipped elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from mpkir.models.backends import InterpreterBackend, make_backend  # noqa: E402
from mpkir.models.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from mpkir.models.loader import load_model  # noqa: E402
from mpkir.models.reference import random_checkpoint  # noqa: E402
from mpkir.models.safetensors_loader import save_checkpoint  # noqa: E402
from mpkir.models.tokenizer import write_tiny_tokenizer  # noqa: E402
from mpkir.printer import print_module  # noqa: E402
from mpkir.testing.tiny_models import tiny_config, write_tiny_checkpoint  # noqa: E402

N_NEW = 12
DECODE = {"max_requests": 4, "max_tokens": 4, "max_seq_len": 128, "page_size": 16}
MIXED = {"max_requests": 4, "max_tokens": 24, "max_seq_len": 128, "page_size": 16, "mode": "mixed"}


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def ckpt(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gpu_" + request.param), request.param, seed=5,
                                 n_prompts=4)


def _gen(loaded, device, prompts):
    backend = make_backend(loaded, device, gpu_backend="step" if device == "gpu" else None)
    e = Engine(backend, EngineConfig.from_serve(loaded.serve))
    reqs = e.generate(prompts, N_NEW, SamplingParams(), stop_ids=())
    return [r.output for r in reqs], e


@pytest.mark.parametrize("serve", [DECODE, MIXED], ids=["decode", "mixed"])
def test_gpu_greedy_equals_cpu_interpreter(ckpt, serve):
    m = load_model(ckpt["dir"], serve=serve, device="gpu")
    want, _ = _gen(m, "cpu", ckpt["prompts"])
    got, e = _gen(m, "gpu", ckpt["prompts"])
    assert got == want
    assert e.stats.max_batch >= 3  # really batched
    if serve is MIXED:  # prompts were prefilled in chunks of several tokens of one request per step
        assert e.stats.tokens_fed > e.stats.steps * 4
    alone, _ = _gen(m, "gpu", ckpt["prompts"][:1])
    assert alone == want[:1]


def test_gpu_step_logits_match_interpreter(ckpt):
    """One step: a 5-token prefill chunk of request 1, a decode token of request 0, and padding rows."""
    m = load_model(ckpt["dir"], serve=MIXED, device="gpu")
    gpu = make_backend(m, "gpu", gpu_backend="step")
    cpu = InterpreterBackend(m.module, m.analysis, m.weights)
    gpu.mk.poison()
    rng = np.random.default_rng(0)
    V = int(m.analysis.env.consts["vocab"])
    table = np.zeros((4, 8), np.int32)
    table[0, :2], table[1, :2] = [3, 4], [7, 1]
    # step 1: request 0 prefills 3 tokens; step 2: request 0 decodes one, request 1 prefills 5
    steps = [
        (rng.integers(0, V, 3), [0, 1, 2], [0, 0, 0]),
        (rng.integers(0, V, 6), [3, 0, 1, 2, 3, 4], [0, 1, 1, 1, 1, 1]),
        (rng.integers(0, V, 2), [18, 5], [0, 1]),  # position 18: page 1 of request 0 (empty: only itself)
    ]
    for toks, pos, sid in steps:
        args = (np.asarray(toks, np.int32), np.asarray(pos, np.int32), np.asarray(sid, np.int32), table)
        g, c = gpu.step(*args), cpu.step(*args)
        assert g.shape == c.shape == (len(toks), V)
        assert np.isfinite(g).all()
        err = np.linalg.norm(g - c) / np.linalg.norm(c)
        assert err < 1e-2, err


def test_f32_logits_graph(ckpt, tmp_path):
    """An example whose lm_head input is cast to f32: the GPU writes unrounded float32 logits."""
    ex = Path(__file__).resolve().parent.parent / "examples"
    src = (ex / ("qwen3_0_6b.mpk" if ckpt["kind"] == "qwen3" else "llama3_2_1b.mpk")).read_text()
    lm = "%logits = linear(%hf, @lm_head)"
    assert lm in src
    mpk = tmp_path / "f32_logits.mpk"
    mpk.write_text(src.replace(lm, "%hf32 = cast(%hf, dtype=f32)\n  %logits = linear(%hf32, @lm_head)"))
    m = load_model(ckpt["dir"], mpk=mpk, serve=DECODE, device="gpu")
    want, _ = _gen(m, "cpu", ckpt["prompts"])
    got, _ = _gen(m, "gpu", ckpt["prompts"])
    assert got == want
    gpu, cpu = make_backend(m, "gpu", gpu_backend="step"), InterpreterBackend(m.module, m.analysis, m.weights)
    args = (np.array([5, 9], np.int32), np.array([0, 0], np.int32), np.array([0, 1], np.int32),
            np.arange(32, dtype=np.int32).reshape(4, 8))
    g, c = gpu.step(*args), cpu.step(*args)
    assert g.dtype == np.float32 and (g.view(np.uint32) & 0xFFFF).any()  # not bf16-rounded
    assert np.linalg.norm(g - c) / np.linalg.norm(c) < 1e-2


def test_llama3_rope_scaling_on_gpu(tmp_path):
    """A checkpoint with Llama-3 ``rope_scaling``: the GPU rope uses the scaled frequencies (the host's
    float32 table of the rope op), so greedy tokens equal the CPU interpreter's."""
    tok = write_tiny_tokenizer(tmp_path)
    cfg = tiny_config("llama", tok.vocab_size)
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    save_checkpoint(tmp_path, random_checkpoint(cfg, seed=7), cfg)
    m = load_model(tmp_path, serve=DECODE, device="gpu")
    assert "scaling=llama3" in print_module(m.module)
    gpu = make_backend(m, "gpu", gpu_backend="step")
    tables = [b for b in gpu.mk.plan.buffers.values() if b.kind == "const"]
    assert tables and all(float(t.data[-1]) < 500000.0 ** (-62 / 64) / 4 for t in tables)  # scaled
    prompts = [tok.encode(s) for s in ("What is the capital of France?", "the quick brown fox jumps")]
    want, _ = _gen(m, "cpu", prompts)
    got, _ = _gen(m, "gpu", prompts)
    assert got == want


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A Llama whose linears sum over 1024 and 4096 terms."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gpu_wide"), "llama", seed=9, n_prompts=4,
                                 hidden=1024, intermediate=4096)


def test_exact_engine_steps_give_the_float64_references_bits(wide_llama):
    """The engine's step backend in numerics="exact": prefill chunks (several tokens of one request in one
    step, each attending to the ones before it), a decode token beside them, padding rows, pages out of order:
    every logit of every step is mpkir.testing.exact_ref's bit for bit."""
    from mpkir.testing.exact_ref import ExactRef

    m = load_model(wide_llama["dir"], serve=MIXED, device="gpu")
    gpu = make_backend(m, "gpu", gpu_backend="step", numerics="exact")
    plan = gpu.mk.plan
    assert plan.numerics == "exact"
    rng = np.random.default_rng()
    table = rng.permutation(32).astype(np.int32).reshape(4, 8)
    bufs = {n: a.get() for n, a in gpu.mk.bufs.items() if n.startswith(("w:", "s:", "const:"))}
    bufs[plan.inputs["page_table"]] = table
    ref = ExactRef(plan, bufs, m.analysis.env.consts)
    V = int(m.analysis.env.consts["vocab"])
    steps = [
        (rng.integers(0, V, 3), [0, 1, 2], [0, 0, 0]),
        (rng.integers(0, V, 6), [3, 0, 1, 2, 3, 4], [0, 1, 1, 1, 1, 1]),
        (rng.integers(0, V, 2), [4, 5], [0, 1]),
    ]
    for toks, pos, sid in steps:
        args = (np.asarray(toks, np.int32), np.asarray(pos, np.int32), np.asarray(sid, np.int32), table)
        got = gpu.step(*args)
        want = ref.step(*args[:3]).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), int((got != want).sum())
