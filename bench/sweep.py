"""Tile size / weight-prefetch sweep (batch 1) + batch-8 correctness re-check. argv: out.json"""

import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "bench")
from torch_ref import TorchRef

from mpkir.parser import parse_file
from mpkir.runtime.host import Megakernel
from mpkir.semantics import build_env

res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
CTX = 1024
if os.environ.get("SWEEP_CHECK", "0") == "1":
    for name in ("qwen3_0_6b", "llama3_2_1b"):
        m, _ = parse_file(f"examples/{name}.mpk")
        env, _ = build_env(m)
        mk = Megakernel(m, batch=8)
        mk.init_random(0)
        toks = np.random.default_rng(1).integers(0, int(env.consts["vocab"]), 8)
        mk.set_inputs(toks, np.full(8, CTX))
        mk.launch(1)
        lg = torch.from_dlpack(mk.bufs[mk.plan.logits]).view(torch.bfloat16).float()[:8]
        _, lref = TorchRef(mk, env, "f32").generate(list(toks), CTX, 1)
        rel = float((lg - lref[0]).norm() / lref[0].norm())
        mk.launch(8)
        got = mk.tokens()
        ref = np.stack(TorchRef(mk, env, "bf16").generate(list(toks), CTX, 8)[0])
        res[f"{name}_b8_check"] = dict(
            logits_relerr=rel,
            tokens_equal=float((got == ref).mean()),
            rows_equal=int((got == ref).all(1).sum()),
        )
        print(name, "b8", res[f"{name}_b8_check"], flush=True)
        del mk
for name in ("llama3_2_1b", "qwen3_8b"):
    m, _ = parse_file(f"examples/{name}.mpk")
    for tile in (1024,):
        for pf in ("1", "0"):
            os.environ["MPKIR_TILE_KB"], os.environ["MPKIR_MMA"] = str(tile), pf
            mk = Megakernel(m, batch=1)
            if pf == "1":
                mk.init_random(0)
                W = {k: v for k, v in mk.bufs.items() if k.startswith(("w:", "s:"))}
            else:
                mk.bufs.update(W)
            mk.set_inputs([5], [CTX])
            mk.launch(64)
            ts = sorted(mk.launch(64) for _ in range(3))
            res[f"{name}_tile{tile}_mma{pf}"] = ts[1] / 64
            print(name, tile, pf, ts[1] / 64, "tasks", mk.plan.num_tasks, flush=True)
            del mk
    del W
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
with open(sys.argv[1], "w") as f:
    json.dump(res, f, indent=1)
