"""``mpkir bench FILE``: time the megakernel on the GPU against the memory-bandwidth floor (and PyTorch).

Per batch size: one launch of ``--steps`` decode steps at ``--ctx`` context (median of 5 launches), the
floor = (weight + KV bytes) / device-to-device copy bandwidth measured in the same run, and, with
``--torch``, the same-shaped model in PyTorch eager and under a CUDA graph (``bench/pytorch_anchor.py``).
Random bf16 weights and KV cache; every step is greedy (a graph's ``sample`` op is timed as argmax).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mpkir.commands import UsageError, load


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run(args) -> int:
    import numpy as np

    from mpkir.runtime.host import DeviceError, Megakernel, _cupy
    from mpkir.semantics import build_env

    try:
        cp = _cupy()
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    module, _ = load(args.path)
    env, _ = build_env(module)
    c = env.consts
    n = 1 << 30
    a = cp.empty(n, cp.uint8)
    b = cp.empty_like(a)
    a.fill(1)
    times = []
    for _ in range(10):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        b[...] = a
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1))
    bw = 2 * n / (sorted(times)[5] * 1e-3)
    del a, b
    rows = []
    mk = None
    for B in args.batch:
        if int(c.get("max_tokens", B)) < B:
            raise UsageError(f"--batch {B} exceeds max_tokens")
        if mk is None:
            mk = Megakernel(module, batch=B, greedy=True)
            mk.init_random(args.seed)
        else:
            mk.set_batch(B)
        rng = np.random.default_rng(args.seed)
        mk.set_inputs(rng.integers(0, int(c.get("vocab", 1000)), B), np.full(B, args.ctx))
        mk.launch(args.steps)
        ms = sorted(mk.launch(args.steps) for _ in range(5))[2] / args.steps
        kv = 2 * int(c["layers"]) * B * int(c["kv_heads"]) * (args.ctx + 1) * int(c["head_dim"]) * 2
        floor = (mk.plan.weight_bytes() + kv) / bw * 1e3
        rows.append({"batch": B, "megakernel_ms": ms, "floor_ms": floor, "ratio_to_floor": ms / floor})
    if args.torch:
        here = os.path.join(os.path.dirname(os.path.abspath(args.path)), "..", "bench")
        sys.path.insert(0, here)
        try:
            import pytorch_anchor as anchor  # the anchor's model code (bench/pytorch_anchor.py)
            import torch
        except ImportError as e:
            print(f"warning: no PyTorch baseline ({e})", file=sys.stderr)
        else:
            cfg = dict(
                h=int(c["hidden"]),
                L=int(c["layers"]),
                nh=int(c["heads"]),
                nkv=int(c["kv_heads"]),
                hd=int(c["head_dim"]),
                ffn=int(c["ffn"]),
                vocab=int(c["vocab"]),
                qknorm="q_norm" in Path(args.path).read_text(encoding="utf-8"),
            )
            del mk
            cp.get_default_memory_pool().free_all_blocks()
            for row in rows:
                B = row["batch"]
                W = anchor.build(cfg, args.ctx, B)
                tok = torch.randint(0, cfg["vocab"], (B,), device="cuda")
                ang = args.ctx / (1e6 ** (torch.arange(0, cfg["hd"], 2, device="cuda").float() / cfg["hd"]))
                cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
                with torch.no_grad():
                    f = lambda W=W, tok=tok, cos=cos, sin=sin: anchor.step(cfg, W, tok, args.ctx, cos, sin)  # noqa: E731
                    row["torch_eager_ms"] = anchor.bench(f, 20)
                    g = torch.cuda.CUDAGraph()
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        f()
                    torch.cuda.current_stream().wait_stream(s)
                    with torch.cuda.graph(g):
                        f()
                    row["torch_graph_ms"] = anchor.bench(g.replay, 30)
                del W, g
                torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; context {args.ctx}; {args.steps} steps per launch")
    print(
        f"{'batch':>5} {'megakernel':>11} {'floor':>8} {'x floor':>8} {'torch eager':>12} {'torch graph':>12}"
    )
    nan = float("nan")
    for r in rows:
        eager, graph = r.get("torch_eager_ms", nan), r.get("torch_graph_ms", nan)
        print(
            f"{r['batch']:>5} {r['megakernel_ms']:>9.3f}ms {r['floor_ms']:>6.3f}ms "
            f"{r['ratio_to_floor']:>7.2f}x {eager:>10.3f}ms {graph:>10.3f}ms"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"copy_GBps": bw / 1e9, "ctx": args.ctx, "rows": rows}, f, indent=1)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="time the GPU megakernel against the bandwidth floor (and PyTorch)", description=__doc__
    )
    p.add_argument("path", metavar="FILE", help=".mpk file")
    p.add_argument("--batch", type=_ints, default=[1, 8], metavar="1,8", help="batch sizes (default: 1,8)")
    p.add_argument("--ctx", type=int, default=1024, help="context length per request (default: 1024)")
    p.add_argument("--steps", type=int, default=64, help="decode steps per launch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--torch", action="store_true", help="also time PyTorch eager and CUDA graph")
    p.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    p.set_defaults(func=run)
