"""A float64 NumPy reference of the Llama / Qwen3 decode graphs that rounds exactly where the IR rounds, read
from a lowered plan's buffers (weights, paged KV cache, rope table): what an exact plan
(``lower(numerics="exact")``) must reproduce bit for bit.

Every value the IR stores is rounded float64 -> float32 -> bf16 (as the task bodies round their float64
sums); sums, exp and square roots are float64; rope angles are float32 (``f32(pos) * inv_freq``, the plan's
table), their cos/sin float64, the rotation rounded once to float32; eps and the attention scale are the
float32 values the kernel is given. Summation order is the only difference left (about 1e-16 relative, which
moves a bf16 rounding about once in 10^9 values).
"""

from __future__ import annotations

import numpy as np

from mpkir.runtime.host import bf16_bits


def bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 -> bf16 (round to nearest even each time), back as float64."""
    return from_bits(bf16_bits(x))


def from_bits(a: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) as float64."""
    return (a.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


class ExactRef:
    """Greedy decode over ``bufs`` (NumPy arrays by plan buffer name, as ``CpuMegakernel.bufs``) with
    ``consts`` (the module's constants: layers, heads, kv_heads, head_dim, rms_eps). The KV cache is copied
    at construction and then kept here."""

    def __init__(self, plan, bufs: dict, consts: dict):
        self.bufs = bufs
        self.L = int(consts["layers"])
        self.nh, self.nkv, self.hd = int(consts["heads"]), int(consts["kv_heads"]), int(consts["head_dim"])
        self.eps = float(np.float32(consts["rms_eps"]))
        self.scale = float(np.float32(1.0 / np.sqrt(self.hd)))
        self.qk = "w:model.layers.0.self_attn.q_norm.weight" in bufs
        self.lm = "w:lm_head.weight" if "w:lm_head.weight" in bufs else "w:model.embed_tokens.weight"
        self.inv = np.asarray(next(bufs[n] for n in bufs if n.startswith("const:rope_inv")), np.float32)
        self.table = np.asarray(bufs[plan.inputs["page_table"]])
        self.kc = [bufs[f"s:k_cache[{i}]"].copy() for i in range(self.L)]
        self.vc = [bufs[f"s:v_cache[{i}]"].copy() for i in range(self.L)]
        self._w: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        if name not in self._w:
            self._w[name] = from_bits(self.bufs[name if name.startswith("w:") else "w:" + name])
        return self._w[name]

    def rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x * (1.0 / np.sqrt((x * x).sum(-1, keepdims=True) / x.shape[-1] + self.eps)) * w

    def rope(self, x: np.ndarray, pos: int) -> np.ndarray:
        half = len(self.inv)
        ang = (np.float32(pos) * self.inv).astype(np.float64)
        c, s = np.cos(ang), np.sin(ang)
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        out = x.copy()
        out[..., :half], out[..., half : 2 * half] = x1 * c - x2 * s, x2 * c + x1 * s
        return bf16(out)

    def _slots(self, seq: int, n: int):
        PG = self.kc[0].shape[1]
        p = np.arange(n)
        return self.table[seq, p // PG], p % PG

    def step(self, tokens, positions, seq_ids) -> np.ndarray:
        """One decode step of every token: its k/v appended to the cache, the bf16 logits [B, V] returned."""
        out = []
        for tok, pos, seq in zip(tokens, positions, seq_ids, strict=True):
            x = self.w("model.embed_tokens.weight")[int(tok)]
            for i in range(self.L):
                x = self._layer(i, x, int(pos), int(seq))
            xf = bf16(self.rms(x, self.w("model.norm.weight")))
            out.append(bf16(self.w(self.lm) @ xf))
        return np.stack(out)

    def _layer(self, i: int, x: np.ndarray, pos: int, seq: int) -> np.ndarray:
        p = f"model.layers.{i}."
        nh, nkv, hd = self.nh, self.nkv, self.hd
        xn = bf16(self.rms(x, self.w(p + "input_layernorm.weight")))
        q = bf16(self.w(p + "self_attn.q_proj.weight") @ xn).reshape(nh, hd)
        k = bf16(self.w(p + "self_attn.k_proj.weight") @ xn).reshape(nkv, hd)
        v = bf16(self.w(p + "self_attn.v_proj.weight") @ xn).reshape(nkv, hd)
        if self.qk:
            q = bf16(self.rms(q, self.w(p + "self_attn.q_norm.weight")))
            k = bf16(self.rms(k, self.w(p + "self_attn.k_norm.weight")))
        q, k = self.rope(q, pos), self.rope(k, pos)
        PG = self.kc[i].shape[1]
        page, slot = self.table[seq, pos // PG], pos % PG
        self.kc[i][page, slot] = bf16_bits(k)
        self.vc[i][page, slot] = bf16_bits(v)
        pages, slots = self._slots(seq, pos + 1)
        K = from_bits(self.kc[i][pages, slots])  # [T, kv, D]
        V = from_bits(self.vc[i][pages, slots])
        g = nh // nkv
        sc = np.einsum("hd,thd->ht", q * self.scale, np.repeat(K, g, axis=1))
        e = np.exp(sc - sc.max(-1, keepdims=True))
        a = bf16(np.einsum("ht,thd->hd", e, np.repeat(V, g, axis=1)) / e.sum(-1, keepdims=True)).reshape(-1)
        x = bf16(x + bf16(self.w(p + "self_attn.o_proj.weight") @ a))
        hn = bf16(self.rms(x, self.w(p + "post_attention_layernorm.weight")))
        gt = bf16(self.w(p + "mlp.gate_proj.weight") @ hn)
        up = bf16(self.w(p + "mlp.up_proj.weight") @ hn)
        act = bf16(gt / (1.0 + np.exp(-gt)) * up)
        return bf16(x + bf16(self.w(p + "mlp.down_proj.weight") @ act))
