"""Greedy-token identity of the exact megakernel (``numerics="exact"``) with the same model in PyTorch on the
device (bench/torch_ref.py, mode 'exact': float64, rounded float64 -> float32 -> bf16 where the IR rounds),
random weights (seed 0), random KV cache, 1024-token context, JSON to argv[1]:

    python bench/exact_parity.py OUT.json llama3_2_1b,qwen3_0_6b [steps] [1,8]

Per model and batch: the kernel's ``steps`` greedy tokens from one launch vs PyTorch's own greedy run;
teacher forced (one launch per step on PyTorch's tokens): how many bf16 logits differ in their bits; the
exact and the default (fast) plan's ms per step (median of 5 launches of ``steps`` steps); and the fast
plan's free-running tokens against the same PyTorch run, for comparison.
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

from mpkir.parser import parse_file
from mpkir.runtime.host import Megakernel
from mpkir.semantics import build_env

CTX = 1024


def free_and_time(mk, toks, steps):
    mk.set_inputs(toks, np.full(len(toks), CTX))
    mk.launch(steps)
    got = mk.tokens()
    ms = sorted(mk.launch(steps) for _ in range(5))[2] / steps
    return got, ms


def run(name, B, steps, res):
    m, _ = parse_file(f"examples/{name}.mpk")
    env, _ = build_env(m)
    toks = np.random.default_rng(1 + B).integers(0, int(env.consts["vocab"]), B)
    mk = Megakernel(m, batch=B, numerics="exact")
    mk.init_random(0)
    got, ms_exact = free_and_time(mk, toks, steps)
    ref_toks, ref_logits = TorchRef(mk, env, "exact").generate(list(toks), CTX, steps)
    ref = np.stack(ref_toks)
    eq = got == ref
    differing, disagree = [], 0
    for s in range(steps):
        mk.set_inputs(toks if s == 0 else ref[s - 1], np.full(B, CTX + s))
        mk.poison()
        mk.launch(1)
        kb = torch.from_dlpack(mk.bufs[mk.plan.logits])[:B].view(torch.int16)
        rb = ref_logits[s].float().to(torch.bfloat16).view(torch.int16)
        differing.append(int((kb != rb).sum()))
        disagree += int((mk.tokens()[0] != ref[s]).sum())
    V = ref_logits[0].shape[-1]
    regs, smem = mk.kernel.num_regs, mk.plan.smem_bytes
    del mk
    fast = Megakernel(m, batch=B)
    fast.init_random(0)
    got_fast, ms_fast = free_and_time(fast, toks, steps)
    del fast
    r = {
        "steps": steps,
        "free_running_tokens_equal": int(eq.sum()),
        "of": int(eq.size),
        "first_divergence_step_per_request": [int(np.argmax(~eq[:, b])) if not eq[:, b].all() else -1
                                              for b in range(B)],
        "teacher_forced_logits_bits_differing": int(sum(differing)),
        "teacher_forced_logits_compared": steps * B * V,
        "teacher_forced_argmax_disagreements": disagree,
        "exact_ms_per_step": ms_exact,
        "fast_ms_per_step": ms_fast,
        "exact_regs": regs,
        "exact_smem_bytes": smem,
        "fast_vs_torch_exact_free_running_tokens_equal": int((got_fast == ref).sum()),
    }
    res[f"{name}/b{B}"] = r
    print(f"{name:12s} B={B}: exact kernel vs PyTorch (exact) free-running {r['free_running_tokens_equal']}/"
          f"{r['of']} tokens, first divergence {r['first_divergence_step_per_request']}; teacher forced "
          f"{r['teacher_forced_logits_bits_differing']} of {r['teacher_forced_logits_compared']} bf16 logits "
          f"differ, {disagree} argmax disagreements; exact {ms_exact:.3f} ms/step (fast {ms_fast:.3f}); "
          f"fast kernel vs the same PyTorch run "
          f"{r['fast_vs_torch_exact_free_running_tokens_equal']}/{r['of']}",
          flush=True)
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def main():
    out, models = sys.argv[1], sys.argv[2].split(",")
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    batches = [int(b) for b in sys.argv[4].split(",")] if len(sys.argv) > 4 else [1, 8]
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name in models:
        for B in batches:
            run(name, B, steps, res)
            Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
