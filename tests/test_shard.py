"""Tensor parallelism without GPUs: the shard annotation (grammar, printer, verifier), the collective
operators, the ``shard`` pass and the weight slicer of the loader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mpkir.diagnostics import MpkError
from mpkir.ir import DType, TensorType
from mpkir.models.shard import shard_weights, weight_key
from mpkir.ops.registry import OPS
from mpkir.parser import parse
from mpkir.passes.manager import PASSES, parse_pipeline
from mpkir.passes.shard import shard_module
from mpkir.printer import print_module
from mpkir.verify import analyze, verify

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RNG = np.random.default_rng()

SMALL = {"vocab": 96, "hidden": 32, "layers": 2, "heads": 8, "kv_heads": 4, "head_dim": 8, "ffn": 48,
         "max_seq_len": 32, "page_size": 8, "max_tokens": 4, "max_requests": 2}
ALL_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.mpk"))


def with_gpus(text: str, n: int, sizes: dict | None = None) -> str:
    """The example with ``gpus = n`` in its serve block (and its size constants overridden)."""
    if sizes:
        def sub(m):
            return f"const {m.group(1)} = {sizes[m.group(1)]}" if m.group(1) in sizes else m.group(0)
        text = re.sub(r"^const (\w+) = [0-9.e+-]+\s*$", sub, text, flags=re.M)
    return re.sub(r"serve \{", f"serve {{\n  gpus = {n}", text, count=1)


def errors(src: str) -> list[tuple[int, int, str]]:
    a = analyze(parse(src, "t.mpk"))
    return [(d.span.line, d.span.col, d.message) for d in a.diagnostics if d.severity == "error"]


# ------------------------------------------------------------------------------------ the annotation

BASE = """model "t"
const n = 8
serve { gpus = 2 }
WEIGHT
graph g(%x: f32[2, n]) -> (f32[2, 4]) {
  %y = linear(%x, @w)
  return %y
}
"""


def test_shard_annotation_round_trips_and_verifies():
    src = BASE.replace("WEIGHT", 'weight w : f32[n / 2, n] = "w.weight" shard(axis=0, parts=2, index=1)')
    m = parse(src)
    assert m.weights[0].shard is not None
    text = print_module(m)
    assert 'shard(axis=0, parts=2, index=1)' in text
    assert parse(text) == m and print_module(parse(text)) == text
    assert errors(src) == []
    # the annotation is part of equality: dropping it gives a different module
    assert parse(src.replace(" shard(axis=0, parts=2, index=1)", "")) != m


@pytest.mark.parametrize(("shard", "col", "msg"), [
    ("shard(axis=2, parts=2, index=0)", 50,
     "shard axis 2 of weight 'w' is out of range for its type f32[4, 8] (rank 2)"),
    ("shard(axis=0, parts=4, index=0)", 59, "weight 'w' is one of 4 shards but the serve block has gpus = 2"),
    ("shard(axis=0, parts=2, index=2)", 68, "shard index 2 of weight 'w' is out of range 0..1"),
])
def test_shard_annotation_errors_are_located(shard, col, msg):
    src = BASE.replace("WEIGHT", f'weight w : f32[n / 2, n] = "w.weight" {shard}')
    assert errors(src) == [(4, col, msg)]


@pytest.mark.parametrize(("shard", "msg"), [
    ("shard(axis=0, parts=2)", "shard(...) needs index"),
    ("shard(axis=0, parts=2, index=0, rank=1)", "unknown shard setting 'rank'"),
    ("shard(axis=0, axis=1, parts=2, index=0)", "shard setting 'axis' given twice"),
    ('shard(axis="0", parts=2, index=0)', "shard setting 'axis' must be an integer expression"),
])
def test_shard_annotation_syntax_errors(shard, msg):
    src = BASE.replace("WEIGHT", f'weight w : f32[n / 2, n] = "w.weight" {shard}')
    with pytest.raises(MpkError) as e:
        parse(src, "t.mpk")
    d = e.value.diagnostics[0]
    assert msg in d.message and d.span is not None and d.span.line == 4


def test_shard_is_still_a_name_and_examples_parse_as_before():
    src = 'const shard = 2\nweight shard : f32[shard] = "s"\ngraph g(%x: f32[2]) -> (f32[2]) {\n' \
          '  %y = add(%x, %x)\n  return %y\n}\n'
    m = parse(src)
    assert m.weights[0].name == "shard" and m.weights[0].shard is None
    assert parse(print_module(m)) == m
    for name in ALL_EXAMPLES:
        m = parse((EXAMPLES / name).read_text(), name)
        assert all(w.shard is None for w in m.weights)
        assert parse(print_module(m)) == m


# ------------------------------------------------------------------------------------ the collectives

def test_allreduce_sums_in_rank_order_in_float32():
    xs = [RNG.standard_normal((3, 5)).astype(np.float32) for _ in range(4)]
    (y,) = OPS["allreduce"].combine([[x] for x in xs], [{}] * 4)
    ref = ((xs[0] + xs[1]) + xs[2]) + xs[3]            # float32, rank order
    assert y.dtype == np.float32 and np.array_equal(y, ref)
    exact = sum(x.astype(np.float64) for x in xs)
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 1e-6
    (one,) = OPS["allreduce"].reference([xs[0]], {}, None)
    assert np.array_equal(one, xs[0])


def test_allgather_concatenates_in_rank_order():
    xs = [RNG.standard_normal((2, 3)).astype(np.float32) for _ in range(2)]
    (y,) = OPS["allgather"].combine([[x] for x in xs], [{"axis": -1, "parts": 2}] * 2)
    assert np.array_equal(y, np.concatenate(xs, axis=-1))
    t = OPS["allgather"].infer([TensorType(DType.f32, ("B", 3))], {"axis": -1, "parts": 4})
    assert t[0].shape == ("B", 12)


def test_allreduce_argmax_merges_pairs_like_a_global_argmax():
    n, v = 4, 7
    full = RNG.standard_normal((5, n * v))
    full[0, 3] = full[0, 3 + v] = full[0].max() + 1.0          # a tie across ranks: lowest index wins
    full[1, 2 * v + 1] = full[1, 2 * v + 4] = full[1].max() + 1.0  # a tie inside one rank
    full = full.astype(np.float32)
    shards = [[full[:, r * v:(r + 1) * v]] for r in range(n)]
    (y,) = OPS["allreduce_argmax"].combine(shards, [{"offset": r * v} for r in range(n)])
    assert y.dtype == np.int32
    assert np.array_equal(y, np.argmax(full.astype(np.float64), axis=-1))
    assert y[0] == 3 and y[1] == 2 * v + 1
    (one,) = OPS["allreduce_argmax"].reference([full], {"offset": 0}, None)
    assert np.array_equal(one, np.argmax(full, axis=-1))


# ------------------------------------------------------------------------------------ the pass

@pytest.mark.parametrize("name", ALL_EXAMPLES)
@pytest.mark.parametrize("n", [2, 4])
def test_every_example_shards_into_verified_rank_modules(name, n):
    # SmolLM2's 9 heads / 3 KV heads shard over no power of two: its small-size copy is used
    small = n == 4 or name == "smollm2_135m.mpk"
    src = with_gpus((EXAMPLES / name).read_text(), n, SMALL if small else None)
    m = parse(src, name)
    ranks = [shard_module(m, r) for r in range(n)]
    for r, rm in enumerate(ranks):
        text = print_module(rm)
        assert parse(text) == rm                      # the rank module round-trips
        verify(rm)
        idx = {w.shard.index.value for w in rm.weights if w.shard is not None}
        assert idx <= {r}
    texts = [print_module(rm) for rm in ranks]
    # rank modules differ only in the slice index and the argmax offset
    norm = [re.sub(r"index=\d+|offset=\d+", "", t) for t in texts]
    assert all(t == norm[0] for t in norm)
    if name != "rmsnorm_linear.mpk":
        assert "allreduce(" in texts[0]
        assert any(w.shard is not None for w in ranks[0].weights)


def test_transformer_layout_is_megatron():
    m = parse(with_gpus((EXAMPLES / "qwen3_0_6b.mpk").read_text(), 2), "q.mpk")
    rm = shard_module(m, 1)
    by = {w.name: w for w in rm.weights}
    cols = ("wq", "wk", "wv", "w_gate", "w_up", "lm_head")
    for name in cols:
        sh = by[name].shard
        assert (sh.axis.value, sh.parts.value, sh.index.value) == (0, 2, 1)
    for name in ("wo", "w_down"):
        assert by[name].shard.axis.value == 1
    for name in ("embed", "attn_norm", "q_norm", "k_norm", "mlp_norm", "final_norm"):
        assert by[name].shard is None
    a = verify(rm)
    assert a.globals["k_cache"].shape[2] == 4 and a.globals["wq"].shape[0] == 1024
    text = print_module(rm)
    assert text.count("allreduce(") == 2 and "allreduce_argmax(%logits, offset=75968)" in text
    assert "reshape(%k, shape=[B, kv_heads / 2, head_dim])" in text
    assert list(PASSES) and "shard" in PASSES
    (p,) = parse_pipeline("shard{rank=1}")
    assert p.run(m) == rm


def test_one_gpu_is_the_identity():
    m = parse((EXAMPLES / "mlp.mpk").read_text())
    assert shard_module(m, 0) is m


def test_kv_heads_that_gpus_do_not_divide_is_a_located_error():
    src = with_gpus((EXAMPLES / "qwen3_0_6b.mpk").read_text(), 16)
    with pytest.raises(MpkError) as e:
        shard_module(parse(src, "q.mpk"), 0)
    d = e.value.diagnostics[0]
    assert "over 16 GPUs" in d.message and "16 does not divide 8" in d.message
    line = src.splitlines()[d.span.line - 1]
    assert "%k_heads = reshape(" in line
    assert "KV heads" in d.notes[0]
    src = with_gpus((EXAMPLES / "smollm2_135m.mpk").read_text(), 2)
    with pytest.raises(MpkError, match=r"'%q_heads' \(bf16\[B, 9, 64\]\) over 2 GPUs.*2 does not divide 9"):
        shard_module(parse(src, "smollm2.mpk"), 0)


@pytest.mark.parametrize(("edit", "msg"), [
    (lambda s: s.replace("%next = argmax(%logits)", "%l2 = allreduce(%logits)\n  %next = argmax(%l2)"),
     "'allreduce' in a module being sharded"),
    (lambda s: s.replace('= "lm_head.weight"', '= "lm_head.weight" shard(axis=0, parts=2, index=0)'),
     "is already sharded"),
    (lambda s: s.replace("%next = argmax(%logits)",
                         "%e2 = embedding(%tokens, @lm_head)\n  %next = argmax(%logits)"),
     "weight '@lm_head' is used whole (replicated) here but split along axis 0"),
])
def test_shard_pass_errors(edit, msg):
    src = edit(with_gpus((EXAMPLES / "mlp.mpk").read_text(), 2))
    with pytest.raises(MpkError) as e:
        shard_module(parse(src, "mlp.mpk"), 0)
    assert any(msg in d.message and d.span is not None for d in e.value.diagnostics), e.value.diagnostics


def test_rank_out_of_range():
    m = parse(with_gpus((EXAMPLES / "mlp.mpk").read_text(), 2))
    with pytest.raises(MpkError, match=r"rank 2 is out of range 0\.\.1"):
        shard_module(m, 2)


# ------------------------------------------------------------------------------------ the loader

def test_loader_slices_match_the_checkpoint():
    from mpkir.interpreter import random_weights

    m = parse(with_gpus((EXAMPLES / "attention_block.mpk").read_text(), 2))
    full = random_weights(m, analyze(m), seed=4)
    parts = [shard_weights(shard_module(m, r), full) for r in range(2)]
    rm = shard_module(m, 0)
    a = verify(rm)
    for w in rm.weights:
        layers = [None] if w.index is None else range(2)
        for layer in layers:
            key0 = weight_key(w, layer, a.env)
            name = w.checkpoint_name(layer)
            if w.shard is None:
                assert key0 == name
                assert all(np.array_equal(p[name], full[name]) for p in parts)
                continue
            ax = w.shard.axis.value
            key1 = key0.replace("index=0", "index=1")
            assert np.array_equal(np.concatenate([parts[0][key0], parts[1][key1]], axis=ax), full[name])


def test_loader_reports_missing_and_ill_shaped_tensors_by_name():
    from mpkir.interpreter import random_weights

    m = parse(with_gpus((EXAMPLES / "mlp.mpk").read_text(), 2), "mlp.mpk")
    full = dict(random_weights(m, analyze(m), seed=1))
    del full["model.layers.1.mlp.up_proj.weight"]
    full["lm_head.weight"] = full["lm_head.weight"][:100]
    with pytest.raises(MpkError) as e:
        shard_weights(shard_module(m, 1), full)
    msgs = [d.message for d in e.value.diagnostics]
    assert any("'model.layers.1.mlp.up_proj.weight' is missing (expected shape (128, 64))" in x for x in msgs)
    assert any("'lm_head.weight' has shape (100, 64), expected (256, 64)" in x
               and "(128, 64) shard 1 of 2" in x for x in msgs)
    assert all(d.span is not None for d in e.value.diagnostics)
