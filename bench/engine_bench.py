"""Generation throughput of the engine's GPU step backend (one megakernel launch per engine step) at batch
1, 8 and 64, against the kernel's own multi-step mode and PyTorch eager / CUDA graph (the anchor's model
code) measured in the same run. Random bf16 weights and KV cache, 1024-token context. JSON to argv[1].

    python bench/engine_bench.py OUT.json llama3_2_1b 1,8,64

* step backend, decode: ``StepBackend.step`` for B live tokens at positions 1024+i (inputs uploaded, one
  launch, logits [B, V] copied back) plus the host argmax the engine does: wall ms per step (host clock),
  tokens/s = B / that; the kernel's own time per launch (device events) beside it.
* engine end to end: ``Engine.generate`` of B requests (32-token prompts, 64 new tokens, greedy) on the
  step backend: generated tokens / wall time (prefill one chunk of B tokens per step included).
* multi-step: one launch of 64 steps of the argmax graph (the kernel feeds tokens back itself), ms/step.

    python bench/engine_bench.py OUT.json llama3_2_1b 1,8 --resident

compares, in one run, the per-step-launch backend with the resident one (``ResidentBackend``: one launch
serves every step; logits, and argmax ids only): wall ms per step of the same decode loop, and the engine
end to end (tokens/s, launches).

    python bench/engine_bench.py OUT.json llama3_2_1b 1,8 --sampled

sampled requests on the resident backend: host sampling from the logits vs in-kernel sampling vs in-kernel
sampling with in-kernel KV pages (engine tokens/s, same tokens as host sampling).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytorch_anchor as anchor
from sized_examples import sized_source

from mpkir.models.engine import Engine, EngineConfig, SamplingParams
from mpkir.parser import parse
from mpkir.runtime.host import Megakernel, ResidentBackend, StepBackend
from mpkir.semantics import build_env
from mpkir.verify import analyze

CTX = 1024
ANCH = {"qwen3_0_6b": "qwen3-0.6b", "llama3_2_1b": "llama3.2-1b", "qwen3_8b": "qwen3-8b"}


def sized(name: str, B: int):
    m = parse(sized_source(name, B), f"{name}.mpk")
    return m, analyze(m), build_env(m)[0]


def free():
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def bench_step_backend(name, B, r):
    m, an, env = sized(name, B)
    t0 = time.time()
    sb = StepBackend(m, an, None)
    r["setup_s"] = round(time.time() - t0, 2)
    V, pps = int(env.consts["vocab"]), int(env.consts["pages_per_seq"])
    table = np.arange(B * pps, dtype=np.int32).reshape(B, pps)
    sid = np.arange(B, dtype=np.int32)
    tok = np.random.default_rng(0).integers(0, V, B).astype(np.int32)
    walls, kms = [], []
    for i in range(60):
        k0 = sb.kernel_ms
        t = time.perf_counter()
        lg = sb.step(tok, np.full(B, CTX + i, np.int32), sid, table)
        tok = lg.argmax(-1).astype(np.int32)
        w = time.perf_counter() - t
        if i >= 10:
            walls.append(w * 1e3)
            kms.append(sb.kernel_ms - k0)
    r["step_wall_ms"] = float(np.median(walls))
    r["step_kernel_ms"] = float(np.median(kms))
    r["step_tokens_per_s"] = B / (r["step_wall_ms"] * 1e-3)
    # the engine end to end (prefill + decode), fresh KV state is not needed for timing
    cfg = EngineConfig(max_requests=B, max_tokens=B, page_size=int(env.consts["page_size"]),
                       num_pages=int(env.consts["num_pages"]), max_seq_len=int(env.consts["max_seq_len"]))
    e = Engine(sb, cfg)
    prompts = [list(map(int, np.random.default_rng(i).integers(0, V, 32))) for i in range(B)]
    t = time.perf_counter()
    reqs = e.generate(prompts, 64, SamplingParams(), stop_ids=())
    wall = time.perf_counter() - t
    gen = sum(len(q.output) for q in reqs)
    r["engine_generated"] = gen
    r["engine_steps"] = e.stats.steps
    r["engine_tokens_per_s"] = gen / wall
    r["engine_ms_per_step"] = wall / e.stats.steps * 1e3
    del sb, e
    free()
    # the kernel's own multi-step mode (argmax graph)
    mk = Megakernel(m, batch=B)
    mk.init_random(0)
    mk.set_inputs(np.random.default_rng(1).integers(0, V, B), np.full(B, CTX))
    mk.launch(64)
    ts = sorted(mk.launch(64) for _ in range(5))
    r["multistep_ms"] = ts[2] / 64
    r["multistep_tokens_per_s"] = B / (r["multistep_ms"] * 1e-3)
    del mk
    free()


def _decode_loop(be, B, V, pps, ids: bool) -> float:
    """Median wall ms per step of 50 decode steps at 1024+ context (after 10 warm-up steps)."""
    table = np.arange(B * pps, dtype=np.int32).reshape(B, pps)
    sid = np.arange(B, dtype=np.int32)
    tok = np.random.default_rng(0).integers(0, V, B).astype(np.int32)
    walls = []
    for i in range(60):
        t = time.perf_counter()
        out = be.step(tok, np.full(B, CTX + i, np.int32), sid, table)
        tok = (out if ids else out.argmax(-1)).astype(np.int32)
        if i >= 10:
            walls.append((time.perf_counter() - t) * 1e3)
    return float(np.median(walls))


def _engine(be, B, V, env, sampling=None) -> dict:
    cfg = EngineConfig(max_requests=B, max_tokens=B, page_size=int(env.consts["page_size"]),
                       num_pages=int(env.consts["num_pages"]), max_seq_len=int(env.consts["max_seq_len"]))
    e = Engine(be, cfg)
    prompts = [list(map(int, np.random.default_rng(i).integers(0, V, 32))) for i in range(B)]
    t = time.perf_counter()
    reqs = e.generate(prompts, 64, sampling or SamplingParams(), stop_ids=())
    wall = time.perf_counter() - t
    gen = sum(len(q.output) for q in reqs)
    return {"tokens_per_s": gen / wall, "ms_per_step": wall / e.stats.steps * 1e3, "steps": e.stats.steps,
            "outputs": [q.output for q in reqs]}


def bench_resident(name, B, r):
    """Per-step-launch vs resident backend, same shapes, same process."""
    m, an, env = sized(name, B)
    V, pps = int(env.consts["vocab"]), int(env.consts["pages_per_seq"])
    sb = StepBackend(m, an, None)
    r["step_wall_ms"] = _decode_loop(sb, B, V, pps, False)
    eng = _engine(sb, B, V, env)
    r["step_engine_tokens_per_s"], r["step_engine_ms_per_step"] = eng["tokens_per_s"], eng["ms_per_step"]
    ref = eng["outputs"]
    del sb
    free()
    for output in ("logits", "ids"):
        rb = ResidentBackend(m, an, None, output=output)
        try:
            r[f"resident_{output}_wall_ms"] = _decode_loop(rb, B, V, pps, output == "ids")
            eng = _engine(rb, B, V, env)
            r[f"resident_{output}_engine_tokens_per_s"] = eng["tokens_per_s"]
            r[f"resident_{output}_engine_ms_per_step"] = eng["ms_per_step"]
            r[f"resident_{output}_same_tokens_as_step"] = eng["outputs"] == ref
            r[f"resident_{output}_launches"] = rb.launches
            r[f"resident_{output}_steps"] = rb.steps
        finally:
            rb.close()
        del rb
        free()
    for k in ("step", "resident_logits", "resident_ids"):
        r[f"{k}_tokens_per_s"] = B / (r[f"{k}_wall_ms"] * 1e-3)


def bench_sampled(name, B, r):
    """Sampled requests (temperature 0.8, top-p 0.9, a seed each) on the resident kernel: the host samples
    from the logits; the kernel samples itself (output "sample"); and also allocates the KV pages itself
    (kernel_pages). Engine tokens/s and whether each gives the host-sampling tokens."""
    m, an, env = sized(name, B)
    V = int(env.consts["vocab"])
    samp = [SamplingParams(0.8, top_p=0.9, seed=i) for i in range(B)]
    ref = None
    for label, kw in (("host", {"output": "logits"}), ("kernel", {"output": "sample"}),
                      ("kernel_pages", {"output": "sample", "kernel_pages": True})):
        rb = ResidentBackend(m, an, None, **kw)
        try:
            eng = _engine(rb, B, V, env, samp)
            r[f"sampled_{label}_engine_tokens_per_s"] = eng["tokens_per_s"]
            r[f"sampled_{label}_engine_ms_per_step"] = eng["ms_per_step"]
            r[f"sampled_{label}_launches"] = rb.launches
            if ref is None:
                ref = eng["outputs"]
            r[f"sampled_{label}_same_tokens_as_host"] = eng["outputs"] == ref
        finally:
            rb.close()
        del rb
        free()


def bench_torch(name, B, r):
    c = anchor.CONFIGS[ANCH[name]]
    W = anchor.build(c, CTX, B)
    tok = torch.randint(0, c["vocab"], (B,), device="cuda")
    inv = 1.0 / (1e6 ** (torch.arange(0, c["hd"], 2, device="cuda").float() / c["hd"]))
    ang = CTX * inv
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    f = lambda c=c, W=W, tok=tok, cos=cos, sin=sin: anchor.step(c, W, tok, CTX, cos, sin)  # noqa: E731
    with torch.no_grad():
        r["torch_eager_ms"] = anchor.bench(f, 20)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            f()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            f()
        r["torch_graph_ms"] = anchor.bench(g.replay, 30)
    r["torch_graph_tokens_per_s"] = B / (r["torch_graph_ms"] * 1e-3)
    del W, g
    free()


def main():
    out, models, batches = sys.argv[1], sys.argv[2].split(","), [int(x) for x in sys.argv[3].split(",")]
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    resident, sampled = "--resident" in sys.argv[4:], "--sampled" in sys.argv[4:]
    for name in models:
        for B in batches:
            r = res.setdefault(f"{name}/b{B}", {})
            if sampled:
                bench_sampled(name, B, r)
            elif resident:
                bench_resident(name, B, r)
            else:
                bench_step_backend(name, B, r)
                bench_torch(name, B, r)
            Path(out).write_text(json.dumps(res, indent=1))
            print(name, B, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}),
                  flush=True)


if __name__ == "__main__":
    main()
