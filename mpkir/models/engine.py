"""The generation engine: request queue, continuous batching, paged KV, chunked prefill, sampling,
prompt-lookup speculative decoding, and the device-memory guard.

The engine is host logic only.  One *step* runs the model once over at most ``max_tokens`` tokens
drawn from at most ``max_requests`` requests; the model itself is a pluggable :class:`StepBackend`
(``step(tokens, positions, seq_ids, page_table) -> logits``) — the NumPy interpreter running the
compiled ``.mpk`` graph on the CPU, the megakernel on a GPU, or the independent reference.

Per step:

1. waiting requests are admitted (FIFO) while a slot is free and the pool has the pages for the
   request's whole life (``prompt + max_new_tokens`` positions): a request that does not fit waits,
   it never takes pages another request needs (nothing is preempted, nothing is overwritten);
2. every decoding request gets its next token (plus up to ``spec_k`` prompt-lookup drafts when
   speculative decoding is on), then prompts are prefilled in chunks with the rest of the token
   budget, so a long prompt never stalls running requests;
3. the backend runs; each request whose fed tokens reach its end samples its next token(s) —
   greedy/temperature/top-k/top-p with a per-request seed, the token depending only on
   (seed, position, logits), so it is the same whatever else shares the step;
4. requests that hit EOS or their token limit leave and their pages return to the pool.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mpkir.diagnostics import error

# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks tokens; ``temperature = 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _sample_op():
    try:
        from mpkir.ops.registry import OPS
    except ImportError:  # pragma: no cover
        return None
    return OPS.get("sample")


def sample_token(logits: np.ndarray, position: int, params: SamplingParams) -> int:
    """One token from a logits row: argmax when greedy, else the ``sample`` operator's semantics
    (temperature, top-k, top-p, a counter-based draw from (seed, position))."""
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    if params.greedy:
        return int(np.argmax(row))
    op = _sample_op()
    if op is not None:
        from mpkir.ops.base import RefCtx

        attrs = {
            "temperature": float(params.temperature),
            "top_k": int(params.top_k),
            "top_p": float(params.top_p),
            "seed": int(params.seed),
        }
        (ids,) = op.reference([row[None, :], np.array([position], np.int32)], attrs, RefCtx())
        return int(np.asarray(ids).reshape(-1)[0])
    raise RuntimeError("the 'sample' operator is not registered")


# --------------------------------------------------------------------------- speculative drafts


def ngram_draft(tokens: Sequence[int], n: int, k: int, min_n: int = 1) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the last ``n`` tokens (trying n, n-1, ...
    down to ``min_n``) and propose the ``k`` tokens that followed it."""
    L = len(tokens)
    for m in range(min(n, L - 1), min_n - 1, -1):
        tail = list(tokens[L - m :])
        for s in range(L - m - 1, -1, -1):
            if list(tokens[s : s + m]) == tail:
                return list(tokens[s + m : s + m + k])
    return []


# --------------------------------------------------------------------------- requests


@dataclass
class Request:
    """One generation request and its progress."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    speculative: bool = False
    id: int = 0
    on_tokens: Callable[[Request, list[int]], None] | None = None
    # progress
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # positions whose k/v are in the cache
    finish_reason: str | None = None  # "stop" (a stop token) | "length"
    drafted: int = 0
    accepted: int = 0
    cancelled: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    token_times: list[float] = field(default_factory=list)
    event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)


class StepBackend(Protocol):
    """Runs the model over one step's tokens and returns float logits [T, V] (or token ids [T])."""

    def step(
        self, tokens: np.ndarray, positions: np.ndarray, seq_ids: np.ndarray, page_table: np.ndarray
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class EngineConfig:
    """Sizes the engine schedules into (normally the module's serve block)."""

    max_requests: int = 1
    max_tokens: int = 1
    page_size: int = 64
    num_pages: int = 64
    max_seq_len: int = 4096
    speculative: bool = False
    spec_k: int = 4
    ngram: int = 3
    stop_ids: tuple[int, ...] = ()

    @property
    def pages_per_seq(self) -> int:
        return self.max_seq_len // self.page_size

    @classmethod
    def from_serve(cls, cfg, stop_ids: Sequence[int] = (), **over) -> EngineConfig:
        """From a :class:`mpkir.serve.ServeConfig` (its ``eos_token`` joins ``stop_ids``)."""
        stops = tuple(dict.fromkeys([*stop_ids, *([cfg.eos_token] if cfg.eos_token >= 0 else [])]))
        vals = dict(
            max_requests=cfg.max_requests,
            max_tokens=cfg.max_tokens,
            page_size=cfg.page_size,
            num_pages=cfg.num_pages,
            max_seq_len=cfg.max_seq_len,
            speculative=cfg.speculative == "ngram",
            spec_k=cfg.spec_k,
            ngram=cfg.ngram,
            stop_ids=stops,
        )
        vals.update(over)
        return cls(**vals)


@dataclass
class EngineStats:
    steps: int = 0
    tokens_fed: int = 0
    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    step_time: float = 0.0
    max_batch: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Engine:
    """Continuous batching over a paged KV cache, one backend step at a time."""

    def __init__(self, backend: StepBackend, cfg: EngineConfig):
        if cfg.max_tokens < cfg.max_requests:
            raise ValueError(f"max_tokens {cfg.max_tokens} < max_requests {cfg.max_requests}")
        self.backend = backend
        self.cfg = cfg
        self.free_pages: list[int] = list(range(cfg.num_pages - 1, -1, -1))  # pop() hands out 0, 1, ...
        self._released_slots: list[int] = []  # slots freed since the last step (a backend that pages)
        self.slots: list[Request | None] = [None] * cfg.max_requests
        self.waiting: deque[Request] = deque()
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def pages_needed(self, prompt_len: int, max_new_tokens: int) -> int:
        """Pages for every position a request can write (its last generated token is never fed)."""
        return math.ceil(max(prompt_len + max_new_tokens - 1, 1) / self.cfg.page_size)

    def submit(
        self,
        prompt: Sequence[int],
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop_ids: Sequence[int] | None = None,
        speculative: bool | None = None,
        on_tokens: Callable[[Request, list[int]], None] | None = None,
    ) -> Request:
        """Queue a request (thread-safe).  Raises ValueError for one that can never run."""
        sampling = sampling or SamplingParams()
        sampling.validate()
        prompt = [int(t) for t in prompt]
        c = self.cfg
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= c.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len {c.max_seq_len}")
        max_new_tokens = max(1, min(int(max_new_tokens), c.max_seq_len - len(prompt)))
        if speculative and not sampling.greedy:
            raise ValueError("speculative decoding needs greedy sampling (greedy acceptance)")
        spec = (c.speculative and sampling.greedy) if speculative is None else speculative
        r = Request(
            prompt,
            max_new_tokens,
            sampling,
            tuple(c.stop_ids if stop_ids is None else stop_ids),
            spec,
            next(self._ids),
            on_tokens,
        )
        r.t_submit = time.perf_counter()
        if self.pages_needed(len(prompt), max_new_tokens) > c.num_pages:
            raise ValueError(
                f"request needs {self.pages_needed(len(prompt), max_new_tokens)} KV pages but "
                f"the pool has {c.num_pages}"
            )
        with self._lock:
            self.waiting.append(r)
        return r

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def cancel(self, r: Request) -> None:
        """Stop a request (thread-safe): it leaves at the start of the next step, its pages freed."""
        r.cancelled = True

    def _retire_cancelled(self) -> list[Request]:
        gone = []
        with self._lock:
            for r in [x for x in self.waiting if x.cancelled]:
                self.waiting.remove(r)
                gone.append(r)
        gone += [r for r in self.running if r.cancelled]
        for r in gone:
            r.finish_reason = r.finish_reason or "cancelled"
            self._release(r)
        return gone

    def _admit(self) -> None:
        with self._lock:
            while self.waiting:
                r = self.waiting[0]
                slot = next((i for i, s in enumerate(self.slots) if s is None), None)
                need = self.pages_needed(len(r.prompt), r.max_new_tokens)
                if slot is None or need > len(self.free_pages):
                    break  # FIFO: later requests wait behind the head (no starvation)
                self.waiting.popleft()
                r.slot = slot
                r.pages = [self.free_pages.pop() for _ in range(need)]
                self.slots[slot] = r

    def _release(self, r: Request) -> None:
        self.free_pages.extend(reversed(r.pages))
        r.pages = []
        if r.slot is not None:
            self.slots[r.slot] = None
            if getattr(self.backend, "allocates_pages", False):
                self._released_slots.append(r.slot)
        r.slot = None
        r.t_done = time.perf_counter()
        r.event.set()
        if r.on_tokens is not None:
            r.on_tokens(r, [])  # the end of the stream

    # ------------------------------------------------------------------ one step
    def _plan(self) -> list[tuple[Request, list[int], int]]:
        """(request, tokens to feed, how many of them are drafts) for this step."""
        c = self.cfg
        budget = c.max_tokens
        plan: list[tuple[Request, list[int], int]] = []
        decoding = [r for r in self.running if len(r.tokens) - r.computed == 1]
        prefilling = [r for r in self.running if len(r.tokens) - r.computed > 1]
        for r in decoding:
            if budget == 0:
                break
            plan.append((r, [r.tokens[-1]], 0))
            budget -= 1
        for i, (r, toks, _) in enumerate(plan):
            if not r.speculative or budget == 0:
                continue
            room = len(r.pages) * c.page_size - (r.computed + 1)  # positions left in its pages
            k = min(c.spec_k, budget, room, r.max_new_tokens - len(r.output) - 1)
            if k <= 0:
                continue
            draft = ngram_draft(r.tokens, c.ngram, k)
            if draft:
                plan[i] = (r, toks + draft, len(draft))
                budget -= len(draft)
        for r in prefilling:
            if budget == 0:
                break
            pending = r.tokens[r.computed :]
            chunk = pending[:budget]
            plan.append((r, chunk, 0))
            budget -= len(chunk)
        return plan

    def step(self) -> list[Request]:
        """Admit, run one backend step, sample, retire.  Returns the requests that finished."""
        gone = self._retire_cancelled()
        self._admit()
        plan = self._plan()
        if not plan:
            return gone
        c = self.cfg
        tokens, positions, seq_ids = [], [], []
        for r, toks, _ in plan:
            tokens.extend(toks)
            positions.extend(range(r.computed, r.computed + len(toks)))
            seq_ids.extend([r.slot] * len(toks))
        table = np.zeros((c.max_requests, c.pages_per_seq), np.int32)
        for r in self.running:
            table[r.slot, : len(r.pages)] = r.pages
        extra = {"sampling": self._row_sampling(plan, len(tokens))} if getattr(
            self.backend, "samples_rows", False) else {}
        if getattr(self.backend, "allocates_pages", False):  # it picks the pages; the host counts them
            extra["released"], self._released_slots = self._released_slots, []
        t0 = time.perf_counter()
        out = self.backend.step(
            np.asarray(tokens, np.int32),
            np.asarray(positions, np.int32),
            np.asarray(seq_ids, np.int32),
            table,
            **extra,
        )
        now = time.perf_counter()
        out = np.asarray(out)
        st = self.stats
        st.steps += 1
        st.tokens_fed += len(tokens)
        st.step_time += now - t0
        st.max_batch = max(st.max_batch, len(plan))
        finished: list[Request] = []
        row = 0
        for r, toks, ndraft in plan:
            rows = out[row : row + len(toks)]
            row += len(toks)
            if r.computed + len(toks) < len(r.tokens):  # a prefill chunk that does not reach the end
                r.computed += len(toks)
                continue
            new = self._accept(r, toks, ndraft, rows)
            r.computed += len(toks) - ndraft + (len(new) - 1 if ndraft else 0)
            emitted = self._append(r, new, now)
            if emitted and r.on_tokens is not None:
                r.on_tokens(r, emitted)
            if r.done:
                finished.append(r)
        for r in finished:
            self._release(r)
        return gone + finished

    @staticmethod
    def _row_sampling(plan, ntokens: int) -> list[tuple[float, int, float, int, int]]:
        """For a backend that samples: (temperature, top_k, top_p, seed, position) of every row of the step,
        exactly the draws :meth:`_accept` would make from logits (rows it does not read are greedy)."""
        rows = [(0.0, 0, 1.0, 0, 0)] * ntokens
        row = 0
        for r, toks, ndraft in plan:
            if r.computed + len(toks) >= len(r.tokens):  # rows that produce tokens
                sp, pos, base = r.sampling, len(r.tokens), row + len(toks) - ndraft - 1
                temperature = 0.0 if sp.greedy else float(sp.temperature)
                for j in range(ndraft + 1):
                    rows[base + j] = (temperature, int(sp.top_k), float(sp.top_p), int(sp.seed), pos + j)
            row += len(toks)
        return rows

    def _pick(self, r: Request, logits_or_id: np.ndarray, position: int) -> int:
        if logits_or_id.ndim == 0:
            return int(logits_or_id)
        return sample_token(logits_or_id, position, r.sampling)

    def _accept(self, r: Request, toks: list[int], ndraft: int, rows: np.ndarray) -> list[int]:
        """New tokens from the last rows: one sample, or the accepted drafts plus one (greedy)."""
        pos = len(r.tokens)  # position of the token being produced
        if not ndraft:
            return [self._pick(r, rows[-1], pos)]
        base = len(toks) - ndraft - 1  # row of the last real token
        drafts = toks[base + 1 :]
        new: list[int] = []
        for j in range(ndraft + 1):
            g = self._pick(r, rows[base + j], pos + j)
            new.append(g)
            if j == ndraft or drafts[j] != g:
                break
        a = len(new) - 1
        r.drafted += ndraft
        r.accepted += a
        self.stats.drafted += ndraft
        self.stats.accepted += a
        return new

    def _append(self, r: Request, new: list[int], now: float) -> list[int]:
        emitted: list[int] = []
        for t in new:
            if t in r.stop_ids:
                r.finish_reason = "stop"
                break
            r.output.append(t)
            emitted.append(t)
            r.token_times.append(now)
            if len(r.output) >= r.max_new_tokens:
                r.finish_reason = "length"
                break
        if r.t_first is None:
            r.t_first = now
        self.stats.generated += len(emitted)
        return emitted

    # ------------------------------------------------------------------ drivers
    def run(self, max_steps: int | None = None) -> None:
        """Step until every submitted request finished."""
        n = 0
        while self.has_work():
            if not self.plan_possible():
                raise RuntimeError("no request can make progress")  # pragma: no cover - a bug guard
            self.step()
            n += 1
            if max_steps is not None and n >= max_steps:
                return

    def plan_possible(self) -> bool:
        if any(r is not None for r in self.slots):
            return True
        if not self.waiting:
            return False
        r = self.waiting[0]
        return self.pages_needed(len(r.prompt), r.max_new_tokens) <= len(self.free_pages)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        **kw,
    ) -> list[Request]:
        """Submit a batch of prompts, run to completion, return the requests (in prompt order)."""
        samp = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        reqs = [self.submit(p, max_new_tokens, s, **kw) for p, s in zip(prompts, samp, strict=False)]
        self.run()
        return reqs


class BackgroundEngine:
    """Runs an :class:`Engine` on its own thread so requests can join while it runs (the server)."""

    def __init__(self, engine: Engine, idle_wait: float = 0.005):
        self.engine = engine
        self.idle_wait = idle_wait
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="mpkir-engine", daemon=True)
        self.thread.start()

    def submit(self, *a, **kw) -> Request:
        r = self.engine.submit(*a, **kw)
        self._wake.set()
        return r

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(self.idle_wait * 20)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except BaseException as e:  # the engine is broken: fail every request
                self.error = e
                for r in [*self.engine.running, *self.engine.waiting]:
                    r.finish_reason = "error"
                    r.event.set()
                    if r.on_tokens is not None:
                        r.on_tokens(r, [])
                return

    def close(self) -> None:
        """Stop the engine thread, then the backend (the resident megakernel ends its launch)."""
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=10)
        close_backend = getattr(self.engine.backend, "close", None)
        if close_backend is not None and not self.thread.is_alive():
            close_backend()


# --------------------------------------------------------------------------- memory guard

DEVICE_MEMORY_GB = {"h100": 80, "h200": 141, "a100": 80, "b200": 192, "l40s": 48, "rtx4090": 24}
"""Memory of each serve ``target`` (GB, 10^9 bytes) when the device cannot be asked."""


@dataclass(frozen=True)
class MemoryPlan:
    weight_bytes: int
    state_bytes: int
    detail: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.weight_bytes + self.state_bytes


def memory_plan(module, analysis, weight_dtype=None) -> MemoryPlan:
    """Bytes of the module's weights and states (the KV cache), from the declared types."""
    from mpkir.semantics import eval_int

    def count(d) -> int:
        return 1 if d.index is None else eval_int(d.index.count, analysis.env, "layer count")

    def nbytes(d, dtype=None) -> int:
        t = analysis.globals[d.name]
        n = int(np.prod([int(x) for x in t.shape])) * count(d)
        return n * (dtype.itemsize if dtype is not None else t.dtype.itemsize)

    wb = sum(nbytes(w, weight_dtype) for w in module.weights)
    sb = sum(nbytes(s) for s in module.states)
    detail = tuple(
        f"state {s.name}: {count(s)} x {analysis.globals[s.name]} = {_gb(nbytes(s))}" for s in module.states
    )
    return MemoryPlan(wb, sb, detail)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def host_memory_bytes() -> int:
    """Memory this process can still take (MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 0


def check_fits(plan: MemoryPlan, capacity: int, device: str, headroom: float = 0.9) -> None:
    """Refuse a model + KV cache that cannot fit in ``headroom`` x ``capacity`` bytes, with the numbers."""
    if capacity <= 0:
        return
    limit = int(capacity * headroom)
    if plan.total > limit:
        raise error(
            f"model does not fit on {device}: weights {_gb(plan.weight_bytes)} + KV cache/state "
            f"{_gb(plan.state_bytes)} = {_gb(plan.total)} > {_gb(limit)} usable ({headroom:.0%} of "
            f"{_gb(capacity)})",
            None,
            *plan.detail,
            "fewer num_pages / max_requests / max_seq_len in the serve block shrink the KV cache",
        )
