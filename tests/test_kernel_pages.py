"""KV pages allocated and freed by the serving kernel (codegen/mk_pages.cuh), its text compiled as C++ on the
CPU: the engine only counts pages and tells which request slots left; generation is unchanged."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from mpkir.models.engine import Engine, EngineConfig, SamplingParams
from mpkir.models.reference import PagedReferenceBackend, ReferenceModel, random_checkpoint
from mpkir.testing.cta import compile_source, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")

ENTRY = r"""
extern "C" int cpu_pages_step(int* kp, int R, int P, int* table, int pps, int page_size, const int* released,
                              int nrel, const int* seq_ids, const int* positions, int T) {
  return mk_pages_step(kp, R, P, table, pps, page_size, released, nrel, seq_ids, positions, T);
}
"""
CFG = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, intermediate_size=48, vocab_size=97, rope_theta=10000.0, rms_norm_eps=1e-5,
           tie_word_embeddings=False)


def _ptr(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_int))


class KernelPool:
    """The kernel's page state (top, pages held per slot, free stack) and page table, stepped by the C++."""

    def __init__(self, R: int, P: int, pps: int, page_size: int):
        self.lib = compile_source(["mk_pages.cuh"], 1, ENTRY)
        self.R, self.P, self.pps, self.page_size = R, P, pps, page_size
        self.kp = np.zeros(1 + R + P, np.int32)
        self.kp[0], self.kp[1 + R:] = P, np.arange(P - 1, -1, -1)
        self.table = np.zeros((R, pps), np.int32)

    def step(self, released, seq_ids, positions) -> bool:
        rel = np.ascontiguousarray(released, np.int32)
        sid, pos = (np.ascontiguousarray(a, np.int32) for a in (seq_ids, positions))
        return bool(self.lib.cpu_pages_step(_ptr(self.kp), self.R, self.P, _ptr(self.table), self.pps,
                                            self.page_size, _ptr(rel), len(rel), _ptr(sid), _ptr(pos),
                                            len(sid)))

    def held(self) -> list[list[int]]:
        return [self.table[s, : self.kp[1 + s]].tolist() for s in range(self.R)]


class KernelPagesBackend:
    """The reference backend behind the kernel's allocator, as the resident kernel with in-kernel pages."""

    allocates_pages = True

    def __init__(self, inner, pool: KernelPool):
        self.inner, self.pool, self.steps = inner, pool, 0

    def step(self, tokens, positions, seq_ids, page_table, released=()):
        assert self.pool.step(released, seq_ids, positions), "the kernel's pool ran dry"
        pages = [p for h in self.pool.held() for p in h]
        assert len(pages) == len(set(pages)), "a page held by two requests"
        self.steps += 1
        return self.inner.step(tokens, positions, seq_ids, self.pool.table.copy())


def test_generation_with_kernel_allocated_pages_equals_host_pages():
    model = ReferenceModel(random_checkpoint(CFG, seed=3), CFG)
    ec = EngineConfig(max_requests=3, max_tokens=8, page_size=4, num_pages=30, max_seq_len=64)
    rng = np.random.default_rng(2)
    prompts = [[int(x) for x in rng.integers(0, 97, n)] for n in (3, 17, 9, 30, 5, 22, 1)]
    samp = [SamplingParams(0.9, top_k=20, seed=s) if s % 2 else SamplingParams() for s in range(len(prompts))]

    def run(kernel: bool):
        backend = PagedReferenceBackend(model, ec.num_pages, ec.page_size)
        pool = KernelPool(ec.max_requests, ec.num_pages, ec.pages_per_seq, ec.page_size)
        e = Engine(KernelPagesBackend(backend, pool) if kernel else backend, ec)
        reqs = e.generate(prompts, 9, samp)
        return [r.output for r in reqs], e, pool

    want, _, _ = run(False)
    got, e, pool = run(True)
    assert got == want
    assert e.stats.max_batch == 3 and e.backend.steps == e.stats.steps
    assert pool.kp[0] < pool.P or not any(pool.held())   # pages were taken ...
    assert pool.step(e._released_slots, [], [])           # ... and the last releases return every one
    assert pool.kp[0] == pool.P and not any(pool.held())
    assert sorted(pool.kp[1 + pool.R:].tolist()) == list(range(pool.P))


def test_the_kernel_pool_grows_a_request_page_by_page_and_refuses_when_dry():
    pool = KernelPool(R=2, P=5, pps=4, page_size=4)
    assert pool.step([], [0, 0, 1], [0, 5, 3])            # slot 0 reaches position 5: 2 pages; slot 1: 1
    assert pool.held() == [[0, 1], [2]]
    assert pool.step([], [0], [6]) and pool.held() == [[0, 1], [2]]   # position 6: still 2 pages
    assert pool.step([], [1], [11]) and pool.held() == [[0, 1], [2, 3, 4]]   # position 11: 3 pages
    assert not pool.step([], [0], [8])                     # a third page for slot 0: the pool is dry
    assert pool.step([1], [0], [8]) and pool.held()[1] == [] and len(pool.held()[0]) == 3
    assert pool.step([0, 7, -1], [], []) and pool.kp[0] == 5   # unknown slots are ignored
    assert pool.step([], [-1, 1], [40, 0]) and pool.held() == [[], [0]]   # padding rows take nothing


@pytest.mark.parametrize("page_slots", range(10))
def test_ring_slots_stay_16_byte_aligned(page_slots):
    """Every ring slot starts 16-byte aligned whatever the number of request slots (the kernel reads the step
    number as a 64-bit word and the inputs with 16-byte loads; an odd count used to break both), and the
    host's step number lands in the slot's first 64-bit word."""
    from mpkir.runtime.host import _publish_step, ring_slot_ints

    width = ring_slot_ints(16 + 8 * 3, page_slots)
    assert width % 4 == 0 and width >= 16 + 8 * 3 + page_slots
    ring = np.zeros((3, width), np.int32)
    _publish_step(ring[1], (2 << 32) + 5)
    assert ring[1, :2].tolist() == [5, 2] and not ring[0].any() and not ring[2].any()
