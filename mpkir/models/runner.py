"""What ``generate`` and ``serve`` share: load a model, pick the device, build the engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpkir.diagnostics import error
from mpkir.models.engine import Engine, EngineConfig, SamplingParams
from mpkir.models.loader import LoadedModel, Progress, load_model


@dataclass
class Runner:
    loaded: LoadedModel
    engine: Engine
    device: str
    precision: str
    default_sampling: SamplingParams

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def describe(self) -> str:
        s = self.loaded.serve
        where = "NumPy interpreter" if self.device == "cpu" else "megakernel"
        return (
            f"{self.loaded.module.model_name} from {self.loaded.checkpoint.name} ({self.loaded.fmt}) via "
            f"{self.loaded.mpk_path.name}; {self.device} ({where}, {self.precision}); batch "
            f"{s.max_requests}, {s.max_tokens} tokens/step, {s.num_pages} KV pages of {s.page_size}"
        )


def serve_sampling(cfg) -> SamplingParams:
    """The serve block's sampling settings as the default of every request."""
    if cfg.sampling == "greedy":
        return SamplingParams()
    return SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)


def gpu_step_backend_ready() -> bool:
    """Whether the megakernel runtime offers the engine's step function (``make_step_backend``)."""
    try:
        from mpkir.runtime import host
    except Exception:
        return False
    return hasattr(host, "make_step_backend")


def pick_device(device: str) -> str:
    from mpkir.models.backends import gpu_available

    if device == "auto":
        return "gpu" if gpu_available() and gpu_step_backend_ready() else "cpu"
    if device == "gpu" and not gpu_available():
        raise error("--device gpu: no CUDA device (or CuPy) is available here; use --device cpu")
    return device


def open_runner(
    model: str | Path | None = None,
    *,
    mpk: str | Path | None = None,
    device: str = "auto",
    precision: str = "f32",
    batch: int = 1,
    step_tokens: int | None = None,
    max_seq_len: int | None = None,
    speculative: bool = False,
    spec_k: int | None = None,
    ngram: int | None = None,
    progress: Progress | None = None,
    gpu_backend: str | None = None,
    greedy_only: bool = False,
    kernel_sampling: bool | None = None,
    kernel_pages: bool | None = None,
    numerics: str = "fast",
) -> Runner:
    """Load ``model`` (path or ``default``) and build an engine for ``batch`` concurrent requests.

    ``step_tokens`` is the token budget of one step (chunked prefill + decode), by default enough for
    every request's decode token and drafts plus a prefill chunk.  ``gpu_backend``: ``resident`` or ``step``
    (see :func:`mpkir.models.backends.make_backend`); ``greedy_only``: every request will be greedy (the
    GPU then returns token ids, not logits); ``kernel_sampling`` / ``kernel_pages``: the resident kernel
    samples / allocates KV pages itself (None: the defaults of ``make_backend``); ``numerics``: the GPU
    kernel's (``fast`` or ``exact``).
    """
    device = pick_device(device)
    per_req = 1 + ((spec_k or 4) if speculative else 0)
    step = step_tokens or max(batch * per_req, 64 if device == "cpu" else batch * per_req)
    if step < batch:
        raise error(f"--step-tokens {step} is fewer than the batch {batch}")
    serve: dict[str, Any] = {"max_requests": batch, "max_tokens": step}
    if step > batch * per_req:
        serve["mode"] = "mixed"
    if max_seq_len:
        serve["max_seq_len"] = max_seq_len
    if speculative:
        serve.update(speculative="ngram", sampling="greedy")
        if spec_k:
            serve["spec_k"] = spec_k
        if ngram:
            serve["ngram"] = ngram
    wdt = "f32" if (device == "cpu" and precision == "f32") else None
    loaded = load_model(model, mpk=mpk, serve=serve, weight_dtype=wdt, device=device, progress=progress)
    from mpkir.models.backends import make_backend

    if progress is not None:
        progress("prepare " + device, 0, 0)
    backend = make_backend(
        loaded,
        device,
        float_storage="f32" if wdt == "f32" else None,
        gpu_backend=gpu_backend,
        greedy_only=greedy_only,
        kernel_sampling=kernel_sampling,
        kernel_pages=kernel_pages,
        numerics=numerics,
    )
    stops = list(loaded.tokenizer.eos_token_ids) if loaded.tokenizer is not None else []
    cfg = EngineConfig.from_serve(loaded.serve, stop_ids=stops)
    return Runner(
        loaded,
        Engine(backend, cfg),
        device,
        precision if device == "cpu" else "bf16",
        serve_sampling(loaded.serve),
    )
