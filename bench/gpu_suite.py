"""One device call: correctness (logits vs f32 torch, greedy tokens vs bf16-emulating torch) + benchmark
(megakernel vs PyTorch eager / CUDA graph from the anchor script, + bandwidth floor).
Writes JSON to argv[1]."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "bench")
import pytorch_anchor as anchor
from torch_ref import TorchRef

from mpkir.parser import parse_file
from mpkir.runtime.host import Megakernel
from mpkir.semantics import build_env

OUT = sys.argv[1]
MODELS = sys.argv[2].split(",")
CHECK = sys.argv[3].split(",") if len(sys.argv) > 3 else []
CTX = 1024
res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
b = torch.empty_like(a)
ms = anchor.bench(lambda a=a, b=b: b.copy_(a), 20)
res["copy_GBps"] = 2 * (1 << 30) / (ms * 1e-3) / 1e9
del a, b
print("copy GB/s", res["copy_GBps"], flush=True)
ANCH = {
    "qwen3_0_6b": "qwen3-0.6b",
    "llama3_2_1b": "llama3.2-1b",
    "qwen3_8b": "qwen3-8b",
    "qwen3_1_7b": "qwen3-1.7b",
}


def save():
    with open(OUT, "w") as f:
        json.dump(res, f, indent=1)


for name in MODELS:
    m, _ = parse_file(f"examples/{name}.mpk")
    env, _ = build_env(m)
    r = res.setdefault(name, {})
    t0 = time.time()
    mk = Megakernel(m, batch=1)
    r["lower_s"], r["compile_s"] = mk.lower_s, mk.compile_s
    r["regs"] = mk.kernel.num_regs
    r["tasks_b1"] = mk.plan.num_tasks
    mk.init_random(0)
    print(name, "setup", time.time() - t0, "regs", mk.kernel.num_regs, "tasks", mk.plan.num_tasks, flush=True)
    rng = np.random.default_rng(1)
    V = int(env.consts["vocab"])
    for B in (1, 8):
        if B != mk.B:
            mk.set_batch(B)
        toks = rng.integers(0, V, B)
        mk.set_inputs(toks, np.full(B, CTX))
        rb = r.setdefault(f"b{B}", {})
        if name in CHECK:
            steps = 32 if B == 1 else 8
            mk.launch(1)
            lg = torch.from_dlpack(mk.bufs[mk.plan.logits]).view(torch.bfloat16).float()[:B]
            _, lref = TorchRef(mk, env, "f32").generate(list(toks), CTX, 1)
            rb["logits_relerr_vs_f32"] = float((lg - lref[0]).norm() / lref[0].norm())
            mk.launch(steps)
            got = mk.tokens()
            ref, _ = TorchRef(mk, env, "bf16").generate(list(toks), CTX, steps)
            ref = np.stack(ref)
            rb["greedy_steps"] = steps
            rb["greedy_match"] = int((got == ref).all(axis=1).sum())
            rb["first_mismatch_step"] = (
                int(np.argmax(~(got == ref).all(axis=1))) if not (got == ref).all() else -1
            )
            print(
                name,
                B,
                "logits relerr",
                rb["logits_relerr_vs_f32"],
                "greedy",
                rb["greedy_match"],
                "/",
                steps,
                flush=True,
            )
            if not (got == ref).all():
                print(" got", got[:6].tolist(), "\n ref", ref[:6].tolist(), flush=True)
            save()
        steps = 64
        mk.launch(steps)
        ts = sorted(mk.launch(steps) for _ in range(5))
        rb["mk_ms"] = ts[2] / steps
        wb = mk.plan.weight_bytes()
        kvb = (
            2
            * int(env.consts["layers"])
            * B
            * int(env.consts["kv_heads"])
            * (CTX + 1)
            * int(env.consts["head_dim"])
            * 2
        )
        rb["weight_GB"], rb["kv_GB"] = wb / 1e9, kvb / 1e9
        rb["floor_ms"] = (wb + kvb) / (res["copy_GBps"] * 1e9) * 1e3
        print(name, B, "megakernel ms/step", rb["mk_ms"], "floor", rb["floor_ms"], flush=True)
        save()
    del mk
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    # PyTorch peer (the anchor's model code), same run
    c = anchor.CONFIGS[ANCH[name]]
    for B in (1, 8):
        W = anchor.build(c, CTX, B)
        tok = torch.randint(0, c["vocab"], (B,), device="cuda")
        inv = 1.0 / (1e6 ** (torch.arange(0, c["hd"], 2, device="cuda").float() / c["hd"]))
        ang = CTX * inv
        cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        f = lambda c=c, W=W, tok=tok, cos=cos, sin=sin: anchor.step(c, W, tok, CTX, cos, sin)  # noqa: E731
        with torch.no_grad():
            eager = anchor.bench(f, 20)
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                f()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                f()
            graph = anchor.bench(g.replay, 30)
        r[f"b{B}"].update(torch_eager_ms=eager, torch_graph_ms=graph)
        print(name, B, "torch eager", eager, "graph", graph, flush=True)
        del W, g
        torch.cuda.empty_cache()
        save()
print(json.dumps(res, indent=1))
