"""The CUDA backend of the tensor-parallel launcher: one rank megakernel (``runtime.host.TPMegakernel``) per
process, symmetric memory exchanged through CUDA IPC handles, or every rank in one process (direct pointers,
one stream each).  Ranks may share ONE GPU (each on ``1/N`` of the SMs: ``share_gpu``), which is how the
protocol is tested where only one GPU is lent: IPC handles work between processes on one device.

Every rank: parse, shard for its rank, slice the full random checkpoint (seed), build and compile its
megakernel, publish its arena handle, barrier, map the peers, zero its counters, barrier, launch ``steps``
greedy decode steps in one launch, barrier (peers may still read its arena), report its tokens.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np


def rank_setup(text: str, path: str, rank: int, n: int, seed: int, num_sms: int | None, co_resident: int,
               batch: int | None = None):
    """Rank ``rank``'s megakernel with its weight slices loaded, and the step-1 tokens (every rank's)."""
    from mpkir.interpreter import random_weights
    from mpkir.models.shard import shard_weights
    from mpkir.parser import parse
    from mpkir.passes.shard import shard_module
    from mpkir.runtime.host import TPMegakernel, upload_weights
    from mpkir.verify import analyze

    full = parse(text, path)
    mod = shard_module(full, rank, n)
    weights = shard_weights(mod, random_weights(full, analyze(full), seed=seed))
    mk = TPMegakernel(mod, rank, n, num_sms=num_sms, co_resident=co_resident, batch=batch)
    upload_weights(mk, weights)
    return mk, first_tokens(full, mk.B, seed)


def first_tokens(module, B: int, seed: int) -> np.ndarray:
    from mpkir.semantics import build_env

    env, _ = build_env(module)
    vocab = int(env.consts.get("vocab", 64))
    return np.random.default_rng(seed + 1).integers(0, vocab, B).astype(np.int32)


def run_in_process(text: str, n: int, steps: int, seed: int = 0, path: str = "<input>",
                   share_gpu: bool = True, batch: int | None = None) -> tuple[np.ndarray, list[float], list]:
    """All ``n`` ranks in this process on the current GPU (co-resident kernels on their own streams):
    tokens [steps, B] (asserted equal on every rank), per-rank ms, the rank megakernels."""
    mks = []
    for r in range(n):
        mk, tok = rank_setup(text, path, r, n, seed, None, n if share_gpu else 1, batch)
        mks.append(mk)
    for mk in mks:
        mk.map_peers([m.arena_ptr for m in mks])
    toks, ms = launch_all(mks, tok, steps)
    return toks, ms, mks


def launch_all(mks, tok, steps: int) -> tuple[np.ndarray, list[float]]:
    """One launch of every rank of this process (counters zeroed on all before any starts): the tokens
    [steps, B] (checked equal on every rank) and per-rank ms."""
    for mk in mks:
        mk.set_inputs(tok, np.zeros(len(tok), np.int32))
        mk.prepare(steps)
    for mk in mks:
        mk.start(steps)
    ms = [mk.finish() for mk in mks]
    toks = [mk.tokens() for mk in mks]
    n = len(mks)
    for r in range(1, n):
        if not np.array_equal(toks[r], toks[0]):
            raise RuntimeError(f"rank {r} tokens {toks[r].tolist()} differ from rank 0's {toks[0].tolist()}")
    return toks[0], ms


def _rank_main(rank, n, text, path, steps, seed, handles, barrier, results, timeout_s, batch):
    try:
        mk, tok = rank_setup(text, path, rank, n, seed, None, n, batch)
        handles[rank] = mk.ipc_handle()
        barrier.wait(timeout_s)                       # every arena exists
        mk.map_peers([handles[q] for q in range(n)])
        mk.set_inputs(tok, np.zeros(len(tok), np.int32))
        mk.prepare(steps)
        barrier.wait(timeout_s)                       # every rank's counters are zero
        mk.start(steps)
        err = None
        try:
            ms = mk.finish()
        except Exception as e:
            err = e
        barrier.wait(timeout_s)                       # nobody reads our arena any more
        if err is not None:
            raise err
        results.put((rank, "ok", (mk.tokens().tolist(), ms, mk.device_name, mk.plan.num_sms)))
    except Exception as e:
        barrier.abort()
        results.put((rank, "error", f"{type(e).__name__}: {e}"))


def launch_gpu(text: str, gpus: int, steps: int = 8, seed: int = 0, path: str = "<input>",
               timeout_s: float = 120.0, batch: int | None = None) -> list[tuple]:
    """One process per rank, all on the current GPU (CUDA IPC between the processes): per rank
    ``(tokens [steps][B], ms, device, workers)``.  Raises RuntimeError with every rank's error."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    with ctx.Manager() as man:
        handles = man.dict()
        barrier = ctx.Barrier(gpus)
        results = ctx.Queue()
        procs = [ctx.Process(target=_rank_main, args=(r, gpus, text, path, steps, seed, handles, barrier,
                                                      results, timeout_s, batch)) for r in range(gpus)]
        for p in procs:
            p.start()
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout_s * 2
        while len(got) < gpus and time.monotonic() < deadline:
            try:
                r, status, payload = results.get(timeout=1.0)
                got[r] = (status, payload)
            except Exception:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {got[r][1]}" for r in sorted(got) if got[r][0] != "ok"]
    missing = [r for r in range(gpus) if r not in got]
    if errors or missing:
        raise RuntimeError("; ".join(errors + [f"rank {r}: no result" for r in missing]))
    return [got[r][1] for r in range(gpus)]
