"""A/B of megakernel code-generation switches on one decode step (environment variables read by
``codegen.lower``): per model and batch, ms/step of each variant (one launch of 64 steps, median of 5, same
random weights and inputs) and whether its 64 greedy tokens equal the first variant's.

Use: python bench/ab_step.py OUT.json llama3_2_1b,qwen3_8b 1,8 "MPKIR_MMA_PIPE=0" "MPKIR_MMA_PIPE=1" ...
A variant's SMS=n plans for n SMs (Megakernel's ``sms``); CTX=uneven draws each request's context from
32..1983 tokens (fixed seed) instead of 1024. A batch over the examples' 8 tokens (e.g. 64)
runs the example with max_requests and max_tokens raised to it (and max_seq_len 2048), as
bench/engine_bench.py sizes its engines."""

import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
from sized_examples import sized_source

from mpkir.parser import parse
from mpkir.runtime.host import Megakernel

CTX, STEPS = 1024, 64


def time_variant(module, batch: int, env: dict[str, str]) -> tuple[float, np.ndarray]:
    """(ms per step, greedy tokens [STEPS, batch]) of the megakernel built under ``env``."""
    env = dict(env)
    sms = int(env.pop("SMS")) if "SMS" in env else None  # SMS=131: a plan of fewer workers
    uneven = env.pop("CTX", "") == "uneven"  # CTX=uneven: each request's context drawn from 32..1983
    with mock.patch.dict(os.environ, env):
        mk = Megakernel(module, batch=batch, sms=sms)
    mk.init_random(0)
    toks = np.random.default_rng(1).integers(0, 1000, batch)
    ctx = np.random.default_rng(2).integers(32, 1984, batch) if uneven else np.full(batch, CTX)
    mk.set_inputs(toks, ctx)
    mk.launch(STEPS)
    got = mk.tokens()
    ms = sorted(mk.launch(STEPS) for _ in range(5))[2] / STEPS
    del mk
    return ms, got


def sized(name: str, batch: int):
    """The example, its token capacity raised to ``batch`` when over its own 8."""
    path = Path(f"examples/{name}.mpk")
    return parse(sized_source(name, batch) if batch > 8 else path.read_text(), path.name)


def main(out: str, models: str, batches: str, *variants: str) -> None:
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    envs = [dict(kv.split("=", 1) for kv in v.split(",") if kv) for v in variants] or [{}]
    for name in models.split(","):
        for batch in map(int, batches.split(",")):
            module = sized(name, batch)
            base = None
            for env in envs:
                ms, toks = time_variant(module, batch, env)
                base = toks if base is None else base
                same = bool(np.array_equal(toks, base))
                res["runs"].append(dict(model=name, batch=batch, env=env, ms=ms, tokens_equal_first=same))
                print(f"{name} b{batch} {env}: {ms:.3f} ms/step, tokens equal first: {same}", flush=True)
                with open(out, "w") as f:
                    json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
