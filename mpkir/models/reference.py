"""An independent NumPy implementation of the Llama / Qwen3 forward pass (HuggingFace semantics).

Used as the reference the compiled models are compared against, and as a second engine backend
(:class:`PagedReferenceBackend`) that shows the step function is pluggable.  Nothing here uses the
interpreter or the operator registry: it is written from the HF modelling code's definitions
(RMSNorm, rotate-half RoPE, GQA causal attention, SiLU-gated MLP, Qwen3's per-head q/k norms).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class ReferenceModel:
    """HF-named weights + config → logits, in float64 (or float32) NumPy."""

    def __init__(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any], dtype=np.float64):
        self.cfg = dict(config)
        self.dt = np.dtype(dtype)
        c = self.cfg
        self.L = int(c["num_hidden_layers"])
        self.Hq = int(c["num_attention_heads"])
        self.Hkv = int(c.get("num_key_value_heads") or self.Hq)
        self.D = int(c.get("head_dim") or int(c["hidden_size"]) // self.Hq)
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        rs = c.get("rope_scaling") or c.get("rope_parameters") or {}
        self.theta = float(c.get("rope_theta", rs.get("rope_theta", 10000.0)))
        self.rope_scaling = rs if rs.get("rope_type", rs.get("type")) == "llama3" else None

        def get(name):
            return np.asarray(weights[name]).astype(self.dt)

        self.w = {k: get(k) for k in weights}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        self.qk_norm = "model.layers.0.self_attn.q_norm.weight" in self.w

    # ---------------------------------------------------------------- pieces
    def _rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x, pos):
        """Rotate-half RoPE: x [T, H, D], pos [T]."""
        d = self.D
        inv = 1.0 / (self.theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        if self.rope_scaling is not None:  # Llama-3.1 "llama3" frequency scaling (HF's definition)
            rs = self.rope_scaling
            factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
            old = float(rs["original_max_position_embeddings"])
            wavelen = 2 * np.pi / inv
            smooth = (old / wavelen - lo) / (hi - lo)
            medium = (1 - smooth) * inv / factor + smooth * inv
            inv = np.where(wavelen < old / hi, inv, np.where(wavelen > old / lo, inv / factor, medium))
        ang = np.asarray(pos, dtype=np.float64)[:, None] * inv[None, :]
        cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, None, :].astype(self.dt)
        sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, None, :].astype(self.dt)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        rot = np.concatenate([-x2, x1], -1)
        return x * cos + rot * sin

    def _qkv(self, i, h, pos):
        p = f"model.layers.{i}."
        w = self.w
        T = h.shape[0]
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, self.Hq, self.D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, self.Hkv, self.D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, self.Hkv, self.D)
        if self.qk_norm:
            q = self._rms(q, w[p + "self_attn.q_norm.weight"])
            k = self._rms(k, w[p + "self_attn.k_norm.weight"])
        return self._rope(q, pos), self._rope(k, pos), v

    def _mlp(self, i, x):
        p = f"model.layers.{i}."
        w = self.w
        h = self._rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        return x + (g / (1.0 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T

    def _attend(self, q, ks, vs, qpos, kpos):
        """q [T, Hq, D] against keys/values [S, Hkv, D] with positions; causal by position."""
        rep = self.Hq // self.Hkv
        k = np.repeat(ks, rep, axis=1)
        v = np.repeat(vs, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(self.D)
        mask = np.asarray(kpos)[None, :] > np.asarray(qpos)[:, None]
        s = np.where(mask[None], -np.inf, s)
        s = s - s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        return np.einsum("hts,shd->thd", p, v)

    def _head(self, x):
        return self._rms(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T

    # ---------------------------------------------------------------- whole sequences
    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] of one whole sequence (non-incremental, causal)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.arange(len(ids))
        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.L):
            h = self._rms(x, self.w[f"model.layers.{i}.input_layernorm.weight"])
            q, k, v = self._qkv(i, h, pos)
            a = self._attend(q, k, v, pos, pos).reshape(len(ids), -1)
            x = x + a @ self.w[f"model.layers.{i}.self_attn.o_proj.weight"].T
            x = self._mlp(i, x)
        return self._head(x)

    def greedy(self, prompt: Sequence[int], n: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation: recompute the whole sequence for every token (slow, simple, exact)."""
        seq = list(prompt)
        out: list[int] = []
        for _ in range(n):
            t = int(np.argmax(self.forward(seq)[-1]))
            if t in stop_ids:
                break
            out.append(t)
            seq.append(t)
        return out


class PagedReferenceBackend:
    """The engine's step function over :class:`ReferenceModel`, with a real paged KV cache.

    Same contract as the compiled graph: ``step(tokens, positions, seq_ids, page_table) -> logits``;
    k/v of token t go to page ``page_table[seq_ids[t], positions[t] // page_size]``.
    """

    def __init__(self, model: ReferenceModel, num_pages: int, page_size: int):
        self.m = model
        self.page_size = page_size
        shape = (model.L, num_pages, page_size, model.Hkv, model.D)
        self.kc = np.zeros(shape, model.dt)
        self.vc = np.zeros(shape, model.dt)

    def step(self, tokens, positions, seq_ids, page_table) -> np.ndarray:
        m, P = self.m, self.page_size
        tokens = np.asarray(tokens)
        pos = np.asarray(positions)
        sid = np.asarray(seq_ids)
        T = len(tokens)
        x = m.w["model.embed_tokens.weight"][np.where(sid >= 0, tokens, 0)]
        live = sid >= 0
        for i in range(m.L):
            h = m._rms(x, m.w[f"model.layers.{i}.input_layernorm.weight"])
            q, k, v = m._qkv(i, h, pos)
            for t in np.nonzero(live)[0]:
                pg = page_table[sid[t], pos[t] // P]
                self.kc[i, pg, pos[t] % P] = k[t]
                self.vc[i, pg, pos[t] % P] = v[t]
            a = np.zeros((T, m.Hq, m.D), m.dt)
            for r in np.unique(sid[live]):
                rows = np.nonzero(sid == r)[0]
                n = int(pos[rows].max()) + 1
                kp = np.arange(n)
                pages = np.asarray(page_table[r])[kp // P]
                ks = self.kc[i, pages, kp % P]
                vs = self.vc[i, pages, kp % P]
                a[rows] = m._attend(q[rows], ks, vs, pos[rows], kp)
            x = x + a.reshape(T, -1) @ m.w[f"model.layers.{i}.self_attn.o_proj.weight"].T
            x = m._mlp(i, x)
        logits = m._head(x)
        logits[~live] = 0
        return logits


def random_checkpoint(config: Mapping[str, Any], seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random HF-named weights for a Llama (or, with ``model_type = qwen3``, Qwen3) config."""
    rng = np.random.default_rng(seed)
    c = config
    H = int(c["hidden_size"])
    Hq = int(c["num_attention_heads"])
    Hkv = int(c.get("num_key_value_heads") or Hq)
    D = int(c.get("head_dim") or H // Hq)
    F = int(c["intermediate_size"])
    V = int(c["vocab_size"])

    def lin(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(dtype)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((V, H)).astype(dtype)}
    for i in range(int(c["num_hidden_layers"])):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(H)
        w[p + "post_attention_layernorm.weight"] = norm(H)
        w[p + "self_attn.q_proj.weight"] = lin(Hq * D, H)
        w[p + "self_attn.k_proj.weight"] = lin(Hkv * D, H)
        w[p + "self_attn.v_proj.weight"] = lin(Hkv * D, H)
        w[p + "self_attn.o_proj.weight"] = lin(H, Hq * D)
        if c.get("model_type") == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(D)
            w[p + "self_attn.k_norm.weight"] = norm(D)
        w[p + "mlp.gate_proj.weight"] = lin(F, H)
        w[p + "mlp.up_proj.weight"] = lin(F, H)
        w[p + "mlp.down_proj.weight"] = lin(H, F)
    w["model.norm.weight"] = norm(H)
    if not c.get("tie_word_embeddings", False):
        w["lm_head.weight"] = lin(V, H) * 4
    return w
