"""PyTorch reference of the Qwen3/Llama decode graphs on the megakernel's own buffers (same weights, same
paged KV cache). mode 'bf16' rounds at the same points as the kernel (for greedy-token identity);
mode 'f32' keeps everything in float32 (the logits reference); mode 'exact' computes in float64 and rounds
float64 -> float32 -> bf16 at the same points, with the float32 eps and attention scale the kernel is given:
what an exact plan (``Megakernel(numerics="exact")``) reproduces bit for bit (the PyTorch twin of
``mpkir.testing.exact_ref``)."""

from __future__ import annotations

import torch


def _t(cpa):
    return torch.from_dlpack(cpa)


class TorchRef:
    def __init__(self, mk, env, mode="bf16", f32_logits=False, acc64=False):
        """``acc64``: matmuls accumulate in float64 (another summation order: how far two correct
        implementations of the same rounding points drift apart)."""
        self.mk, self.mode, self.f32_logits, self.acc64 = mk, mode, f32_logits, acc64
        self.dt = torch.float64 if mode == "exact" else torch.float32
        self.layer_x: list = []  # the residual stream after each layer, first step
        self.trace0: dict = {}  # layer 0's values at the first step, by the kernel's buffer names
        c = env.consts
        self.L, self.H = int(c["layers"]), int(c["hidden"])
        self.nh, self.nkv, self.hd = int(c["heads"]), int(c["kv_heads"]), int(c["head_dim"])
        self.eps, self.theta = float(c["rms_eps"]), float(c["rope_theta"])
        self.scale = 1.0 / self.hd**0.5
        if mode == "exact":  # the float32 values the kernel's tasks carry
            self.eps, self.scale = (float(torch.tensor(v, dtype=torch.float32)) for v in (self.eps,
                                                                                          self.scale))
        self.qk = "w:model.layers.0.self_attn.q_norm.weight" in mk.bufs
        self.lm = "w:lm_head.weight" if "w:lm_head.weight" in mk.bufs else "w:model.embed_tokens.weight"

    def w(self, name):
        return _t(self.mk.bufs["w:" + name]).view(torch.bfloat16).to(self.dt)

    def r(self, x):
        if self.mode == "exact":
            return x.float().to(torch.bfloat16).double()
        return x.to(torch.bfloat16).float() if self.mode == "bf16" else x

    def mm(self, a, w):
        return (a.double() @ w.double().T).float() if self.acc64 and self.mode != "exact" else a @ w.T

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def rope(self, x, pos):
        """The IR's rope (mpkir.ops.attention.rope_tables): inv_freq = f32(theta^(-2i/D)), angle =
        f32(pos) * inv_freq in float32, cos/sin and the rotation in float64, one float32 rounding."""
        D = self.hd
        i = torch.arange(D // 2, device=x.device, dtype=torch.float64)
        inv = (1.0 / self.theta ** (2.0 * i / D)).float()
        ang = (pos.float()[:, None] * inv[None, :]).double()
        c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
        xd = x.double()
        x1, x2 = xd[..., : D // 2], xd[..., D // 2 :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).float()

    @torch.no_grad()
    def generate(self, tokens, pos0, steps, force=None):
        """Greedy ``steps`` steps (``force[s]``: the tokens fed after step s instead of the argmax)."""
        mk, B = self.mk, len(tokens)
        pg = mk.plan.buffers["s:k_cache[0]"].shape[1]
        pps = mk.bufs[mk.plan.inputs["page_table"]].shape[1]
        Lmax = pos0 + steps
        kc, vc = [], []
        for layer in range(self.L):
            for lst, nm in ((kc, "k_cache"), (vc, "v_cache")):
                t = _t(mk.bufs[f"s:{nm}[{layer}]"]).view(torch.bfloat16)
                t = t.view(-1, pps * pg, self.nkv, self.hd)[:B, :Lmax].to(self.dt).clone()
                lst.append(t)
        tok = torch.tensor(tokens, device="cuda", dtype=torch.long)
        out, logits_all = [], []
        for st in range(steps):
            pos = torch.full((B,), pos0 + st, device="cuda", dtype=torch.long)
            x = self.r(self.w("model.embed_tokens.weight")[tok])
            for layer in range(self.L):
                p = f"model.layers.{layer}."
                xn = self.r(self.rms(x, self.w(p + "input_layernorm.weight")))
                q = self.r(self.mm(xn, self.w(p + "self_attn.q_proj.weight"))).view(B, self.nh, self.hd)
                k = self.r(self.mm(xn, self.w(p + "self_attn.k_proj.weight"))).view(B, self.nkv, self.hd)
                v = self.r(self.mm(xn, self.w(p + "self_attn.v_proj.weight"))).view(B, self.nkv, self.hd)
                q0, k0 = q.reshape(B, -1), k.reshape(B, -1)
                if self.qk:
                    q = self.r(self.rms(q, self.w(p + "self_attn.q_norm.weight")))
                    k = self.r(self.rms(k, self.w(p + "self_attn.k_norm.weight")))
                q, k = self.r(self.rope(q, pos)), self.r(self.rope(k, pos))
                P = pos0 + st
                kc[layer][:, P] = k
                vc[layer][:, P] = v
                K, V = kc[layer][:, : P + 1], vc[layer][:, : P + 1]  # [B, T, kv, D]
                g = self.nh // self.nkv
                Kx = K.repeat_interleave(g, dim=2)
                Vx = V.repeat_interleave(g, dim=2)
                if self.mode == "exact":  # the kernel scales q, then takes the dot products
                    sc = torch.einsum("bhd,bthd->bht", q * self.scale, Kx)
                else:
                    sc = torch.einsum("bhd,bthd->bht", q, Kx) / self.hd**0.5
                a = self.r(torch.einsum("bht,bthd->bhd", sc.softmax(-1), Vx)).reshape(B, -1)
                x = self.r(x + self.r(self.mm(a, self.w(p + "self_attn.o_proj.weight"))))
                h0 = x
                hn = self.r(self.rms(x, self.w(p + "post_attention_layernorm.weight")))
                gt = self.r(self.mm(hn, self.w(p + "mlp.gate_proj.weight")))
                up = self.r(self.mm(hn, self.w(p + "mlp.up_proj.weight")))
                act = self.r(torch.nn.functional.silu(gt) * up)
                x = self.r(x + self.r(self.mm(act, self.w(p + "mlp.down_proj.weight"))))
                if st == 0:
                    self.layer_x.append(x)
                    if layer == 0:
                        self.trace0.update({"q.0": q0, "k.0": k0, "v.0": v.reshape(B, -1), "q_rot.0": q,
                                            "k_rot.0": k, "attn.0": a, "h_attn.0": h0, "gate.0": gt,
                                            "up.0": up, "x_out.0": x})
            xf = self.r(self.rms(x, self.w("model.norm.weight")))
            logits = self.mm(xf, _t(mk.bufs[self.lm]).view(torch.bfloat16).to(self.dt))
            logits = logits if self.f32_logits else self.r(logits)
            tok = logits.argmax(-1) if force is None else torch.as_tensor(force[st], device="cuda").long()
            out.append(tok.cpu().numpy())
            logits_all.append(logits)
        return out, logits_all
