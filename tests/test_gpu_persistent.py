"""The resident serving megakernel (``ResidentBackend``): ONE launch serves every engine step.

Tiny random Llama- and Qwen3-style checkpoints (as in test_gpu_step_backend.py): greedy generation through
the resident kernel gives the CPU interpreter's tokens (batched, chunked prefill, argmax-only output), the
kernel is launched once for the whole generation, requests that join mid-run (submitted after others
started) do not change the others' tokens, one step's logits match the interpreter's, and a stopped kernel
is relaunched by the next step. Needs an NVIDIA GPU and CuPy (skipped elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("cupy")

from mpkir.models.backends import InterpreterBackend, make_backend  # noqa: E402
from mpkir.models.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from mpkir.models.loader import load_model  # noqa: E402
from mpkir.testing.tiny_models import write_tiny_checkpoint  # noqa: E402

N_NEW = 12
DECODE = {"max_requests": 4, "max_tokens": 4, "max_seq_len": 128, "page_size": 16}
MIXED = {"max_requests": 4, "max_tokens": 24, "max_seq_len": 128, "page_size": 16, "mode": "mixed"}


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def ckpt(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("res_" + request.param), request.param, seed=11,
                                 n_prompts=6)


def _cpu(m, prompts):
    e = Engine(make_backend(m, "cpu"), EngineConfig.from_serve(m.serve))
    return [r.output for r in e.generate(prompts, N_NEW, SamplingParams(), stop_ids=())]


@pytest.mark.parametrize("serve", [DECODE, MIXED], ids=["decode", "mixed"])
def test_resident_greedy_equals_cpu_in_one_launch(ckpt, serve):
    m = load_model(ckpt["dir"], serve=serve, device="gpu")
    prompts = ckpt["prompts"][:4]
    want = _cpu(m, prompts)
    be = make_backend(m, "gpu", gpu_backend="resident")
    try:
        e = Engine(be, EngineConfig.from_serve(m.serve))
        got = [r.output for r in e.generate(prompts, N_NEW, SamplingParams(), stop_ids=())]
        assert got == want
        assert e.stats.max_batch >= 3 and e.stats.steps > N_NEW
        assert be.launches == 1 and be.steps == e.stats.steps  # one launch served every step
        # a second generation on the same resident kernel (counters continue, KV pages reused)
        e2 = Engine(be, EngineConfig.from_serve(m.serve))
        assert [r.output for r in e2.generate(prompts[:1], N_NEW, SamplingParams(), stop_ids=())] == want[:1]
        assert be.launches == 1
    finally:
        be.close()


def test_requests_joining_mid_run(ckpt):
    """Two requests start; two more are submitted after three steps, one more later: each request gets
    the tokens it gets alone (CPU), and the kernel is never relaunched."""
    m = load_model(ckpt["dir"], serve=MIXED, device="gpu")
    prompts = ckpt["prompts"][:5]
    want = [_cpu(m, [p])[0] for p in prompts]
    be = make_backend(m, "gpu", gpu_backend="resident")
    try:
        e = Engine(be, EngineConfig.from_serve(m.serve))
        reqs = [e.submit(p, N_NEW, SamplingParams(), stop_ids=()) for p in prompts[:2]]
        for _ in range(3):
            e.step()
        assert all(r.output or r.computed for r in reqs)  # really started
        reqs += [e.submit(p, N_NEW, SamplingParams(), stop_ids=()) for p in prompts[2:4]]
        for _ in range(4):
            e.step()
        reqs.append(e.submit(prompts[4], N_NEW, SamplingParams(), stop_ids=()))
        e.run()
        assert [r.output for r in reqs] == want
        assert be.launches == 1
    finally:
        be.close()


def test_resident_argmax_output_and_relaunch(ckpt):
    """``output='ids'``: the kernel returns row argmaxes (4 bytes a row instead of 4 V); after ``close`` the
    next step relaunches the kernel."""
    from mpkir.runtime.host import ResidentBackend

    m = load_model(ckpt["dir"], serve=DECODE, device="gpu")
    prompts = ckpt["prompts"][:4]
    want = _cpu(m, prompts)
    be = ResidentBackend(m.module, m.analysis, m.weights, output="ids")
    try:
        e = Engine(be, EngineConfig.from_serve(m.serve))
        assert [r.output for r in e.generate(prompts, N_NEW, SamplingParams(), stop_ids=())] == want
        assert be.launches == 1
        be.close()
        assert not be.running
        e2 = Engine(be, EngineConfig.from_serve(m.serve))
        assert [r.output for r in e2.generate(prompts[:2], N_NEW, SamplingParams(), stop_ids=())] == want[:2]
        assert be.launches == 2
    finally:
        be.close()


def test_resident_step_logits_match_interpreter(ckpt):
    """Prefill chunks, decode tokens and padding rows in one step: logits within bf16 error."""
    m = load_model(ckpt["dir"], serve=MIXED, device="gpu")
    be = make_backend(m, "gpu", gpu_backend="resident", kernel_sampling=False)  # logits out
    cpu = InterpreterBackend(m.module, m.analysis, m.weights)
    be.mk.poison()
    rng = np.random.default_rng(3)
    V = int(m.analysis.env.consts["vocab"])
    table = np.zeros((4, 8), np.int32)
    table[0, :2], table[1, :2] = [3, 4], [7, 1]
    steps = [
        (rng.integers(0, V, 3), [0, 1, 2], [0, 0, 0]),
        (rng.integers(0, V, 6), [3, 0, 1, 2, 3, 4], [0, 1, 1, 1, 1, 1]),
        (rng.integers(0, V, 2), [18, 5], [0, 1]),
    ]
    try:
        for toks, pos, sid in steps:
            args = (np.asarray(toks, np.int32), np.asarray(pos, np.int32), np.asarray(sid, np.int32), table)
            g, c = be.step(*args), cpu.step(*args)
            assert g.shape == c.shape == (len(toks), V) and g.dtype == np.float32
            assert np.isfinite(g).all()
            err = np.linalg.norm(g - c) / np.linalg.norm(c)
            assert err < 1e-2, err
        assert be.launches == 1
    finally:
        be.close()


def test_idle_kernel_ends_and_the_next_step_relaunches(ckpt):
    """A kernel that sees no step for ``idle_s`` ends itself (no hang, no error); the next step relaunches
    it and generation goes on with the same tokens (KV cache and requests survive on the device/host)."""
    import time

    from mpkir.runtime.host import ResidentBackend

    m = load_model(ckpt["dir"], serve=DECODE, device="gpu")
    prompts = ckpt["prompts"][:3]
    want = _cpu(m, prompts)
    be = ResidentBackend(m.module, m.analysis, m.weights, idle_s=0.2)
    try:
        e = Engine(be, EngineConfig.from_serve(m.serve))
        reqs = [e.submit(p, N_NEW, SamplingParams(), stop_ids=()) for p in prompts]
        for _ in range(4):
            e.step()
        time.sleep(0.6)
        assert be.stream.done  # the kernel went idle and ended
        e.run()
        assert [r.output for r in reqs] == want
        assert be.launches == 2
    finally:
        be.close()


def test_generate_command_on_the_gpu_equals_the_cpu_path(ckpt, capsys):
    """``mpkir generate --device gpu`` (resident kernel; greedy, so ids come back) = the CPU path's tokens."""
    import json

    from mpkir.cli import main

    def run(*extra):
        prompts = ["--prompt", "the quick brown fox", "--prompt", "Paris"]
        flags = ["--max-tokens", "10", "--ignore-eos", "--json", "--no-progress"]
        args = ["generate", "--model", str(ckpt["dir"]), *prompts, *flags, *extra]
        assert main(args) == 0
        return [r["tokens"] for r in json.loads(capsys.readouterr().out)["results"]]

    cpu = run("--device", "cpu", "--precision", "bf16")
    assert run("--device", "gpu") == cpu
    assert run("--device", "gpu", "--gpu-backend", "step") == cpu


def test_resident_kernel_sampling_equals_host_sampling(ckpt):
    """kernel_sampling: the resident kernel draws each request's token (mk_sample_row) from the same logits
    the host would sample: the same tokens, per request parameters and seeds, with ids (not logits) back."""
    m = load_model(ckpt["dir"], serve=DECODE, device="gpu")
    prompts = ckpt["prompts"][:4]
    samp = [SamplingParams(0.9, top_k=40, top_p=0.9, seed=1), SamplingParams(1.3, seed=2),
            SamplingParams(0.7, top_p=0.5, seed=3), SamplingParams()]
    outs = []
    for kernel_sampling in (False, True):
        be = make_backend(m, "gpu", gpu_backend="resident", kernel_sampling=kernel_sampling)
        try:
            assert getattr(be, "samples_rows", False) == kernel_sampling
            e = Engine(be, EngineConfig.from_serve(m.serve))
            outs.append([r.output for r in e.generate(prompts, N_NEW, samp, stop_ids=())])
            assert be.launches == 1
        finally:
            be.close()
    assert outs[1] == outs[0]
    assert outs[0][3] == _cpu(m, prompts[3:])[0]   # the greedy request: the CPU interpreter's tokens


def test_kernel_allocated_pages_give_the_cpu_tokens(ckpt):
    """kernel_pages: the resident kernel takes and frees the KV pages itself (the engine only counts them and
    names the slots that left): more prompts than slots, so slots and pages are reused, in one launch."""
    m = load_model(ckpt["dir"], serve=MIXED, device="gpu")
    prompts = ckpt["prompts"] * 2
    want = _cpu(m, prompts)
    be = make_backend(m, "gpu", gpu_backend="resident", kernel_pages=True, kernel_sampling=True)
    try:
        assert be.allocates_pages and be.samples_rows
        e = Engine(be, EngineConfig.from_serve(m.serve))
        got = [r.output for r in e.generate(prompts, N_NEW, SamplingParams(), stop_ids=())]
        assert got == want
        assert be.launches == 1 and e.stats.max_batch >= 3
        kp = be.d_kpages.get()
        R = be.page_slots
        assert kp[0] + kp[1 : 1 + R].sum() == kp.size - 1 - R   # every page free or held by one slot
    finally:
        be.close()
