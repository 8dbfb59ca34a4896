"""Forced norm_linear programs (RMSNorm -> linear(s), placed by codegen/superopt_tasks.py) in whole GPU plans
run on the CPU with the megakernel's own task bodies (mpkir.testing.cpu_kernel, emulated CTAs of 64 threads):
the found program's column tiles as q/k/v and gate/up ops (tiny Llama: on a regridded grid, its tiles
straddled k|v), the lm_head's found body and its argmax glue feeding mk_argmax_final. The tiny checkpoints'
programs are the found structure re-sized (mpkir.testing.found_programs); the one-layer Qwen3-0.6B runs the
found programs themselves. Found programs keep float32 where the reference rounds the normalised input to
bf16: logits within bf16 tolerance of the interpreter's, and its greedy tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_cpu_megakernel import TABLE, _f, _greedy_tokens, _tiny

from mpkir.codegen.lower import lower
from mpkir.codegen.superopt_tasks import apply_found_programs, load_programs
from mpkir.models.backends import InterpreterBackend, logits_module
from mpkir.testing.cta import compiler

pytestmark = [pytest.mark.skipif(compiler() is None, reason="no C++ compiler"), pytest.mark.slow]
NT = 64
ROOT = Path(__file__).resolve().parent.parent
NL = ("norm_linear",)
ROWS = {"llama": 256, "qwen3": 64}  # tile rows; Llama's q/k/v = 256|128|128: 256-row tiles straddle k|v


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    return request.param, *_tiny(request.param, tmp_path_factory)


def _place(kind, loop):
    """A post-pass forcing norm_linear (the found structure re-sized to the module's subgraphs)."""
    from mpkir.testing.found_programs import resized_entries

    def post(plan, module):
        entries = resized_entries(module, load_programs(), "norm_linear", ROWS[kind], loop)
        return apply_found_programs(plan, module, entries, force=NL)

    return post


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(got).all()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_forced_norm_linear_mixed_step_gives_the_interpreters_logits(tiny):
    """The engine's step (logits graph): a prefill of 5 tokens and a first token, two padding rows, buffers
    poisoned; every norm_linear instance replaced (2 layers x q/k/v and gate/up, the lm_head)."""
    from mpkir.testing.cpu_kernel import CpuStepBackend

    kind, ck, m = tiny
    be = CpuStepBackend(m.module, m.analysis, m.weights, nt=NT, post=_place(kind, loop=2))
    dec = [d for d in be.mk.plan.decisions if d.kind == "norm_linear"]
    assert len(dec) == 5 and all(d.replaced for d in dec), [d.reason for d in dec]
    assert sum("regridded" in d.reason for d in dec) == (2 if kind == "llama" else 0)
    assert not any(o.kind == "linear" and o.tasks[0].a.get(20) == 1 for o in be.mk.plan.ops)
    toks = [*ck["prompts"][0][:5], ck["prompts"][1][0]]
    step = [np.array(v, np.int32) for v in (toks, [0, 1, 2, 3, 4, 0], [0, 0, 0, 0, 0, 1])] + [TABLE]
    be.mk.poison()
    got = be.step(*step)
    ref = InterpreterBackend(m.module, m.analysis, m.weights).step(*step)
    err = _rel(got, ref)
    print(f"{kind}: forced norm_linear logits rel err {err:.2e}")
    assert err < 1e-2
    assert (got.argmax(-1) == np.asarray(ref).argmax(-1)).all()


def test_forced_norm_linear_greedy_steps_give_the_interpreters_tokens(tiny):
    """The argmax graph at batch 3, 3 steps in one run (a loop of one K chunk): the lm_head's found body
    writes the logits, the glue op their per-tile argmax partials, mk_argmax_final the tokens the next step
    embeds."""
    from mpkir.testing.cpu_kernel import CpuMegakernel

    kind, ck, m = tiny
    plan = _place(kind, loop=1)(lower(m.module, num_sms=8, greedy=True, batch=3), m.module)
    assert [o.kind for o in plan.ops[-3:]] == ["so_norm_linear", "argmax_tile", "argmax"]
    cpu = CpuMegakernel(plan, nt=NT)
    cpu.load_weights(m.weights)
    tok = [ck["prompts"][0][0], ck["prompts"][2][0], ck["prompts"][3][1]]
    assert cpu.greedy(tok, [0, 0, 0], [0, 1, 2], TABLE, 3) == _greedy_tokens(m, tok, [0, 0, 0], 3)
    # bench/superopt_megakernel_check.py's float64 checks of the RMSNorm -> linears on the last step's buffers
    sys.path.insert(0, str(ROOT / "bench"))
    from superopt_megakernel_check import _f as f64
    from superopt_megakernel_check import _norm_linears

    class View:
        def __call__(self, name):
            return f64(cpu.bufs[name])

        def raw(self, name):
            return cpu.bufs[name]

    errs = _norm_linears(View(), lower(m.module, num_sms=8, greedy=True, batch=3), 3, 2)
    assert len(errs) == 2 * 5 + 2 and errs.pop("argmax_exact") is True
    assert max(errs.values()) < 1e-2, errs


def test_found_norm_linear_programs_in_a_one_layer_qwen3():
    """Qwen3-0.6B cut to one layer (vocabulary 512: the lm_head's program is for 151936 and does not occur):
    the search's own q/k/v (grid 128 over 2048|1024|1024 rows) and gate/up programs forced into the plan, a
    prefill chunk at positions 30..37. This random model is sensitive: the interpreter's bf16 logits are ~1e-2
    from its float32 run (``float_storage="f32"``); the found kernel's outputs and logits are within 1e-2 of
    the float32 run and no further from it than the bf16 interpreter's."""
    from mpkir.interpreter import init_state, random_weights, run_graph
    from mpkir.models import config as mconfig
    from mpkir.parser import parse
    from mpkir.testing.cpu_kernel import CpuMegakernel
    from mpkir.verify import analyze

    path = ROOT / "examples" / "qwen3_0_6b.mpk"
    src = path.read_text()
    m = mconfig.apply_config(parse(src, str(path)), {"num_hidden_layers": 1, "vocab_size": 512}, source=src)
    m, _ = logits_module(m, analyze(m))
    an = analyze(m)
    plan = apply_found_programs(lower(m, num_sms=16, greedy=True, batch=None), m, load_programs(), force=NL)
    assert [d.instance for d in plan.replaced()] == ["xn.0,q.0,k.0,v.0", "hn.0,gate.0,up.0"]
    w = random_weights(m, an, seed=2)
    cpu = CpuMegakernel(plan, nt=NT)
    cpu.load_weights(w)
    T, rng = 8, np.random.default_rng()
    inputs = {"tokens": rng.integers(0, 512, T).astype(np.int32), "seq_ids": np.zeros(T, np.int32),
              "positions": np.arange(30, 30 + T, dtype=np.int32)}
    R, pps = cpu.bufs[plan.inputs["page_table"]].shape
    inputs["page_table"] = np.arange(R * pps, dtype=np.int32).reshape(R, pps)
    cpu.set_inputs(inputs["tokens"], inputs["positions"], inputs["seq_ids"], inputs["page_table"])
    cpu.poison()
    cpu.run(1, live=T)
    bf16: dict = {}
    f32: dict = {}
    run_graph(m, inputs, w, init_state(m, an), analysis=an, record=bf16)
    run_graph(m, inputs, w, init_state(m, an), analysis=an, record=f32, float_storage="f32")
    for name in ("q.0", "k.0", "v.0", "gate.0", "up.0", "logits"):
        ref = np.reshape(f32[name], (T, -1))
        err = _rel(_f(cpu.bufs["v:" + name][:T]).reshape(T, -1), ref)
        err_ref = _rel(np.reshape(bf16[name], (T, -1)), ref)
        print(f"{name}: rel err to float32 {err:.2e} (the bf16 interpreter's: {err_ref:.2e})")
        assert err < 1e-2 and err <= 1.25 * err_ref, name
