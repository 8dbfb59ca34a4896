"""The generation engine over the independent paged reference backend (no interpreter needed)."""

from __future__ import annotations

import numpy as np
import pytest

from mpkir.diagnostics import MpkError
from mpkir.models.engine import (
    BackgroundEngine,
    Engine,
    EngineConfig,
    MemoryPlan,
    SamplingParams,
    check_fits,
    ngram_draft,
    sample_token,
)
from mpkir.models.reference import PagedReferenceBackend, ReferenceModel, random_checkpoint

CFG = dict(
    model_type="llama",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    vocab_size=97,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def model():
    return ReferenceModel(random_checkpoint(CFG, seed=3), CFG)


def _engine(model, **kw):
    ec = EngineConfig(
        **{**dict(max_requests=3, max_tokens=8, page_size=4, num_pages=48, max_seq_len=64), **kw}
    )
    return Engine(PagedReferenceBackend(model, ec.num_pages, ec.page_size), ec)


def _prompts(seed=0, lens=(3, 17, 9, 30, 5)):
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(0, CFG["vocab_size"], n)] for n in lens]


def test_batched_equals_alone_and_reference(model):
    prompts = _prompts()
    ref = [model.greedy(p, 10) for p in prompts]
    e = _engine(model)
    reqs = e.generate(prompts, 10)
    assert [r.output for r in reqs] == ref
    assert e.stats.max_batch == 3  # really batched, with more prompts than slots
    for p, want in zip(prompts, ref, strict=False):
        alone = _engine(model, max_requests=1, max_tokens=8).generate([p], 10)[0]
        assert alone.output == want


def test_chunked_prefill_mixes_with_decode(model):
    prompts = _prompts(1, (40, 2))
    ref = [model.greedy(p, 8) for p in prompts]
    e = _engine(model, max_tokens=4, max_requests=2)
    reqs = [e.submit(prompts[1], 8)]
    e.step()  # the short one starts decoding
    reqs.insert(0, e.submit(prompts[0], 8))  # a long prompt joins: prefilled 3 tokens a step
    steps_before = e.stats.steps
    decoded_meanwhile = 0
    while not reqs[0].output and e.has_work():
        n = len(reqs[1].output)
        e.step()
        decoded_meanwhile += len(reqs[1].output) - n
    assert e.stats.steps - steps_before > 5  # the long prompt took several chunks...
    assert decoded_meanwhile >= 5  # ...while the running request kept decoding
    e.run()
    assert [r.output for r in reqs] == ref


def test_requests_joining_mid_run_do_not_change_others(model):
    prompts = _prompts(2)
    ref = [model.greedy(p, 12) for p in prompts]
    e = _engine(model, max_requests=4, max_tokens=16)
    reqs = [e.submit(prompts[0], 12)]
    for p in prompts[1:]:
        e.step()
        e.step()
        reqs.append(e.submit(p, 12))
    e.run()
    assert [r.output for r in reqs] == ref


def test_background_engine_serves_then_closes_its_backend(model):
    """The server's engine thread: requests joining while it runs get their greedy tokens, and close()
    stops the backend too (the resident megakernel ends its launch)."""
    prompts = _prompts(4, lens=(6, 11))
    e = _engine(model, max_requests=2, max_tokens=16)
    closed = []
    e.backend.close = lambda: closed.append(True)
    bg = BackgroundEngine(e)
    reqs = [bg.submit(p, 8) for p in prompts]
    assert all(r.wait(timeout=60) for r in reqs)
    bg.close()
    assert [r.output for r in reqs] == [model.greedy(p, 8) for p in prompts]
    assert closed == [True] and not bg.thread.is_alive()


def test_out_of_pages_queues_instead_of_corrupting(model):
    prompts = _prompts(3, (20, 20, 20))
    ref = [model.greedy(p, 8) for p in prompts]
    # each request needs ceil(27/4) = 7 pages; 10 pages hold one at a time
    e = _engine(model, num_pages=10, max_requests=3, max_tokens=24)
    reqs = [e.submit(p, 8) for p in prompts]
    e.step()
    assert len(e.running) == 1 and len(e.waiting) == 2
    e.run()
    assert [r.output for r in reqs] == ref
    assert sorted(e.free_pages) == list(range(10))
    with pytest.raises(ValueError, match="pages"):
        e.submit(list(range(50)), 8)  # can never fit: refused, not queued forever


def test_speculative_gives_exactly_greedy(model):
    rng = np.random.default_rng(5)
    motif = [int(x) for x in rng.integers(0, 97, 6)]
    prompts = [motif * 4, _prompts(4, (12,))[0], motif * 2 + [1, 2, 3]]
    ref = [model.greedy(p, 16) for p in prompts]
    e = _engine(model, speculative=True, spec_k=3, ngram=2, max_tokens=16)
    reqs = e.generate(prompts, 16)
    assert [r.output for r in reqs] == ref
    assert e.stats.drafted > 0
    assert 0 <= e.stats.acceptance_rate <= 1
    assert e.stats.steps < sum(len(r.output) for r in reqs)  # fewer steps than tokens: drafts helped


def test_eos_and_max_tokens(model):
    p = _prompts(6, (7,))[0]
    full = model.greedy(p, 10)
    e = _engine(model, stop_ids=(full[4],))
    r = e.generate([p], 10)[0]
    assert r.output == full[: full.index(full[4])] and r.finish_reason == "stop"
    r = _engine(model).generate([p], 3)[0]
    assert r.output == full[:3] and r.finish_reason == "length"


def test_sampling_reproducible_per_seed(model):
    prompts = _prompts(7, (5, 9))
    sp = SamplingParams(temperature=1.5, top_k=20, top_p=0.95, seed=11)
    a = _engine(model).generate(prompts, 12, sp)
    b = _engine(model, max_requests=1).generate(prompts, 12, sp)
    assert [r.output for r in a] == [r.output for r in b]
    c = _engine(model).generate(prompts, 12, SamplingParams(temperature=1.5, top_k=20, top_p=0.95, seed=12))
    assert [r.output for r in a] != [r.output for r in c]
    g = _engine(model).generate(prompts, 12, SamplingParams(temperature=0.7, top_k=1, seed=3))
    assert [r.output for r in g] == [model.greedy(p, 12) for p in prompts]


def test_sample_token_semantics():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    top = set(np.argsort(-logits)[:5].tolist())
    draws = [sample_token(logits, pos, SamplingParams(1.0, top_k=5, seed=1)) for pos in range(200)]
    assert set(draws) <= top and len(set(draws)) > 1
    assert draws == [sample_token(logits, pos, SamplingParams(1.0, top_k=5, seed=1)) for pos in range(200)]
    nucleus = [sample_token(logits, pos, SamplingParams(1.0, top_p=1e-6, seed=2)) for pos in range(20)]
    assert set(nucleus) == {int(np.argmax(logits))}
    assert sample_token(logits, 0, SamplingParams()) == int(np.argmax(logits))


def test_ngram_draft():
    assert ngram_draft([1, 2, 3, 4, 9, 1, 2, 3], 3, 2) == [4, 9]
    assert ngram_draft([5, 6, 7], 3, 2) == []
    assert ngram_draft([1, 2, 8, 8, 2], 2, 3) == [8, 8, 2]  # falls back to a 1-gram


def test_cancel_frees_pages(model):
    e = _engine(model)
    r = e.submit(_prompts(8, (10,))[0], 30)
    e.step()
    assert r.pages
    e.cancel(r)
    e.step()
    assert r.finish_reason == "cancelled" and not e.running and len(e.free_pages) == 48


def test_memory_guard_refuses_with_numbers():
    plan = MemoryPlan(weight_bytes=16_000_000_000, state_bytes=70_000_000_000, detail=("state k_cache: ...",))
    with pytest.raises(MpkError) as ei:
        check_fits(plan, 80_000_000_000, "h100")
    msg = str(ei.value)
    assert "16.000 GB" in msg and "70.000 GB" in msg and "86.000 GB" in msg and "h100" in msg
    check_fits(MemoryPlan(1_000, 1_000), 80_000_000_000, "h100")


class _RowSampler:
    """A backend that draws the tokens itself (as the resident kernel with ``kernel_sampling``): the engine
    hands it each row's (temperature, top_k, top_p, seed, position); it returns ids."""

    samples_rows = True

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def step(self, tokens, positions, seq_ids, page_table, sampling=None):
        logits = np.asarray(self.inner.step(tokens, positions, seq_ids, page_table))
        assert sampling is not None and len(sampling) == len(tokens)
        self.calls.append(sampling)
        return np.array([sample_token(logits[i], pos, SamplingParams(t, k, p, s))
                         for i, (t, k, p, s, pos) in enumerate(sampling)], np.int64)


def test_a_backend_that_samples_rows_gets_the_draws_the_engine_would_make(model):
    """Per-request parameters (greedy with drafts, several sampled seeds), chunked prefill: the tokens are
    those of host-side sampling from logits, so a sampling kernel needs nothing else from the engine."""
    rng = np.random.default_rng(8)
    motif = [int(x) for x in rng.integers(0, 97, 5)]
    prompts = [motif * 4, *_prompts(9, (30, 6, 11))]
    samp = [SamplingParams(), SamplingParams(1.2, top_k=30, top_p=0.9, seed=4),
            SamplingParams(0.8, top_p=0.5, seed=2**63 + 5), SamplingParams(2.0, top_k=3, seed=-7)]
    kw = dict(speculative=True, spec_k=3, ngram=2, max_tokens=12)
    want = [r.output for r in _engine(model, **kw).generate(prompts, 14, samp)]
    e = _engine(model, **kw)
    e.backend = _RowSampler(e.backend)
    got = [r.output for r in e.generate(prompts, 14, samp)]
    assert got == want
    assert e.stats.drafted > 0
    assert e._released_slots == []   # a backend that does not page is never sent released slots
    draws = [row for call in e.backend.calls for row in call if row[0] > 0]
    assert {row[3] for row in draws} == {4, 2**63 + 5, -7}     # every sampled request's seed reached it
