# ruff: noqa  (verbatim copy of ../shared/anchors/pytorch_decode_anchor.py: the PyTorch peer, kept as measured)
"""Anchor: one decode step of Qwen3/Llama-shaped models in PyTorch, eager vs CUDA graph,
against the memory-bandwidth floor. Random bf16 weights (timing depends on shapes only)."""
import json

import torch
import torch.nn.functional as F

CONFIGS = {
    "qwen3-0.6b": dict(h=1024, L=28, nh=16, nkv=8, hd=128, ffn=3072, vocab=151936, qknorm=True),
    "qwen3-1.7b": dict(h=2048, L=28, nh=16, nkv=8, hd=128, ffn=6144, vocab=151936, qknorm=True),
    "llama3.2-1b": dict(h=2048, L=16, nh=32, nkv=8, hd=64, ffn=8192, vocab=128256, qknorm=False),
    "qwen3-8b": dict(h=4096, L=36, nh=32, nkv=8, hd=128, ffn=12288, vocab=151936, qknorm=True),
}
dev = "cuda"; dt = torch.bfloat16

def rms(x, w, eps=1e-6):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(v + eps)).to(dt) * w

def build(c, ctx, batch):
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: (torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.02)
    W = dict(emb=r(c["vocab"], c["h"]), norm=torch.ones(c["h"], device=dev, dtype=dt), layers=[])
    for _ in range(c["L"]):
        W["layers"].append(dict(
            ln1=torch.ones(c["h"], device=dev, dtype=dt), ln2=torch.ones(c["h"], device=dev, dtype=dt),
            qkv=r((c["nh"] + 2 * c["nkv"]) * c["hd"], c["h"]), o=r(c["h"], c["nh"] * c["hd"]),
            gu=r(2 * c["ffn"], c["h"]), d=r(c["h"], c["ffn"]),
            qn=torch.ones(c["hd"], device=dev, dtype=dt), kn=torch.ones(c["hd"], device=dev, dtype=dt),
            kc=r(batch, c["nkv"], ctx + 1, c["hd"]), vc=r(batch, c["nkv"], ctx + 1, c["hd"])))
    W["lm"] = r(c["vocab"], c["h"])
    return W

def step(c, W, tok, pos, cos, sin):
    x = W["emb"][tok]  # [B,h]
    B = x.shape[0]
    for l in W["layers"]:
        y = rms(x, l["ln1"])
        qkv = y @ l["qkv"].t()
        q, k, v = qkv.split([c["nh"] * c["hd"], c["nkv"] * c["hd"], c["nkv"] * c["hd"]], -1)
        q = q.view(B, c["nh"], c["hd"]); k = k.view(B, c["nkv"], c["hd"]); v = v.view(B, c["nkv"], c["hd"])
        if c["qknorm"]:
            q = rms(q, l["qn"]); k = rms(k, l["kn"])
        def rope(t):
            t1, t2 = t.chunk(2, -1)
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)
        q = rope(q); k = rope(k)
        l["kc"][:, :, pos] = k; l["vc"][:, :, pos] = v
        a = F.scaled_dot_product_attention(q.unsqueeze(2), l["kc"][:, :, : pos + 1], l["vc"][:, :, : pos + 1],
                                           enable_gqa=True).view(B, -1)
        x = x + a @ l["o"].t()
        y = rms(x, l["ln2"])
        gu = y @ l["gu"].t()
        gt, up = gu.chunk(2, -1)
        x = x + (F.silu(gt) * up) @ l["d"].t()
    x = rms(x, W["norm"])
    return (x @ W["lm"].t()).argmax(-1)

def bench(fn, iters=50):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts) // 2]

def main():
    out = {}
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev); b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), 20)
    bw = 2 * n / (ms * 1e-3)
    out["copy_GBps"] = bw / 1e9
    del a, b
    # empty-kernel launch cost: many tiny ops eager vs graph
    x = torch.zeros(1, device=dev)
    def many():
        for _ in range(1000): x.add_(1)
    out["eager_us_per_tiny_kernel"] = bench(many, 10)
    gr = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s): many()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(gr): many()
    out["graph_us_per_tiny_kernel"] = bench(gr.replay, 10)
    ctx = 1024
    for name, c in CONFIGS.items():
        for batch in (1, 8):
            torch.cuda.empty_cache()
            W = build(c, ctx, batch)
            wbytes = sum(t.numel() * 2 for k, t in W.items() if k not in ("layers", "emb")) + \
                sum(t.numel() * 2 for l in W["layers"] for kk, t in l.items() if kk not in ("kc", "vc"))
            kvbytes = sum(2 * batch * c["nkv"] * (ctx + 1) * c["hd"] * 2 for _ in W["layers"])
            tok = torch.randint(0, c["vocab"], (batch,), device=dev)
            pos = ctx
            inv = 1.0 / (1e6 ** (torch.arange(0, c["hd"], 2, device=dev).float() / c["hd"]))
            ang = pos * inv
            cos = torch.cat([ang.cos()] * 1).to(dt); sin = ang.sin().to(dt)
            f = lambda: step(c, W, tok, pos, cos, sin)
            with torch.no_grad():
                eager = bench(f, 30)
                g = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s): f()
                torch.cuda.current_stream().wait_stream(s)
                with torch.cuda.graph(g): f()
                graph = bench(g.replay, 50)
            floor = (wbytes + kvbytes) / bw * 1e3
            out[f"{name}_b{batch}"] = dict(weight_GB=wbytes / 1e9, kv_GB=kvbytes / 1e9, eager_ms=eager, graph_ms=graph,
                                            floor_ms=floor, graph_over_floor=graph / floor)
            print(name, batch, out[f"{name}_b{batch}"], flush=True)
            del W
    print(json.dumps(out, indent=1))

if __name__ == "__main__":
    main()
