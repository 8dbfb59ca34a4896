"""The NumPy reference interpreter: end to end against hand-written NumPy, loops, tied weights, state."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from mpkir.interpreter import RunError, init_state, random_weights, run_graph
from mpkir.parser import parse
from mpkir.verify import verify

BF16 = ml_dtypes.bfloat16
RNG = np.random.default_rng()

MLP = """
model "mlp"
const hidden = 32
const ffn = 48
dim B <= 8
weight norm : bf16[hidden] = "norm.weight"
weight up : bf16[2 * ffn, hidden] = "up.weight"
weight down : bf16[hidden, ffn] = "down.weight"
weight bias : f32[hidden] = "down.bias"
graph main(%x: bf16[B, hidden], %y: bf16[B, hidden]) -> (bf16[B, hidden], i32[B]) {
  %xn = rmsnorm(%x, @norm, eps=1e-5)
  %gu = linear(%xn, @up)
  %act = silu_mul(%gu)
  %o = linear(%act, @down)
  %ob = add(%o, %y)
  %idx = argmax(%ob)
  return %ob, %idx
}
"""

LOOP = """
model "loop"
const hidden = 16
const layers = 3
dim B <= 4
weight w[l < layers] : bf16[hidden, hidden] = "layers.{l}.w"
weight emb : bf16[10, hidden] = "emb"
weight head : bf16[10, hidden] = "emb"
graph main(%ids: i32[B]) -> (bf16[B, 10], bf16[B, hidden]) {
  %x = embedding(%ids, @emb)
  %h, %s = for l in 0..layers carry(%a = %x, %acc = %x) {
    %t = linear(%a, @w[l])
    %u = silu(%t)
    %acc2 = add(%acc, %u)
    yield %u, %acc2
  }
  %logits = linear(%h, @head)
  return %logits, %s
}
"""


def _module(src):
    m = parse(src, "t.mpk")
    return m, verify(m)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _silu(x):
    return x / (1 + np.exp(-x))


def _mlp_hand(x, y, w, round_to=None):
    """float64 hand computation; ``round_to`` emulates bf16 storage of every intermediate."""
    r = (lambda v: v.astype(round_to).astype(np.float64)) if round_to else (lambda v: v)
    f = {k: v.astype(np.float64) for k, v in w.items()}
    x, y = x.astype(np.float64), y.astype(np.float64)
    xn = r(x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * f["norm.weight"])
    gu = r(xn @ f["up.weight"].T)
    act = r(_silu(gu[:, :48]) * gu[:, 48:])
    o = r(act @ f["down.weight"].T)
    return r(o + y)


@pytest.mark.parametrize("b", [1, 5])
def test_mlp_end_to_end(b):
    m, a = _module(MLP)
    w = random_weights(m, a, seed=int(RNG.integers(1 << 30)))
    x = RNG.standard_normal((b, 32)).astype(BF16)
    y = RNG.standard_normal((b, 32)).astype(BF16)
    record: dict = {}
    ob, idx = run_graph(m, {"x": x, "y": y}, w, record=record)
    assert ob.dtype == BF16 and ob.shape == (b, 32) and idx.dtype == np.int32
    assert _rel(ob, _mlp_hand(x, y, w, BF16)) < 1e-2
    np.testing.assert_array_equal(idx, np.asarray(ob, np.float32).argmax(-1))
    assert set(record) >= {"x", "y", "xn", "gu", "act", "o", "ob", "idx"}
    assert record["gu"].shape == (b, 96)
    # f32 storage: every float value stays float32 and matches float64 closely
    ob32, _ = run_graph(m, {"x": x, "y": y}, w, float_storage="f32")
    assert ob32.dtype == np.float32
    assert _rel(ob32, _mlp_hand(x, y, w)) < 1e-6
    assert _rel(ob, ob32) > 0  # bf16 rounding between ops is real


def test_weights_may_be_given_as_float32():
    m, a = _module(MLP)
    w = random_weights(m, a, seed=3)
    w32 = {k: np.asarray(v, np.float32) for k, v in w.items()}
    x = RNG.standard_normal((2, 32)).astype(BF16)
    y = RNG.standard_normal((2, 32)).astype(BF16)
    for fs in (None, "f32"):
        a1 = run_graph(m, {"x": x, "y": y}, w, float_storage=fs)
        a2 = run_graph(m, {"%x": x, "%y": y}, w32, float_storage=fs, analysis=a)
        for p, q in zip(a1, a2, strict=True):
            np.testing.assert_array_equal(p, q)


def test_loops_tied_weights_and_record_names():
    m, a = _module(LOOP)
    w = random_weights(m, a, seed=int(RNG.integers(1 << 30)))
    assert sorted(w) == ["emb", "layers.0.w", "layers.1.w", "layers.2.w"]  # head shares "emb"
    ids = RNG.integers(0, 10, 3).astype(np.int32)
    record: dict = {}
    logits, s = run_graph(m, {"ids": ids}, w, float_storage="f32", record=record)
    f = {k: v.astype(np.float64) for k, v in w.items()}
    h = f["emb"][ids]
    acc = h.copy()
    for layer in range(3):
        h = _silu(h @ f[f"layers.{layer}.w"].T)
        acc = acc + h
        assert _rel(record[f"u.{layer}"], h) < 1e-6
    assert _rel(logits, h @ f["emb"].T) < 1e-6
    assert _rel(s, acc) < 1e-6
    assert {"t.0", "t.1", "t.2", "acc2.2", "h", "s", "logits"} <= set(record)


def test_random_weights_are_sensible_and_seeded():
    m, a = _module(MLP)
    w = random_weights(m, a, seed=5)
    assert w["up.weight"].dtype == BF16 and w["bias" if "bias" in w else "down.bias"].dtype == np.float32
    up = np.asarray(w["up.weight"], np.float32)
    assert 0.015 < up.std() < 0.025 and abs(up.mean()) < 0.005
    norm = np.asarray(w["norm.weight"], np.float32)
    assert np.all(norm != 0) and abs(norm.mean() - 1) < 0.1 and norm.std() > 0.01
    assert np.asarray(w["down.bias"]).std() < 0.1
    again = random_weights(m, a, seed=5)
    other = random_weights(m, a, seed=6)
    np.testing.assert_array_equal(np.asarray(w["up.weight"], np.float32),
                                  np.asarray(again["up.weight"], np.float32))
    assert not np.array_equal(np.asarray(w["up.weight"], np.float32),
                              np.asarray(other["up.weight"], np.float32))


def test_symbolic_dim_binding_errors():
    m, a = _module(MLP)
    w = random_weights(m, a)
    x = np.ones((3, 32), BF16)
    with pytest.raises(RunError) as e:
        run_graph(m, {"x": x, "y": np.ones((4, 32), BF16)}, w)
    msg = str(e.value)
    assert "B = 4" in msg and "B = 3" in msg and "%y" in msg and "%x" in msg
    assert e.value.diagnostics[0].span is not None and e.value.diagnostics[0].span.line == 10
    with pytest.raises(RunError, match="dim 1 is 31, expected 32"):
        run_graph(m, {"x": np.ones((3, 31), BF16), "y": x}, w)
    with pytest.raises(RunError, match="missing input '%y'"):
        run_graph(m, {"x": x}, w)
    with pytest.raises(RunError, match="no parameter '%z'"):
        run_graph(m, {"x": x, "y": x, "z": x}, w)
    with pytest.raises(RunError, match=r"'down\.weight' is missing"):
        run_graph(m, {"x": x, "y": x}, {k: v for k, v in w.items() if k != "down.weight"})
    bad = dict(w, **{"down.weight": np.ones((32, 47), BF16)})
    with pytest.raises(RunError, match=r"has shape \(32, 47\) but '@down' is declared bf16\[32, 48\]"):
        run_graph(m, {"x": x, "y": x}, bad)
    with pytest.raises(ValueError, match="float_storage"):
        run_graph(m, {"x": x, "y": x}, w, float_storage="f16")


ATTN = """
model "attn"
const heads = 4
const kv_heads = 2
const head_dim = 8
const hidden = heads * head_dim
const page_size = 4
const pages_per_seq = 4
const num_pages = 8
dim B <= 8
dim R <= 2
weight wq : f32[hidden, hidden] = "wq"
weight wkv : f32[2 * kv_heads * head_dim, hidden] = "wkv"
state kc[l < 2] : bf16[num_pages, page_size, kv_heads, head_dim]
state vc[l < 2] : bf16[num_pages, page_size, kv_heads, head_dim]
graph main(%x: f32[B, hidden], %pos: i32[B], %sid: i32[B],
           %table: i32[R, pages_per_seq]) -> (f32[B, hidden]) {
  %q0 = linear(%x, @wq)
  %q = reshape(%q0, shape=[B, heads, head_dim])
  %kv = linear(%x, @wkv)
  %k2, %v2 = split(%kv, sizes=[kv_heads * head_dim, kv_heads * head_dim])
  %k = reshape(%k2, shape=[B, kv_heads, head_dim])
  %v = reshape(%v2, shape=[B, -1, head_dim])
  %o = for l in 0..2 carry(%qq = %q) {
    %qr = rope(%qq, %pos, style=interleaved)
    %kr = rope(%k, %pos, style=interleaved)
    %a = paged_attention(%qr, %kr, %v, @kc[l], @vc[l], %table, %pos, %sid)
    yield %a
  }
  %flat = reshape(%o, shape=[B, hidden])
  return %flat
}
"""


def test_paged_attention_state_is_mutated_in_place():
    m, a = _module(ATTN)
    w = random_weights(m, a, seed=int(RNG.integers(1 << 30)))
    state = init_state(m, a)
    assert sorted(state) == [("kc", 0), ("kc", 1), ("vc", 0), ("vc", 1)]
    assert all(v.dtype == BF16 and not np.any(np.asarray(v, np.float32)) for v in state.values())
    ids = {k: id(v) for k, v in state.items()}
    table = np.array([[5, 2, 0, 0], [7, 1, 0, 0]], np.int32)
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    inputs = {"x": x, "pos": np.array([0, 1, 0], np.int32), "sid": np.array([0, 0, 1], np.int32),
              "table": table}
    (o,) = run_graph(m, inputs, w, state, float_storage="f32")
    assert {k: id(v) for k, v in state.items()} == ids
    kc0 = np.asarray(state[("kc", 0)], np.float32)
    assert np.any(kc0[5, 0]) and np.any(kc0[5, 1]) and np.any(kc0[7, 0]) and not np.any(kc0[2])
    # layer 0's keys are the same as layer 1's (k does not change across layers)
    np.testing.assert_array_equal(kc0, np.asarray(state[("kc", 1)], np.float32))
    # a second step continues request 1 at position 1 (page 7 slot 1), padding token ignored
    x2 = RNG.standard_normal((2, 32)).astype(np.float32)
    run_graph(m, {"x": x2, "pos": np.array([1, 0], np.int32), "sid": np.array([1, -1], np.int32),
                  "table": table}, w, state)
    kc0b = np.asarray(state[("kc", 0)], np.float32)
    assert np.any(kc0b[7, 1]) and np.array_equal(kc0b[5], kc0[5])
    assert o.shape == (3, 32) and np.all(np.isfinite(o))


ALL_OPS = """
model "zoo"
dim B <= 4
weight ln_w : f32[16] = "ln.w"
weight ln_b : f32[16] = "ln.b"
weight emb : f32[20, 16] = "emb"
graph main(%ids: i32[B], %pos: i32[B]) -> (f32[B, 16], i32[B], f32[B, 16], i32[B]) {
  %x = embedding(%ids, @emb)
  %ln = layernorm(%x, @ln_w, @ln_b, eps=1e-5)
  %g = gelu(%ln, approximate=none)
  %a, %b = split(%g, sizes=[6, 10])
  %c = concat(%b, %a, axis=1)
  %t = transpose(%c, perm=[1, 0])
  %tt = transpose(%t, perm=[1, 0])
  %m = matmul(%tt, %t)
  %sm = softmax(%m, axis=0)
  %h = reshape(%c, shape=[B, 2, 8])
  %att = attention(%h, %h, %h, causal=false, scale=0.5)
  %r = rope(%att, %pos, theta=500.0, style=interleaved, rotary_dim=4)
  %flat = reshape(%r, shape=[B, -1])
  %mu = mul(%flat, %x)
  %ar = allreduce(%mu)
  %cast = cast(%ar, dtype=i32)
  %s = sample(%mu, %pos, temperature=0.7, top_k=5, top_p=0.9, seed=3)
  %am = argmax(%sm, axis=0)
  return %ar, %s, %flat, %am
}
"""


def test_every_kind_of_attribute_through_parse_verify_and_run():
    m, a = _module(ALL_OPS)
    w = random_weights(m, a, seed=2)
    ids = RNG.integers(0, 20, 3).astype(np.int32)
    pos = np.array([0, 5, 9], np.int32)
    record: dict = {}
    ar, s, _flat, am = run_graph(m, {"ids": ids, "pos": pos}, w, float_storage="f32", record=record)
    assert ar.shape == (3, 16) and s.shape == (3,) and am.shape == (3,)
    assert record["m"].shape == (3, 3) and record["cast"].dtype == np.int32
    c = np.concatenate([record["g"][:, 6:], record["g"][:, :6]], 1)
    np.testing.assert_array_equal(record["c"], c)
    assert _rel(record["m"], c.astype(np.float64) @ c.T.astype(np.float64)) < 1e-6
    np.testing.assert_allclose(record["sm"].sum(0), 1, rtol=1e-6)
    assert np.all(s < 16) and np.all(s >= 0)
