"""Position and attention operators: rope, attention (one sequence, no cache), paged_attention.

Scores, softmax and the weighted sum of values run in float64 per (head, query) row and are rounded
to float32 once.  In ``attention`` masked positions get -inf before the softmax (weight exactly 0);
``paged_attention`` computes each token over exactly its keys 0..position, so a token's output does not
depend on the other tokens in the batch.
"""

from __future__ import annotations

import numpy as np

from mpkir.ir import TensorType
from mpkir.ops.base import AttrSpec, OpDef, ShapeError, expect_float, expect_int, expect_rank, same_dim
from mpkir.ops.common import f64, out32

# ---- rope
ROPE_SCALINGS = ("none", "llama3")


def _rope_infer(ts, attrs):
    x, pos = ts
    expect_float(x, 0, "rope input")
    expect_rank(x, 3, 0, "rope input [tokens, heads, head_dim]")
    expect_int(pos, 1, "rope positions")
    expect_rank(pos, 1, 1, "rope positions")
    if not same_dim(pos.shape[0], x.shape[0]):
        raise ShapeError(f"rope: positions {pos} must have one entry per token of input {x}", 1)
    d = x.shape[2]
    rd = attrs.get("rotary_dim", 0) or d
    if isinstance(d, str):
        raise ShapeError(f"rope: head dim of {x} must be a number", 0)
    if rd < 0 or rd > d or rd % 2:
        raise ShapeError(f"rope: rotary_dim {rd} must be even and at most the head dim {d} of {x}",
                         attr="rotary_dim")
    if attrs.get("theta", 10000.0) <= 0:
        raise ShapeError("rope: theta must be positive", attr="theta")
    if attrs.get("scaling", "none") == "llama3":
        if attrs.get("factor", 1.0) <= 0:
            raise ShapeError(f"rope: scaling factor must be positive, got {attrs.get('factor')}",
                             attr="factor")
        lo, hi = attrs.get("low_freq_factor", 1.0), attrs.get("high_freq_factor", 4.0)
        if not 0 < lo < hi:
            raise ShapeError(f"rope: llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{lo} and {hi}", attr="high_freq_factor" if lo > 0 else "low_freq_factor")
        if attrs.get("original_max_position", 8192) <= 0:
            raise ShapeError("rope: original_max_position must be positive", attr="original_max_position")
    return (x,)


def rope_inv_freq(rd: int, theta: float, scaling: str = "none", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position: int = 8192) -> np.ndarray:
    """The inverse frequencies θ^(-2i/rd), i < rd/2, as float64, with the rope op's scaling applied.

    ``scaling="llama3"`` (Llama-3.1/3.2 ``rope_scaling``): with wavelength λ = 2π / f,
    low_λ = original_max_position / low_freq_factor and high_λ = original_max_position / high_freq_factor,
    frequencies with λ > low_λ are divided by ``factor``, those with λ < high_λ are kept, and those in
    between are interpolated: s = (original_max_position / λ - low) / (high - low),
    f' = (1 - s) · f / factor + s · f.  ``factor == 1`` is exactly no scaling.  The rope op and every
    backend round these to float32 once (see :func:`rope_tables`).
    """
    i = np.arange(rd // 2, dtype=np.float64)
    inv = 1.0 / theta ** (2.0 * i / rd)
    if scaling == "none" or factor == 1.0:
        return inv
    if scaling != "llama3":
        raise ValueError(f"unknown rope scaling {scaling!r} (known: {', '.join(ROPE_SCALINGS)})")
    old = float(original_max_position)
    low_wl, high_wl = old / low_freq_factor, old / high_freq_factor
    wl = 2.0 * np.pi / inv
    scaled = np.where(wl > low_wl, inv / factor, inv)
    smooth = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
    medium = (wl >= high_wl) & (wl <= low_wl)
    return np.where(medium, smoothed, scaled)


def rope_scaling_attrs(attrs) -> dict:
    """The scaling keyword arguments of :func:`rope_inv_freq` from resolved rope attributes."""
    return {k: attrs.get(k, d) for k, d in (("scaling", "none"), ("factor", 1.0), ("low_freq_factor", 1.0),
                                            ("high_freq_factor", 4.0), ("original_max_position", 8192))}


def rope_tables(positions, rd: int, theta: float, **scaling) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, [T, rd/2] float64, of the angles pos · inv_freq formed in float32.

    inv_freq = float32(:func:`rope_inv_freq`) (computed in float64, rounded once); angle = float32(pos) ·
    inv_freq in float32 (as HuggingFace does); cos/sin are taken in float64 of that float32 angle.
    """
    inv_freq = rope_inv_freq(rd, theta, **scaling).astype(np.float32)
    ang = np.asarray(positions).astype(np.float32)[:, None] * inv_freq[None, :]
    ang = ang.astype(np.float64)
    return np.cos(ang), np.sin(ang)


def _rope_ref(xs, attrs, ctx):
    x = f64(xs[0])
    d = x.shape[-1]
    rd = attrs.get("rotary_dim", 0) or d
    cos, sin = rope_tables(xs[1], rd, attrs.get("theta", 10000.0), **rope_scaling_attrs(attrs))
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = x.copy()
    h = rd // 2
    if attrs.get("style", "neox") == "neox":
        x1, x2 = x[..., :h], x[..., h:rd]
        out[..., :h] = x1 * cos - x2 * sin
        out[..., h:rd] = x2 * cos + x1 * sin
    else:
        x1, x2 = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2] = x1 * cos - x2 * sin
        out[..., 1:rd:2] = x2 * cos + x1 * sin
    return (out32(out),)


ROPE = OpDef(
    "rope", ("x", "positions"),
    (AttrSpec("theta", "float", 10000.0),
     AttrSpec("style", "enum", "neox", ("neox", "interleaved"),
              "neox: pairs (i, i + rd/2) (rotate-half, Llama/Qwen); interleaved: pairs (2i, 2i+1) (GPT-J)"),
     AttrSpec("rotary_dim", "int", 0, doc="leading dims of each head that rotate; 0 = all"),
     AttrSpec("scaling", "enum", "none", ROPE_SCALINGS,
              "frequency scaling: none, or llama3 (Llama-3.1/3.2 rope_scaling, rope_type llama3)"),
     AttrSpec("factor", "float", 1.0, doc="llama3: low frequencies are divided by factor; 1 = no scaling"),
     AttrSpec("low_freq_factor", "float", 1.0, doc="llama3: wavelengths above original_max_position / "
              "low_freq_factor are scaled"),
     AttrSpec("high_freq_factor", "float", 4.0, doc="llama3: wavelengths below original_max_position / "
              "high_freq_factor are kept"),
     AttrSpec("original_max_position", "int", 8192,
              doc="llama3: original_max_position_embeddings of the pretrained model")),
    _rope_infer, _rope_ref,
    "rotary position embedding of x [tokens, heads, head_dim] at positions [tokens]: pair (a, b) with "
    "frequency θ^(-2i/rd) (llama3-scaled when scaling=llama3) → (a·cos − b·sin, b·cos + a·sin)")


# ---- shared attention core
def _check_qkv(q: TensorType, k: TensorType, v: TensorType, op: str) -> None:
    expect_float(q, 0, f"{op} q")
    expect_rank(q, 3, 0, f"{op} q [tokens, heads, head_dim]")
    expect_rank(k, 3, 1, f"{op} k [tokens, kv_heads, head_dim]")
    expect_rank(v, 3, 2, f"{op} v [tokens, kv_heads, head_dim]")
    if not same_dim(k.shape[0], q.shape[0]):
        raise ShapeError(f"{op}: k {k} and q {q} must have the same number of tokens", 1)
    if not same_dim(q.shape[2], k.shape[2]):
        raise ShapeError(f"{op}: q {q} has head dim {q.shape[2]} but k {k} has {k.shape[2]}", 1)
    if k.rank != v.rank or not all(same_dim(a, b) for a, b in zip(k.shape, v.shape, strict=True)):
        raise ShapeError(f"{op}: v {v} must have the shape of k {k}", 2)
    for i, t in ((1, k), (2, v)):
        if t.dtype != q.dtype:
            raise ShapeError(f"{op}: dtype mismatch: q {q} vs {t}", i)
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int) and (hkv == 0 or hq % hkv):
        raise ShapeError(f"{op}: q {q} has {hq} heads, not a multiple of the {hkv} kv heads of k {k}", 1)


def _scale(attrs, d: int) -> float:
    s = attrs.get("scale", 0.0)
    return s if s else 1.0 / np.sqrt(d)


def attend(q64: np.ndarray, k64: np.ndarray, v64: np.ndarray, qpos: np.ndarray, scale: float,
           causal: bool = True) -> np.ndarray:
    """Grouped-query attention of n queries over L keys, all float64.

    q64 [n, Hq, D]; k64, v64 [L, Hkv, D]; query i sees keys j <= qpos[i] when causal.
    Returns [n, Hq, D] float64.  Head h reads kv head h // (Hq / Hkv).
    """
    n, hq, d = q64.shape
    big_l, hkv, _ = k64.shape
    g = hq // hkv
    qg = q64.reshape(n, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * n, d)
    kt = np.ascontiguousarray(k64.transpose(1, 2, 0))          # [Hkv, D, L]
    s = np.matmul(qg, kt) * scale                               # [Hkv, g*n, L]
    if causal:
        allowed = np.arange(big_l)[None, :] <= np.asarray(qpos)[:, None]      # [n, L]
        allowed = np.broadcast_to(allowed[None], (g, n, big_l)).reshape(g * n, big_l)
        s = np.where(allowed[None], s, -np.inf)
    s = np.ascontiguousarray(s)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - m)
    p = e / np.sum(e, axis=-1, keepdims=True)
    o = np.matmul(p, np.ascontiguousarray(v64.transpose(1, 0, 2)))     # [Hkv, g*n, D]
    return o.reshape(hkv, g, n, d).transpose(2, 0, 1, 3).reshape(n, hq, d)


# ---- attention: one sequence, no cache
def _attention_infer(ts, attrs):
    q, k, v = ts
    _check_qkv(q, k, v, "attention")
    return (q,)


def _attention_ref(xs, attrs, ctx):
    q, k, v = f64(xs[0]), f64(xs[1]), f64(xs[2])
    t = q.shape[0]
    o = attend(q, k, v, np.arange(t), _scale(attrs, q.shape[2]), attrs.get("causal", True))
    return (out32(o),)


ATTENTION = OpDef("attention", ("q", "k", "v"),
                  (AttrSpec("causal", "bool", True), AttrSpec("scale", "float", 0.0, doc="0 = 1/√head_dim")),
                  _attention_infer, _attention_ref,
                  "softmax(q·kᵀ·scale) · v for one sequence (token i at position i), GQA")


# ---- paged attention
def _paged_infer(ts, attrs):
    q, k, v, kc, vc, table, pos, sid = ts
    _check_qkv(q, k, v, "paged_attention")
    expect_float(kc, 3, "paged_attention k_cache")
    expect_rank(kc, 4, 3, "paged_attention k_cache [pages, page_size, kv_heads, head_dim]")
    if not (same_dim(kc.shape[2], k.shape[1]) and same_dim(kc.shape[3], k.shape[2])):
        raise ShapeError(f"paged_attention: k_cache {kc} must be [pages, page_size, {k.shape[1]}, "
                         f"{k.shape[2]}] to hold k {k}", 3)
    if vc.dtype != kc.dtype or vc.shape != kc.shape:
        raise ShapeError(f"paged_attention: v_cache {vc} must have the type of k_cache {kc}", 4)
    expect_int(table, 5, "paged_attention page_table")
    expect_rank(table, 2, 5, "paged_attention page_table [requests, pages_per_seq]")
    for i, t, what in ((6, pos, "positions"), (7, sid, "seq_ids")):
        expect_int(t, i, f"paged_attention {what}")
        expect_rank(t, 1, i, f"paged_attention {what}")
        if not same_dim(t.shape[0], q.shape[0]):
            raise ShapeError(f"paged_attention: {what} {t} must have one entry per token of q {q}", i)
    return (q,)


def write_cache(cache: np.ndarray, rows: np.ndarray, table: np.ndarray, pos: np.ndarray, sid: np.ndarray,
                valid: np.ndarray) -> None:
    """cache[page_table[sid, pos // page], pos % page] = rows, for the valid tokens (in place)."""
    if not valid.any():
        return
    page = cache.shape[1]
    r, p = sid[valid], pos[valid]
    pg = table[r, p // page]
    cache[pg, p % page] = np.asarray(rows)[valid].astype(cache.dtype)


def _check_addresses(table, pos, sid, valid, kc) -> None:
    r, p = sid[valid], pos[valid]
    if (r >= table.shape[0]).any():
        raise ValueError(f"paged_attention: seq_id {int(r.max())} has no row in the page table "
                         f"({table.shape[0]} rows)")
    if (p < 0).any() or (p // kc.shape[1] >= table.shape[1]).any():
        raise ValueError(f"paged_attention: a position in {p.tolist()} is outside 0.."
                         f"{table.shape[1] * kc.shape[1] - 1} (pages_per_seq × page_size)")
    for rr in np.unique(r):
        used = table[rr, : int(p[r == rr].max()) // kc.shape[1] + 1]
        if (used < 0).any() or (used >= kc.shape[0]).any():
            raise ValueError(f"paged_attention: page table row {int(rr)} names pages {used.tolist()}, "
                             f"outside 0..{kc.shape[0] - 1}")


def attend_one(q64: np.ndarray, kt: np.ndarray, vt: np.ndarray, scale: float) -> np.ndarray:
    """One query token over all the keys given: q64 [Hq, D]; kt [Hkv, D, L]; vt [Hkv, L, D] (float64).

    The result depends only on these operands (not on other tokens of the batch).
    """
    hq, d = q64.shape
    hkv = kt.shape[0]
    s = np.matmul(q64.reshape(hkv, hq // hkv, d), kt) * scale    # [Hkv, g, L]
    m = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - m)
    p = e / np.sum(e, axis=-1, keepdims=True)
    return np.matmul(p, vt).reshape(hq, d)


def _paged_ref(xs, attrs, ctx):
    q, k, v, kc, vc = xs[0], xs[1], xs[2], xs[3], xs[4]
    table = np.asarray(xs[5]).astype(np.int64)
    pos = np.asarray(xs[6]).astype(np.int64)
    sid = np.asarray(xs[7]).astype(np.int64)
    valid = sid >= 0
    _check_addresses(table, pos, sid, valid, kc)
    write_cache(kc, k, table, pos, sid, valid)
    write_cache(vc, v, table, pos, sid, valid)
    t, hq, d = q.shape
    page = kc.shape[1]
    scale = _scale(attrs, d)
    out = np.zeros((t, hq, d), np.float64)
    q64 = f64(q)
    for r in np.unique(sid[valid]):
        toks = np.nonzero(sid == r)[0]
        length = int(pos[toks].max()) + 1
        pages = table[r, : (length - 1) // page + 1]
        kr = f64(kc[pages].reshape(-1, *kc.shape[2:])[:length])
        vr = f64(vc[pages].reshape(-1, *vc.shape[2:])[:length])
        kt = np.ascontiguousarray(kr.transpose(1, 2, 0))   # [Hkv, D, L]
        vt = np.ascontiguousarray(vr.transpose(1, 0, 2))   # [Hkv, L, D]
        for t in toks:
            n = int(pos[t]) + 1
            out[t] = attend_one(q64[t], kt[:, :, :n], vt[:, :n], scale)
    return (out32(out),)


PAGED_ATTENTION = OpDef(
    "paged_attention",
    ("q", "k", "v", "k_cache", "v_cache", "page_table", "positions", "seq_ids"),
    (AttrSpec("scale", "float", 0.0, doc="0 = 1/√head_dim"),),
    _paged_infer, _paged_ref,
    "writes k/v of token t at position positions[t] of request seq_ids[t] (page page_table[r, p // page], "
    "slot p % page) into the caches, then token t attends causally to positions 0..positions[t] of its "
    "request (GQA); seq_ids[t] < 0 marks padding: no write, output 0",
    mutates=(3, 4))

OPS = (ROPE, ATTENTION, PAGED_ATTENTION)

