"""Greedy-token parity of the megakernel with a PyTorch reference that rounds where the IR rounds (bf16 after
every op, matmuls accumulated in float64), with the numbers that explain each divergence, and the same
comparisons for PyTorch's default float32 matmuls (another correct summation order). JSON to argv[1].

    python bench/parity.py OUT.json qwen3_0_6b,llama3_2_1b [steps] [bf16:1,f32:8,...]

For each model, logits dtype (``bf16``: the example as written; ``f32``: the example with its lm_head input
cast to f32, so the linear writes float32 logits and the argmax sees no bf16 ties) and batch (1, 8):
random weights (seed 0), random KV cache, 1024-token context, ``steps`` greedy steps
  * free running: one launch of ``steps`` steps (the kernel feeds its own argmax back) vs the reference's
    own greedy run: tokens equal per (step, request), the first divergence per request;
  * teacher forced: one launch per step with the reference's tokens as inputs, so every step compares the
    same computation: kernel-vs-reference logits error, and at each argmax disagreement the reference's
    top-2 margin, and the reference's logit gap between its token and the kernel's.
"""

from __future__ import annotations

import json
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
LM = "%logits = linear(%hf, @lm_head)"


def module(name: str, logits: str):
    src = (Path("examples") / f"{name}.mpk").read_text()
    if logits == "f32":
        assert LM in src, name
        src = src.replace(LM, "%hf32 = cast(%hf, dtype=f32)\n  %logits = linear(%hf32, @lm_head)")
    m = parse(src, f"{name}.mpk")
    return m, build_env(m)[0]


def kernel_logits(mk, B):
    x = torch.from_dlpack(mk.bufs[mk.plan.logits])[:B]
    return x.float() if x.dtype == torch.float32 else x.view(torch.bfloat16).float()


def top2(x):
    v, i = x.topk(2, dim=-1)
    return v[..., 0] - v[..., 1], i[..., 0]


def fmt(d):
    return "{" + ", ".join(f"{k}: {v:.1e}" for k, v in d.items()) + "}"


def run(name, logits, B, steps, res):
    m, env = module(name, logits)
    mk = Megakernel(m, batch=B)
    mk.init_random(0)
    V = int(env.consts["vocab"])
    toks = np.random.default_rng(1 + B).integers(0, V, B)
    mk.set_inputs(toks, np.full(B, CTX))
    mk.launch(steps)
    got = mk.tokens()  # [steps, B]
    f32l = logits == "f32"
    # the reference: rounds where the IR rounds, matmuls accumulated in float64 (exact up to the roundings)
    tref = TorchRef(mk, env, "bf16", f32_logits=f32l, acc64=True)
    ref_toks, ref_logits = tref.generate(list(toks), CTX, steps)
    ref = np.stack(ref_toks)
    eq = got == ref
    first = [int(np.argmax(~eq[:, b])) if not eq[:, b].all() else -1 for b in range(B)]
    # PyTorch's default: the same rounding points, float32 cuBLAS matmuls (another summation order)
    t32 = TorchRef(mk, env, "bf16", f32_logits=f32l)
    r32_free = np.stack(t32.generate(list(toks), CTX, steps)[0])
    t32f = TorchRef(mk, env, "bf16", f32_logits=f32l)
    _, r32_logits = t32f.generate(list(toks), CTX, steps, force=list(ref))
    L = len(tref.layer_x)
    layers = sorted({0, 1, L // 2, L - 1})

    def lerr(a, b):
        return float((a - b).norm() / b.norm())

    r32_layer = {f"L{i}": lerr(t32f.layer_x[i], tref.layer_x[i]) for i in layers}
    r32_err, r32_dis = [], 0
    for s in range(steps):
        r32_err.append(lerr(r32_logits[s], ref_logits[s]))
        r32_dis += int((r32_logits[s].argmax(-1) != ref_logits[s].argmax(-1)).sum())
    # teacher forced: the kernel fed the reference's tokens, one launch per step
    errs, mism, margins = [], [], []
    k_layer = {}
    for s in range(steps):
        inp = toks if s == 0 else ref[s - 1]
        mk.set_inputs(inp, np.full(B, CTX + s))
        mk.launch(1)
        if s == 0:
            for i in layers:
                kx = torch.from_dlpack(mk.bufs[f"v:x_out.{i}"])[:B].view(torch.bfloat16).float()
                k_layer[f"L{i}"] = lerr(kx, tref.layer_x[i])
            ops0 = {}
            for n, rv in tref.trace0.items():  # layer 0, op by op: rel. error, % of bf16 values differing
                kv = torch.from_dlpack(mk.bufs["v:" + n])[:B].view(torch.bfloat16).float().reshape(rv.shape)
                ops0[n] = (lerr(kv, rv), float((kv != rv).float().mean() * 100))
        kl, rl = kernel_logits(mk, B), ref_logits[s]
        errs.append(lerr(kl, rl))
        mg, ri = top2(rl)
        margins += mg.tolist()
        ki = kl.argmax(-1)
        for b in torch.nonzero(ki != ri).flatten().tolist():
            mism.append(
                {
                    "step": s,
                    "req": b,
                    "ref_margin_top2": float(mg[b]),
                    "ref_gap_to_kernel_token": float(rl[b, ri[b]] - rl[b, ki[b]]),
                    "kernel_gap": float(kl[b, ki[b]] - kl[b, ri[b]]),
                    "abs_err_at_tokens": float(
                        max(abs(kl[b, ri[b]] - rl[b, ri[b]]), abs(kl[b, ki[b]] - rl[b, ki[b]]))
                    ),
                    "ulp_bf16_at_top": float(2.0 ** (torch.floor(torch.log2(rl[b, ri[b]].abs())) - 7)),
                }
            )
    mg = np.array(margins)
    r = {
        "free_running_tokens_equal": int(eq.sum()),
        "of": int(eq.size),
        "steps_all_equal": int(eq.all(axis=1).sum()),
        "first_divergence_step_per_request": first,
        "teacher_forced_logits_relerr_median": float(np.median(errs)),
        "teacher_forced_logits_relerr_max": float(np.max(errs)),
        "teacher_forced_argmax_disagreements": len(mism),
        "ref_exact_top2_ties": int((mg == 0).sum()),
        "ref_margin_min": float(mg.min()),
        "ref_margin_median": float(np.median(mg)),
        "mismatches": mism[:20],
        "kernel_vs_ref_residual_relerr_step0": k_layer,
        "kernel_vs_ref_layer0_ops_step0_relerr_pct_differing": ops0,
        "torch_f32_vs_ref_residual_relerr_step0": r32_layer,
        "torch_f32_vs_ref_logits_relerr_median": float(np.median(r32_err)),
        "torch_f32_vs_ref_argmax_disagreements": r32_dis,
        "torch_f32_vs_ref_free_running_tokens_equal": int((r32_free == ref).sum()),
        "kernel_vs_torch_f32_free_running_tokens_equal": int((r32_free == got).sum()),
    }
    res[f"{name}/{logits}/b{B}"] = r
    print(
        f"{name:12s} logits {logits} B={B}: kernel vs ref free-running "
        f"{r['free_running_tokens_equal']}/{r['of']} "
        f"tokens ({r['steps_all_equal']}/{steps} steps all equal), first divergence {first[:8]}; "
        f"teacher-forced logit err med {r['teacher_forced_logits_relerr_median']:.2e}, argmax disagreements "
        f"{len(mism)}, ref exact ties {r['ref_exact_top2_ties']}, ref margin min {r['ref_margin_min']:.3g} "
        f"median {r['ref_margin_median']:.3g}",
        flush=True,
    )
    print(
        f"    residual relerr at step 0: kernel vs ref {fmt(k_layer)}; torch-f32 vs ref {fmt(r32_layer)}; "
        f"torch-f32 vs ref: logits err med {r['torch_f32_vs_ref_logits_relerr_median']:.2e}, argmax "
        f"disagreements {r32_dis} (teacher forced), free-running tokens equal "
        f"{r['torch_f32_vs_ref_free_running_tokens_equal']}/{r['of']}; kernel vs torch-f32 free-running "
        f"{r['kernel_vs_torch_f32_free_running_tokens_equal']}/{r['of']}",
        flush=True,
    )
    print("    layer 0 op by op (rel err, % bf16 values differing):",
          ", ".join(f"{k} {a:.1e}/{b:.2f}%" for k, (a, b) in ops0.items()), flush=True)
    for x in mism[:4]:
        print("   ", json.dumps(x), flush=True)
    del mk, tref, t32, t32f
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def main():
    out, models = sys.argv[1], sys.argv[2].split(",")
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    cases = sys.argv[4].split(",") if len(sys.argv) > 4 else ["bf16:1", "bf16:8", "f32:1", "f32:8"]
    for name in models:
        for case in cases:
            logits, B = case.split(":")
            run(name, logits, int(B), steps, res)
            Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
