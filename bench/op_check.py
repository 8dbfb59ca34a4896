"""Per-task-type check on the device: one megakernel step with poisoned activations, then every op of two
layers and the head recomputed in float32 PyTorch from the kernel's OWN input buffers (no compounding)
and compared (relative error of the bf16 output). argv: out.json models batches"""

import json
import sys

import numpy as np
import torch

sys.path.insert(0, "bench")
from torch_ref import TorchRef

from mpkir.parser import parse_file
from mpkir.runtime.host import Megakernel
from mpkir.semantics import build_env

res = {}
CTX = 300


def rel(a, b):
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


for name in sys.argv[2].split(","):
    m, _ = parse_file(f"examples/{name}.mpk")
    env, _ = build_env(m)
    mk = Megakernel(m, batch=1)
    mk.init_random(0)
    ref = TorchRef(mk, env, "f32")
    L = ref.L
    for B in [int(x) for x in sys.argv[3].split(",")]:
        if B != mk.B:
            mk.set_batch(B)
        rng = np.random.default_rng(B)
        toks = rng.integers(0, int(env.consts["vocab"]), B)
        pos = rng.integers(1, CTX, B)
        mk.set_inputs(toks, pos)
        mk.poison()
        mk.launch(1)
        torch.cuda.synchronize()

        def V(n, B=B, mk=mk):
            return torch.from_dlpack(mk.bufs["v:" + n]).view(torch.bfloat16).float()[:B]

        r = ref.r
        out = {}
        out["embedding"] = rel(V("x"), ref.w("model.embed_tokens.weight")[torch.tensor(toks, device="cuda")])
        posd = torch.tensor(pos, device="cuda")
        for layer in (0, L - 1):
            p = f"model.layers.{layer}."
            xin = V("x") if layer == 0 else V(f"x_out.{layer - 1}")
            xn = (ref.rms(xin, ref.w(p + "input_layernorm.weight"))).bfloat16().float()
            out[f"L{layer}.rmsnorm+q_proj"] = rel(
                V(f"q.{layer}"), xn @ ref.w(p + "self_attn.q_proj.weight").T
            )
            out[f"L{layer}.rmsnorm+k_proj"] = rel(
                V(f"k.{layer}"), xn @ ref.w(p + "self_attn.k_proj.weight").T
            )
            out[f"L{layer}.rmsnorm+v_proj"] = rel(
                V(f"v.{layer}"), xn @ ref.w(p + "self_attn.v_proj.weight").T
            )
            q = V(f"q.{layer}").view(B, ref.nh, ref.hd)
            k = V(f"k.{layer}").view(B, ref.nkv, ref.hd)
            if ref.qk:
                q = ref.rms(q, ref.w(p + "self_attn.q_norm.weight")).bfloat16().float()
                k = ref.rms(k, ref.w(p + "self_attn.k_norm.weight")).bfloat16().float()
            out[f"L{layer}.qnorm_rope"] = rel(V(f"q_rot.{layer}").view(B, ref.nh, ref.hd), ref.rope(q, posd))
            out[f"L{layer}.knorm_rope"] = rel(V(f"k_rot.{layer}").view(B, ref.nkv, ref.hd), ref.rope(k, posd))
            # attention from the kernel's q_rot/k_rot/v and the cache
            qr = V(f"q_rot.{layer}").view(B, ref.nh, ref.hd)
            pg = mk.plan.buffers[f"s:k_cache[{layer}]"].shape[1]
            pps = mk.bufs[mk.plan.inputs["page_table"]].shape[1]
            kc = (
                torch.from_dlpack(mk.bufs[f"s:k_cache[{layer}]"])
                .view(torch.bfloat16)
                .view(-1, pps * pg, ref.nkv, ref.hd)
            )
            vc = (
                torch.from_dlpack(mk.bufs[f"s:v_cache[{layer}]"])
                .view(torch.bfloat16)
                .view(-1, pps * pg, ref.nkv, ref.hd)
            )
            g = ref.nh // ref.nkv
            att = []
            for b in range(B):
                P = int(pos[b])
                Kb = kc[b, : P + 1].float().clone()
                Vb = vc[b, : P + 1].float().clone()
                Kb[P] = V(f"k_rot.{layer}").view(B, ref.nkv, ref.hd)[b]
                Vb[P] = V(f"v.{layer}").view(B, ref.nkv, ref.hd)[b]
                sc = torch.einsum("hd,thd->ht", qr[b], Kb.repeat_interleave(g, 1)) / ref.hd**0.5
                att.append(torch.einsum("ht,thd->hd", sc.softmax(-1), Vb.repeat_interleave(g, 1)))
            out[f"L{layer}.paged_attention"] = rel(
                V(f"attn.{layer}").view(B, ref.nh, ref.hd), torch.stack(att)
            )
            ho = (
                xin
                + r(V(f"attn.{layer}").reshape(B, -1) @ ref.w(p + "self_attn.o_proj.weight").T)
                .bfloat16()
                .float()
            )
            out[f"L{layer}.o_proj+residual"] = rel(V(f"h_attn.{layer}"), ho)
            hn = (
                ref.rms(V(f"h_attn.{layer}"), ref.w(p + "post_attention_layernorm.weight")).bfloat16().float()
            )
            out[f"L{layer}.rmsnorm+gate"] = rel(V(f"gate.{layer}"), hn @ ref.w(p + "mlp.gate_proj.weight").T)
            out[f"L{layer}.rmsnorm+up"] = rel(V(f"up.{layer}"), hn @ ref.w(p + "mlp.up_proj.weight").T)
            act = (torch.nn.functional.silu(V(f"gate.{layer}")) * V(f"up.{layer}")).bfloat16().float()
            dn = V(f"h_attn.{layer}") + (act @ ref.w(p + "mlp.down_proj.weight").T).bfloat16().float()
            out[f"L{layer}.silu_mul+down+residual"] = rel(V(f"x_out.{layer}"), dn)
        hf = ref.rms(V(f"x_out.{L - 1}"), ref.w("model.norm.weight")).bfloat16().float()
        lg = hf @ torch.from_dlpack(mk.bufs[ref.lm]).view(torch.bfloat16).float().T
        out["final_norm+lm_head"] = rel(V("logits"), lg)
        nxt = torch.from_dlpack(mk.bufs["v:next"])[:B].long()
        out["argmax_exact"] = bool((nxt == V("logits").argmax(-1)).all())
        worst = max(v for k, v in out.items() if k != "argmax_exact")
        res[f"{name}_b{B}"] = out
        print(
            name,
            "B",
            B,
            "worst rel err",
            f"{worst:.2e}",
            "argmax exact",
            out["argmax_exact"],
            "PASS" if worst < 1e-2 and out["argmax_exact"] else "FAIL",
            flush=True,
        )
        if worst >= 1e-2:
            print("  ", {k: f"{v:.1e}" for k, v in out.items() if k != "argmax_exact"}, flush=True)
    del mk
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
with open(sys.argv[1], "w") as f:
    json.dump(res, f, indent=1)
