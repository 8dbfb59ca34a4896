"""Every operator: reference semantics against hand-written float64 NumPy, and shape/dtype inference."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from mpkir.ir import DType, TensorType
from mpkir.ops.base import RefCtx, ShapeError
from mpkir.ops.registry import OPS
from mpkir.ops.sampling import mix64, sample_uniforms

CATALOGUE = ["embedding", "rmsnorm", "layernorm", "head_rmsnorm", "linear", "matmul", "add", "mul", "silu",
             "gelu", "silu_mul", "softmax", "rope", "attention", "paged_attention", "reshape", "split",
             "concat", "transpose", "cast", "argmax", "sample", "allreduce",
             "allgather", "allreduce_argmax"]  # the last two: the multi-GPU helper's collectives

RNG = np.random.default_rng()


def rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def run(name, *xs, dims=None, **attrs):
    op = OPS[name]
    full = {a.name: a.default for a in op.attrs if not a.required}
    full.update(attrs)
    return op.reference(list(xs), full, RefCtx(dims or {}))


def infer(name, *ts, **attrs):
    op = OPS[name]
    full = {a.name: a.default for a in op.attrs if not a.required}
    full.update(attrs)
    return op.infer(list(ts), full)


def T(dtype: str, *shape) -> TensorType:
    return TensorType(DType(dtype), tuple(shape))


def randn(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def test_every_catalogue_operator_is_registered():
    assert sorted(CATALOGUE) == sorted(OPS)
    for op in OPS.values():
        assert op.doc and callable(op.infer) and callable(op.reference)
    assert OPS["paged_attention"].mutates == (3, 4)


# ------------------------------------------------------------------ dense / elementwise


@pytest.mark.parametrize("shape", [(3, 16, 8), (1, 64, 32), (2, 5, 7, 12)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(shape, bias):
    *lead, k, n = shape
    x = randn(*lead, k, dtype=ml_dtypes.bfloat16)
    w = randn(n, k, dtype=ml_dtypes.bfloat16)
    b = randn(n)
    xs = [x, w, b] if bias else [x, w]
    (y,) = run("linear", *xs)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = np.einsum("...k,nk->...n", x64, w64) + (b.astype(np.float64) if bias else 0)
    assert y.dtype == np.float32 and y.shape == (*lead, n)
    assert rel(y, ref) < 1e-6


def test_linear_rows_are_tiling_independent():
    x, w = randn(7, 48), randn(40, 48)
    (full,) = run("linear", x, w)
    (rows,) = run("linear", x[2:5], w)
    (cols,) = run("linear", x, w[8:24])
    np.testing.assert_array_equal(full[2:5], rows)
    np.testing.assert_array_equal(full[:, 8:24], cols)


def test_matmul_broadcasts_batch_dims():
    a, b = randn(2, 1, 5, 6), randn(3, 6, 4)
    (y,) = run("matmul", a, b)
    ref = np.zeros((2, 3, 5, 4))
    for i in range(2):
        for j in range(3):
            ref[i, j] = a[i, 0].astype(np.float64) @ b[j].astype(np.float64)
    assert rel(y, ref) < 1e-6


@pytest.mark.parametrize("name,fn", [("add", np.add), ("mul", np.multiply)])
def test_add_mul(name, fn):
    a, b = randn(4, 1, 6), randn(3, 6)
    (y,) = run(name, a, b)
    assert y.shape == (4, 3, 6)
    assert rel(y, fn(a.astype(np.float64), b.astype(np.float64))) < 1e-7


def _silu(x):
    return x / (1.0 + np.exp(-x))


def test_silu_gelu():
    x = randn(5, 33) * 3
    x64 = x.astype(np.float64)
    (y,) = run("silu", x)
    assert rel(y, _silu(x64)) < 1e-6
    (g,) = run("gelu", x, approximate="none")
    ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x64.ravel()]).reshape(x.shape)
    assert rel(g, ref) < 1e-6
    (gt,) = run("gelu", x)
    ref_t = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    assert rel(gt, ref_t) < 1e-6
    assert rel(gt, ref) > 1e-6  # the two approximations differ


def test_silu_mul_both_forms():
    g, u = randn(3, 20), randn(3, 20)
    ref = _silu(g.astype(np.float64)) * u.astype(np.float64)
    (y2,) = run("silu_mul", g, u)
    (y1,) = run("silu_mul", np.concatenate([g, u], -1))
    assert rel(y2, ref) < 1e-6
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(axis):
    x = randn(4, 7, 9) * 4
    (y,) = run("softmax", x, axis=axis)
    e = np.exp(x.astype(np.float64) - x.max(axis=axis, keepdims=True))
    assert rel(y, e / e.sum(axis=axis, keepdims=True)) < 1e-6


def test_cast_and_allreduce():
    x = randn(3, 5) * 10
    (i,) = run("cast", x, dtype=DType.i32)
    np.testing.assert_array_equal(i, np.trunc(x).astype(np.int32))
    (f,) = run("cast", x.astype(ml_dtypes.bfloat16), dtype=DType.f32)
    assert f.dtype == np.float32 and rel(f, x) < 1e-2
    (a,) = run("allreduce", x)
    np.testing.assert_array_equal(a, x)


# ------------------------------------------------------------------ norms


@pytest.mark.parametrize("shape", [(3, 64), (2, 4, 24)])
def test_rmsnorm(shape):
    x, w = randn(*shape), randn(shape[-1])
    (y,) = run("rmsnorm", x, w, eps=1e-5)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert rel(y, ref) < 1e-6


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm(bias):
    x, w, b = randn(5, 48) + 2, randn(48), randn(48)
    (y,) = run("layernorm", *([x, w, b] if bias else [x, w]))
    x64 = x.astype(np.float64)
    mu, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(var + 1e-5) * w + (b if bias else 0)
    assert rel(y, ref) < 1e-6


def test_head_rmsnorm_and_row_independence():
    x, w = randn(3, 4, 16), randn(16)
    (y,) = run("head_rmsnorm", x, w)
    for t in range(3):
        for h in range(4):
            v = x[t, h].astype(np.float64)
            ref = v / math.sqrt(float((v ** 2).mean()) + 1e-6) * w
            assert rel(y[t, h], ref) < 1e-6
    (part,) = run("head_rmsnorm", x[1:2, 2:3], w)
    np.testing.assert_array_equal(part, y[1:2, 2:3])


# ------------------------------------------------------------------ rope and attention


def _rope_hand(x, pos, theta, style, rd):
    t = x.shape[0]
    out = x.astype(np.float64).copy()
    for ti in range(t):
        for i in range(rd // 2):
            ang = pos[ti] * theta ** (-2.0 * i / rd)
            c, s = math.cos(ang), math.sin(ang)
            a, b = (i, i + rd // 2) if style == "neox" else (2 * i, 2 * i + 1)
            xa, xb = x[ti, :, a].astype(np.float64), x[ti, :, b].astype(np.float64)
            out[ti, :, a] = xa * c - xb * s
            out[ti, :, b] = xb * c + xa * s
    return out


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("rd", [0, 8])
def test_rope(style, rd):
    x = randn(5, 3, 16)
    pos = RNG.integers(0, 500, 5).astype(np.int32)
    (y,) = run("rope", x, pos, theta=10000.0, style=style, rotary_dim=rd)
    ref = _rope_hand(x, pos, 10000.0, style, rd or 16)
    assert rel(y, ref) < 1e-5  # the angle is formed in float32, as HuggingFace does
    if rd:
        np.testing.assert_array_equal(y[..., rd:], x[..., rd:])


def test_rope_styles_differ_and_position_zero_is_identity():
    x = randn(2, 2, 8)
    pos = np.array([3, 7], np.int32)
    (a,) = run("rope", x, pos, style="neox")
    (b,) = run("rope", x, pos, style="interleaved")
    assert rel(a, b) > 1e-3
    (z,) = run("rope", x, np.zeros(2, np.int32))
    np.testing.assert_array_equal(z, x)


def _llama3_freq(i, rd, theta, factor, lo, hi, old):
    """Meta's llama3 scaling of one frequency, written out (float64 scalars)."""
    f = theta ** (-2.0 * i / rd)
    wavelen = 2 * math.pi / f
    if wavelen < old / hi:
        return f
    if wavelen > old / lo:
        return f / factor
    s = (old / wavelen - lo) / (hi - lo)
    return (1 - s) * f / factor + s * f


def test_rope_llama3_scaling():
    x = randn(6, 3, 16)
    pos = RNG.integers(0, 3000, 6).astype(np.int32)
    kw = dict(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position=64)
    (y,) = run("rope", x, pos, **kw)
    ref = x.astype(np.float64).copy()
    for t in range(6):
        for i in range(8):
            ang = pos[t] * _llama3_freq(i, 16, 500000.0, 8.0, 1.0, 4.0, 64.0)
            c, s = math.cos(ang), math.sin(ang)
            a, b = x[t, :, i].astype(np.float64), x[t, :, i + 8].astype(np.float64)
            ref[t, :, i], ref[t, :, i + 8] = a * c - b * s, b * c + a * s
    assert rel(y, ref) < 1e-5                                     # angles formed in float32, as HF does
    (plain,) = run("rope", x, pos, theta=500000.0)
    assert rel(plain, ref) > 1e-2                                 # the scaling changes the result
    (one,) = run("rope", x, pos, **{**kw, "factor": 1.0})         # factor 1 is exactly no scaling
    np.testing.assert_array_equal(one, plain)
    (z,) = run("rope", x, np.zeros(6, np.int32), **kw)
    np.testing.assert_array_equal(z, x)


def _dense_attention(q, k, v, causal=True, scale=None):
    """Loop-based float64 GQA attention over one sequence."""
    t, hq, d = q.shape
    s_len, hkv = k.shape[0], k.shape[1]
    scale = scale or 1 / math.sqrt(d)
    out = np.zeros((t, hq, d))
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(t):
            n = i + 1 if causal else s_len
            sc = np.array([float(q[i, h].astype(np.float64) @ k[j, kh].astype(np.float64)) for j in range(n)])
            p = np.exp((sc - sc.max()) * scale)
            p /= p.sum()
            out[i, h] = p @ v[:n, kh].astype(np.float64)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (6, 1)])
def test_attention(causal, heads):
    hq, hkv = heads
    q, k, v = randn(6, hq, 8), randn(6, hkv, 8), randn(6, hkv, 8)
    (y,) = run("attention", q, k, v, causal=causal)
    assert rel(y, _dense_attention(q, k, v, causal)) < 1e-6
    (ys,) = run("attention", q, k, v, causal=causal, scale=0.5)
    assert rel(ys, _dense_attention(q, k, v, causal, scale=0.5)) < 1e-6


def test_paged_attention_matches_dense_causal_attention():
    hq, hkv, d, page, pps = 4, 2, 8, 4, 5
    lens = [9, 3, 14]
    n_pages = 20
    perm = RNG.permutation(n_pages)
    table = perm[: len(lens) * pps].reshape(len(lens), pps).astype(np.int32)  # pages scattered
    kc = np.full((n_pages, page, hkv, d), np.nan, np.float32)  # never-written slots must not be read
    vc = np.full_like(kc, np.nan)
    seqs = {r: (randn(n, hq, d), randn(n, hkv, d), randn(n, hkv, d)) for r, n in enumerate(lens)}
    # prefill: every token of every request in one call, shuffled, with a padding token
    toks = [(r, p) for r, n in enumerate(lens) for p in range(n)]
    order = RNG.permutation(len(toks))
    toks = [toks[i] for i in order] + [(-1, 0)]
    q = np.stack([seqs[r][0][p] if r >= 0 else randn(hq, d) for r, p in toks])
    k = np.stack([seqs[r][1][p] if r >= 0 else randn(hkv, d) for r, p in toks])
    v = np.stack([seqs[r][2][p] if r >= 0 else randn(hkv, d) for r, p in toks])
    pos = np.array([p for _, p in toks], np.int32)
    sid = np.array([r for r, _ in toks], np.int32)
    (out,) = run("paged_attention", q, k, v, kc, vc, table, pos, sid)
    assert np.all(out[-1] == 0)  # padding: output 0
    for i, (r, p) in enumerate(toks[:-1]):
        ref = _dense_attention(*(a[: p + 1] for a in seqs[r]))[p]
        assert rel(out[i], ref) < 1e-6
    for r, n in enumerate(lens):  # the caches hold every token at its page and slot
        for p in range(n):
            np.testing.assert_array_equal(kc[table[r, p // page], p % page], seqs[r][1][p])
            np.testing.assert_array_equal(vc[table[r, p // page], p % page], seqs[r][2][p])
    written = sum(lens)
    assert np.count_nonzero(~np.isnan(kc[..., 0, 0])) == written  # padding wrote nothing

    # decode: one more token for requests 2 and 0 (batch order differs from request order)
    new = {r: (randn(1, hq, d), randn(1, hkv, d), randn(1, hkv, d)) for r in (2, 0)}
    q2 = np.concatenate([new[2][0], new[0][0]])
    k2 = np.concatenate([new[2][1], new[0][1]])
    v2 = np.concatenate([new[2][2], new[0][2]])
    (o2,) = run("paged_attention", q2, k2, v2, kc, vc, table, np.array([lens[2], lens[0]], np.int32),
                np.array([2, 0], np.int32))
    for i, r in enumerate((2, 0)):
        full = [np.concatenate([a, b]) for a, b in zip(seqs[r], new[r], strict=True)]
        ref = _dense_attention(*full)[-1]
        assert rel(o2[i], ref) < 1e-6


def test_paged_attention_rounds_into_a_bf16_cache_and_checks_addresses():
    kc = np.zeros((4, 2, 1, 4), ml_dtypes.bfloat16)
    vc = np.zeros_like(kc)
    q, k, v = randn(1, 2, 4), randn(1, 1, 4), randn(1, 1, 4)
    table = np.array([[3, 1]], np.int32)
    run("paged_attention", q, k, v, kc, vc, table, np.array([2], np.int32), np.array([0], np.int32))
    np.testing.assert_array_equal(kc[1, 0], k[0].astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="outside"):
        run("paged_attention", q, k, v, kc, vc, table, np.array([4], np.int32), np.array([0], np.int32))
    with pytest.raises(ValueError, match="page table"):
        run("paged_attention", q, k, v, kc, vc, table, np.array([0], np.int32), np.array([1], np.int32))


# ------------------------------------------------------------------ layout and indexing


def test_embedding():
    table = randn(10, 6, dtype=ml_dtypes.bfloat16)
    ids = np.array([[1, 9], [0, 1]], np.int32)
    (y,) = run("embedding", ids, table)
    assert y.shape == (2, 2, 6)
    np.testing.assert_array_equal(y[0, 1], table[9].astype(np.float32))
    with pytest.raises(ValueError, match="out of range"):
        run("embedding", np.array([10], np.int32), table)


def test_reshape_split_concat_transpose():
    x = randn(3, 4, 6)
    (r,) = run("reshape", x, shape=("B", -1), dims={"B": 3})
    np.testing.assert_array_equal(r, x.reshape(3, 24))
    a, b, c = run("split", x, sizes=(1, 2, 3))
    np.testing.assert_array_equal(b, x[..., 1:3])
    assert c.shape == (3, 4, 3)
    (cat,) = run("concat", a, b, c)
    np.testing.assert_array_equal(cat, x)
    (cat0,) = run("concat", x, x[:1], axis=0)
    assert cat0.shape == (4, 4, 6)
    (t,) = run("transpose", x, perm=(2, 0, 1))
    np.testing.assert_array_equal(t, x.transpose(2, 0, 1))


def test_argmax():
    x = randn(4, 3, 17)
    (y,) = run("argmax", x)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, x.argmax(-1))
    (y0,) = run("argmax", x, axis=0)
    np.testing.assert_array_equal(y0, x.argmax(0))


# ------------------------------------------------------------------ sample


def test_splitmix64_test_vector():
    # first outputs of splitmix64 seeded with 0 (state += golden gamma, then the finaliser)
    g = 0x9E3779B97F4A7C15
    got = mix64(np.array([0, g], np.uint64))
    assert [int(v) for v in got] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_sample_uniforms_are_uniform_and_depend_on_every_input():
    u = sample_uniforms(3, np.arange(64), np.arange(1000))
    assert np.all((u > 0) & (u < 1)) and abs(u.mean() - 0.5) < 0.01
    assert not np.array_equal(u, sample_uniforms(4, np.arange(64), np.arange(1000)))
    assert not np.array_equal(u[0], u[1])


def test_sample_is_deterministic_and_row_independent():
    logits = randn(6, 50) * 2
    pos = RNG.integers(0, 1000, 6).astype(np.int32)
    kw = dict(temperature=0.9, top_k=10, top_p=0.9, seed=11)
    (a,) = run("sample", logits, pos, **kw)
    (b,) = run("sample", logits, pos, **kw)
    np.testing.assert_array_equal(a, b)
    perm = RNG.permutation(6)
    (c,) = run("sample", logits[perm], pos[perm], **kw)
    np.testing.assert_array_equal(c, a[perm])
    (one,) = run("sample", logits[2:3], pos[2:3], **kw)
    assert one[0] == a[2]
    draws = [run("sample", logits, pos, temperature=1.0, seed=s)[0] for s in range(8)]
    assert len({tuple(d) for d in draws}) > 1  # the seed matters


def test_sample_greedy_cases_equal_argmax():
    logits = randn(5, 40)
    pos = np.arange(5, dtype=np.int32)
    for kw in (dict(top_k=1, temperature=1.3, seed=5), dict(temperature=0.0)):
        (y,) = run("sample", logits, pos, **kw)
        np.testing.assert_array_equal(y, logits.argmax(-1))


def test_sample_distribution_and_filters():
    z = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    n = 4000
    logits = np.tile(z, (n, 1))
    pos = np.arange(n, dtype=np.int32)
    (y,) = run("sample", logits, pos, temperature=1.0, seed=1)
    p = np.exp(z.astype(np.float64))
    p /= p.sum()
    freq = np.bincount(y, minlength=5) / n
    assert np.abs(freq - p).max() < 0.03
    (yk,) = run("sample", logits, pos, top_k=2, seed=1)
    assert set(np.unique(yk)) == {0, 1}
    # top_p: p = [.56, .21, .13, .08, .03]; 0.7 keeps tokens 0 and 1 (0.56 < 0.7 <= 0.77)
    (yp,) = run("sample", logits, pos, top_p=0.7, seed=1)
    assert set(np.unique(yp)) == {0, 1}
    (yt,) = run("sample", logits, pos, temperature=0.25, seed=1)
    assert np.mean(yt == 0) > 0.95  # low temperature sharpens


# ------------------------------------------------------------------ inference


def test_infer_results():
    assert infer("linear", T("bf16", "B", 64), T("bf16", 32, 64)) == (T("bf16", "B", 32),)
    assert infer("embedding", T("i32", "B"), T("bf16", 100, 8)) == (T("bf16", "B", 8),)
    assert infer("matmul", T("f32", 2, 1, 3, 4), T("f32", 5, 4, 6)) == (T("f32", 2, 5, 3, 6),)
    assert infer("silu_mul", T("bf16", "B", 10)) == (T("bf16", "B", 5),)
    assert infer("reshape", T("bf16", "B", 64), shape=("B", 4, 16)) == (T("bf16", "B", 4, 16),)
    assert infer("reshape", T("bf16", "B", 4, 16), shape=("B", -1)) == (T("bf16", "B", 64),)
    assert infer("reshape", T("bf16", "B", 4, 16), shape=(-1, 64)) == (T("bf16", "B", 64),)
    assert infer("reshape", T("bf16", 6, 4), shape=(2, -1)) == (T("bf16", 2, 12),)
    assert infer("split", T("bf16", "B", 10), sizes=(4, 6)) == (T("bf16", "B", 4), T("bf16", "B", 6))
    assert infer("concat", T("f32", "B", 2), T("f32", "B", 3)) == (T("f32", "B", 5),)
    assert infer("transpose", T("f32", "B", 2, 3), perm=(1, 2, 0)) == (T("f32", 2, 3, "B"),)
    assert infer("cast", T("bf16", "B", 3), dtype=DType.f32) == (T("f32", "B", 3),)
    assert infer("argmax", T("bf16", "B", 100)) == (T("i32", "B"),)
    assert infer("sample", T("f32", "B", 100), T("i32", "B")) == (T("i32", "B"),)
    q, kv = T("bf16", "B", 8, 64), T("bf16", "B", 2, 64)
    cache, table = T("bf16", 16, 4, 2, 64), T("i32", "R", 4)
    assert infer("paged_attention", q, kv, kv, cache, cache, table, T("i32", "B"), T("i32", "B")) == (q,)
    assert infer("attention", q, kv, kv) == (q,)
    assert infer("rope", q, T("i32", "B")) == (q,)
    assert infer("head_rmsnorm", q, T("bf16", 64)) == (q,)
    assert infer("add", T("f32", "B", 1), T("f32", 5)) == (T("f32", "B", 5),)


ERRORS = [
    ("linear", (T("bf16", "B", 64), T("bf16", 128, 32)), {},
     "linear: input bf16[B, 64] has inner dim 64 but weight bf16[128, 32] expects 32", 1),
    ("linear", (T("bf16", 3, 4), T("bf16", 5, 4), T("bf16", 4)), {}, "bias bf16[4] must be [5]", 2),
    ("linear", (T("i32", 3, 4), T("bf16", 5, 4)), {}, "must be a float tensor, got i32[3, 4]", 0),
    ("matmul", (T("f32", 2, 3), T("f32", 4, 5)), {}, "a f32[2, 3] has inner dim 3 but b f32[4, 5] has 4", 1),
    ("add", (T("f32", 3, 4), T("f32", 3, 5)), {}, "f32[3, 4] and f32[3, 5] do not broadcast", 1),
    ("mul", (T("f32", 3), T("bf16", 3)), {}, "dtype mismatch: f32[3] vs bf16[3]", 1),
    ("rmsnorm", (T("bf16", "B", 64), T("bf16", 32)), {}, "weight bf16[32] must be [64]", 1),
    ("layernorm", (T("bf16", 2, 8), T("bf16", 8), T("bf16", 7)), {}, "bias bf16[7] must be [8]", 2),
    ("head_rmsnorm", (T("bf16", 4, 64), T("bf16", 64)), {}, "must have rank 3, got bf16[4, 64]", 0),
    ("silu_mul", (T("bf16", 2, 7),), {}, "bf16[2, 7] must have an even last dim", 0),
    ("silu_mul", (T("bf16", 2, 8), T("bf16", 2, 4)), {}, "gate bf16[2, 8] and up bf16[2, 4]", 1),
    ("softmax", (T("f32", 2, 3),), {"axis": 2}, "axis 2 is out of range for rank 2", None),
    ("rope", (T("bf16", "B", 4, 64), T("i32", 3)), {}, "positions i32[3] must have one entry per token", 1),
    ("rope", (T("bf16", 3, 4, 64), T("i32", 3)), {"rotary_dim": 65}, "rotary_dim 65 must be even", None),
    ("rope", (T("bf16", 3, 4, 64), T("i32", 3)), {"scaling": "llama3", "factor": 0.0},
     "scaling factor must be positive", None),
    ("rope", (T("bf16", 3, 4, 64), T("i32", 3)), {"scaling": "llama3", "low_freq_factor": 4.0},
     "needs 0 < low_freq_factor < high_freq_factor, got 4.0 and 4.0", None),
    ("attention", (T("bf16", 3, 6, 64), T("bf16", 3, 4, 64), T("bf16", 3, 4, 64)), {},
     "q bf16[3, 6, 64] has 6 heads, not a multiple of the 4 kv heads of k bf16[3, 4, 64]", 1),
    ("attention", (T("bf16", 3, 4, 64), T("bf16", 3, 2, 32), T("bf16", 3, 2, 32)), {},
     "q bf16[3, 4, 64] has head dim 64 but k bf16[3, 2, 32] has 32", 1),
    ("attention", (T("bf16", 3, 4, 64), T("bf16", 3, 2, 64), T("bf16", 2, 2, 64)), {},
     "v bf16[2, 2, 64] must have the shape of k bf16[3, 2, 64]", 2),
    ("paged_attention", (T("bf16", "B", 4, 64), T("bf16", "B", 2, 64), T("bf16", "B", 2, 64),
                         T("bf16", 8, 4, 3, 64), T("bf16", 8, 4, 3, 64), T("i32", 2, 4), T("i32", "B"),
                         T("i32", "B")), {},
     "k_cache bf16[8, 4, 3, 64] must be [pages, page_size, 2, 64] to hold k bf16[B, 2, 64]", 3),
    ("paged_attention", (T("bf16", "B", 4, 64), T("bf16", "B", 2, 64), T("bf16", "B", 2, 64),
                         T("bf16", 8, 4, 2, 64), T("bf16", 8, 4, 2, 64), T("f32", 2, 4), T("i32", "B"),
                         T("i32", "B")), {}, "page_table must be an i32 or i64 tensor, got f32[2, 4]", 5),
    ("paged_attention", (T("bf16", "B", 4, 64), T("bf16", "B", 2, 64), T("bf16", "B", 2, 64),
                         T("bf16", 8, 4, 2, 64), T("bf16", 8, 4, 2, 64), T("i32", 2, 4), T("i32", "B"),
                         T("i32", 5)), {},
     "seq_ids i32[5] must have one entry per token of q bf16[B, 4, 64]", 7),
    ("embedding", (T("f32", 3), T("bf16", 10, 4)), {}, "ids must be an i32 or i64 tensor, got f32[3]", 0),
    ("reshape", (T("bf16", "B", 64),), {"shape": (-1, -1)}, "more than one -1", None),
    ("reshape", (T("bf16", "B", 64),), {"shape": ("B", 4, 15)}, "input shape [B, 64] (64 elements", None),
    ("reshape", (T("bf16", "B", 64),), {"shape": (4, 16)},
     "symbolic dim 'B' of input shape [B, 64] has no place", None),
    ("reshape", (T("bf16", 8, 64),), {"shape": ("B", 64)},
     "symbolic dim 'B' of target shape [B, 64] is not", None),
    ("reshape", (T("bf16", 8, 64),), {"shape": (-1, 7)}, "cannot be split into target shape [-1, 7]", None),
    ("split", (T("bf16", 2, 10),), {"sizes": (4, 5)}, "sizes [4, 5] sum to 9 but axis 1 of bf16[2, 10] is 10",
     None),
    ("split", (T("bf16", "B", 10),), {"sizes": (1, 1), "axis": 0}, "symbolic dim 'B'", None),
    ("concat", (T("f32", 2, 3), T("f32", 4, 3)), {}, "f32[2, 3] and f32[4, 3] differ in dim 0", 1),
    ("concat", (T("f32", 2, 3), T("bf16", 2, 3)), {}, "dtype mismatch: f32[2, 3] vs bf16[2, 3]", 1),
    ("transpose", (T("f32", 2, 3),), {"perm": (0, 0)},
     "perm [0, 0] is not a permutation of the 2 axes", None),
    ("argmax", (T("f32", 2, 3),), {"axis": -3}, "axis -3 is out of range", None),
    ("sample", (T("f32", 3, 10), T("i32", 4)), {}, "positions i32[4] must have one entry per row of logits "
                                                   "f32[3, 10]", 1),
    ("sample", (T("f32", 3, 10), T("i32", 3)), {"top_p": 0.0}, "top_p must be in (0, 1]", None),
    ("sample", (T("f32", 3, 10), T("i32", 3)), {"top_k": -1}, "top_k must be >= 0", None),
]


@pytest.mark.parametrize("name,types,attrs,message,operand", ERRORS, ids=[e[0] for e in ERRORS])
def test_infer_errors(name, types, attrs, message, operand):
    with pytest.raises(ShapeError) as e:
        infer(name, *types, **attrs)
    assert message in str(e.value)
    assert e.value.operand == operand


def test_errors_reach_the_verifier_with_locations():
    from mpkir.parser import parse
    from mpkir.verify import analyze

    src = (
        'model "m"\ndim B <= 4\nweight w : bf16[128, 32] = "w"\n'
        "graph main(%x: bf16[B, 64]) -> (bf16[B, 128]) {\n"
        "  %y = linear(%x, @w)\n  return %y\n}\n"
    )
    a = analyze(parse(src, "m.mpk"))
    (d,) = [d for d in a.diagnostics if d.severity == "error"]
    assert "input bf16[B, 64] has inner dim 64 but weight bf16[128, 32] expects 32" in d.message
    assert d.span.line == 5 and d.span.col == 19  # points at @w


def test_row_and_head_slices_give_identical_bits():
    """The task simulator runs ops on slices; per-row results must not depend on the other rows."""
    x, w = randn(9, 40), randn(40)
    (full,) = run("rmsnorm", x, w)
    (rows,) = run("rmsnorm", x[3:5], w)
    np.testing.assert_array_equal(full[3:5], rows)
    (sm,) = run("softmax", x)
    (sm_rows,) = run("softmax", x[4:9])
    np.testing.assert_array_equal(sm[4:9], sm_rows)
    q, k, v = randn(7, 6, 16), randn(7, 2, 16), randn(7, 2, 16)
    (att,) = run("attention", q, k, v)
    (head4,) = run("attention", q[:, 3:6], k[:, 1:2], v[:, 1:2])  # q heads 3..5 read kv head 1
    np.testing.assert_array_equal(att[:, 3:6], head4)


def test_paged_attention_token_alone_equals_token_in_batch():
    hq, hkv, d, page = 4, 2, 8, 4
    kc = np.zeros((6, page, hkv, d), np.float32)
    vc = np.zeros_like(kc)
    table = np.array([[4, 0, 2], [1, 5, 3]], np.int32)
    n = 7
    q, k, v = randn(n + 3, hq, d), randn(n + 3, hkv, d), randn(n + 3, hkv, d)
    pos = np.array([*range(n), 0, 1, 2], np.int32)
    sid = np.array([0] * n + [1, 1, 1], np.int32)
    (batch,) = run("paged_attention", q, k, v, kc, vc, table, pos, sid)
    for t in (0, 5, n + 2):  # the caches now hold everything; rewriting the same values is a no-op
        (alone,) = run("paged_attention", q[t:t + 1], k[t:t + 1], v[t:t + 1], kc, vc, table, pos[t:t + 1],
                       sid[t:t + 1])
        np.testing.assert_array_equal(alone[0], batch[t])
