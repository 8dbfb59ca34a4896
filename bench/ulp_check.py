"""Does each task round where the IR rounds? One step on the device, every op of the first and last layer
and the head recomputed in float64 from the kernel's own bf16 input buffers, and the kernel's bf16 output
measured in bf16 ulps of the exact value: a faithful implementation (f32 accumulation, one rounding per
IR op) stays within about 0.5 ulp, with rare elements just past it (f32 sums near a rounding midpoint);
a systematic difference shows as errors of 1 ulp or more on many elements.

    python bench/ulp_check.py OUT.json qwen3_0_6b,llama3_2_1b 1,8
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_ref import TorchRef

from mpkir.parser import parse
from mpkir.runtime.host import Megakernel
from mpkir.semantics import build_env

CTX = 1024
D64 = torch.float64


def bf(x):
    return x.to(torch.bfloat16).to(D64)


def ulp_err(k, exact):
    """|kernel - exact| in bf16 ulps of the exact value: (max, fraction of elements above 0.501)."""
    a = exact.abs().clamp_min(1e-30)
    ulp = torch.exp2(torch.floor(torch.log2(a)) - 7)
    e = (k.to(D64) - exact).abs() / ulp
    return float(e.max()), float((e > 0.501).to(D64).mean())


def check(name, batches, res, out_path):
    src = Path(f"examples/{name}.mpk").read_text()
    n = int(os.environ.get("ULP_SIZE", max(8, *batches)))  # serve sizes (the examples: 8 tokens per step)
    for k in ("max_requests", "max_tokens"):
        src = src.replace(f"const {k} = 8\n", f"const {k} = {n}\n")
    m = parse(src.replace("const max_seq_len = 4096\n", "const max_seq_len = 2048\n"), f"{name}.mpk")
    env, _ = build_env(m)
    mk = Megakernel(m, batch=1)
    mk.init_random(0)
    ref = TorchRef(mk, env, "f32")
    L, nh, nkv, hd = ref.L, ref.nh, ref.nkv, ref.hd

    def W(n):
        return ref.w(n).to(D64)

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + ref.eps) * w

    def V(n, B):
        return torch.from_dlpack(mk.bufs["v:" + n]).view(torch.bfloat16).to(D64)[:B]

    def cache(c, layer):
        pg = mk.plan.buffers[f"s:{c}[{layer}]"].shape[1]
        pps = mk.bufs[mk.plan.inputs["page_table"]].shape[1]
        return torch.from_dlpack(mk.bufs[f"s:{c}[{layer}]"]).view(torch.bfloat16).view(-1, pps * pg, nkv, hd)

    for B in batches:
        if B != mk.B:
            mk.set_batch(B)
        rng = np.random.default_rng(B)
        toks = rng.integers(0, int(env.consts["vocab"]), B)
        mk.set_inputs(toks, np.full(B, CTX))
        mk.poison()
        mk.launch(1)
        torch.cuda.synchronize()
        out = {}
        pos = torch.full((B,), CTX, device="cuda")
        for layer in (0, L - 1):
            p = f"model.layers.{layer}."
            x = V("x", B) if layer == 0 else V(f"x_out.{layer - 1}", B)
            xn = bf(rms(x, W(p + "input_layernorm.weight")))
            for s in ("q", "k", "v"):
                w = W(p + f"self_attn.{s}_proj.weight")
                out[f"L{layer}.{s}"] = ulp_err(V(f"{s}.{layer}", B), xn @ w.T)
            q, k = V(f"q.{layer}", B).view(B, nh, hd), V(f"k.{layer}", B).view(B, nkv, hd)
            if ref.qk:
                q = bf(rms(q, W(p + "self_attn.q_norm.weight")))
                k = bf(rms(k, W(p + "self_attn.k_norm.weight")))
            for s, t, h in (("q", q, nh), ("k", k, nkv)):
                got = V(f"{s}_rot.{layer}", B).view(B, h, hd)
                out[f"L{layer}.{s}_rot"] = ulp_err(got, ref.rope(t.float(), pos))
            kc, vc = cache("k_cache", layer), cache("v_cache", layer)
            qr, g, att = V(f"q_rot.{layer}", B).view(B, nh, hd), nh // nkv, []
            for b in range(B):
                Kb = kc[b, : CTX + 1].to(D64).repeat_interleave(g, 1)
                Vb = vc[b, : CTX + 1].to(D64).repeat_interleave(g, 1)
                sc = torch.einsum("hd,thd->ht", qr[b], Kb) / hd**0.5
                att.append(torch.einsum("ht,thd->hd", sc.softmax(-1), Vb))
            out[f"L{layer}.attention"] = ulp_err(V(f"attn.{layer}", B).view(B, nh, hd), torch.stack(att))
            ho = x + bf(V(f"attn.{layer}", B).reshape(B, -1) @ W(p + "self_attn.o_proj.weight").T)
            out[f"L{layer}.o_proj+residual"] = ulp_err(V(f"h_attn.{layer}", B), ho)
            hn = bf(rms(V(f"h_attn.{layer}", B), W(p + "post_attention_layernorm.weight")))
            out[f"L{layer}.gate"] = ulp_err(V(f"gate.{layer}", B), hn @ W(p + "mlp.gate_proj.weight").T)
            out[f"L{layer}.up"] = ulp_err(V(f"up.{layer}", B), hn @ W(p + "mlp.up_proj.weight").T)
            act = bf(torch.nn.functional.silu(V(f"gate.{layer}", B)) * V(f"up.{layer}", B))
            dn = V(f"h_attn.{layer}", B) + bf(act @ W(p + "mlp.down_proj.weight").T)
            out[f"L{layer}.down+residual"] = ulp_err(V(f"x_out.{layer}", B), dn)
        hf = bf(rms(V(f"x_out.{L - 1}", B), W("model.norm.weight")))
        lm = torch.from_dlpack(mk.bufs[ref.lm]).view(torch.bfloat16).to(D64)
        out["lm_head"] = ulp_err(V("logits", B), hf @ lm.T)
        res[f"{name}/b{B}"] = out
        worst = max(v[0] for v in out.values())
        detail = ", ".join(f"{k} {v[0]:.2f}/{100 * v[1]:.2f}%" for k, v in out.items())
        print(f"{name} B={B}: worst {worst:.2f} ulp (max ulp / % elements > 0.501 ulp): {detail}", flush=True)
        Path(out_path).write_text(json.dumps(res, indent=1))


def main():
    out_path, models, batches = sys.argv[1], sys.argv[2].split(","), [int(x) for x in sys.argv[3].split(",")]
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name in models:
        check(name, batches, res, out_path)
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
