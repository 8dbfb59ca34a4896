"""Checkpoint + ``.mpk`` → a loaded model: sized module, verified analysis, bound weights, tokenizer.

``load_model`` takes a HuggingFace checkpoint directory (``config.json`` + ``*.safetensors``), a
``.gguf`` file, or ``"default"`` (the embedded SmolLM2), picks the example ``.mpk`` of the
architecture unless one is given, sizes it from the config, checks that the model and its KV cache
fit, binds every weight (all problems reported before any tensor is read) and builds the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpkir import ir
from mpkir.diagnostics import MpkError, error
from mpkir.models import binding
from mpkir.models import config as mconfig
from mpkir.models.tokenizer import Tokenizer

EXAMPLES = {"llama": "llama3_2_1b.mpk", "qwen3": "qwen3_0_6b.mpk"}
"""The example model file of each architecture (``model_type`` of config.json)."""

SERVE_CONSTS = ("max_requests", "max_tokens", "max_seq_len", "page_size", "num_pages")

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total)."""


def examples_dir() -> Path:
    """The example ``.mpk`` files (``$MPKIR_EXAMPLES``, else the repository's ``examples/``)."""
    env = os.environ.get("MPKIR_EXAMPLES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "examples"


@dataclass
class LoadedModel:
    module: ir.Module
    analysis: Any
    weights: dict[str, np.ndarray]
    config: dict
    tokenizer: Tokenizer | None
    source: str
    mpk_path: Path
    checkpoint: Path
    fmt: str  # "safetensors" | "gguf"

    @property
    def serve(self):
        return self.analysis.serve


def resolve_checkpoint(model: str | Path | None) -> Path:
    """``None``/``"default"`` → the embedded SmolLM2 GGUF; otherwise the path, which must exist."""
    if model is None or str(model) == "default":
        from mpkir.models.smollm2 import default_gguf

        return default_gguf()
    p = Path(model)
    if not p.exists():
        raise error(f"model {p} does not exist (a HF checkpoint directory or a .gguf file)")
    return p


def choose_example(config: Mapping[str, Any], checkpoint: Path | None = None) -> Path:
    """The example ``.mpk`` for a config: SmolLM2's own file for the default model, else by model_type."""
    from mpkir.models import smollm2

    d = examples_dir()
    mt = config.get("model_type")
    if mt == "llama" and (config.get("hidden_size") == 576 and config.get("num_hidden_layers") == 30):
        p = d / smollm2.EXAMPLE
        if p.exists():
            return p
    name = EXAMPLES.get(str(mt))
    if name is None:
        raise error(
            f"no example model for model_type '{mt}' (supported: {', '.join(EXAMPLES)}); pass --mpk FILE"
        )
    p = d / name
    if not p.exists():
        raise error(f"example model {p} is missing")
    return p


def size_module(
    module: ir.Module,
    config: Mapping[str, Any],
    source: str | None = None,
    serve: Mapping[str, Any] | None = None,
) -> ir.Module:
    """Apply config.json sizes and serve overrides (``max_requests``, ``max_tokens``, ...) to a module."""
    module = mconfig.apply_config(module, config, source=source)
    if serve:
        declared = {c.name for c in module.consts}
        as_consts = {k: v for k, v in serve.items() if k in declared and k in SERVE_CONSTS}
        module = mconfig.set_consts(module, as_consts)
        rest = {k: v for k, v in serve.items() if k not in as_consts}
        if rest:
            module = mconfig.set_serve(module, **rest)
    return module


def open_checkpoint(path: Path):
    """(tensor source, config dict, tokenizer factory, format) of a checkpoint path."""
    if path.is_file() and path.suffix == ".gguf":
        from mpkir.models.gguf_loader import GGUFFile

        g = GGUFFile(path)
        return g, dict(g.config), (lambda: Tokenizer.from_gguf_data(g.tokenizer_data())), "gguf"
    from mpkir.models.safetensors_loader import SafetensorsSource, read_config

    src = SafetensorsSource(path)
    cfg = read_config(path)
    d = path if path.is_dir() else path.parent
    tok = (lambda: Tokenizer.from_dir(d)) if (d / "tokenizer.json").exists() else (lambda: None)
    return src, cfg, tok, "safetensors"


def load_model(
    model: str | Path | None = None,
    *,
    mpk: str | Path | None = None,
    serve: Mapping[str, Any] | None = None,
    weight_dtype: str | None = None,
    memory_bytes: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a checkpoint into a sized, verified ``.mpk`` module.

    ``weight_dtype`` (``"f32"``/``"bf16"``) overrides the declared storage dtype of the weights;
    ``memory_bytes`` is the capacity the memory guard checks against (default: available host memory
    for the CPU, the serve target's memory for a GPU).
    """
    from mpkir.models.engine import DEVICE_MEMORY_GB, check_fits, host_memory_bytes, memory_plan
    from mpkir.parser import parse
    from mpkir.verify import analyze

    def tick(stage: str, done: int = 0, total: int = 0) -> None:
        if progress is not None:
            progress(stage, done, total)

    ckpt = resolve_checkpoint(model)
    tick("open checkpoint")
    src, cfg, make_tok, fmt = open_checkpoint(ckpt)
    mpk_path = Path(mpk) if mpk is not None else choose_example(cfg, ckpt)
    try:
        text = mpk_path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read {mpk_path}: {e.strerror or e}") from None
    tick("compile " + mpk_path.name)
    module = parse(text, str(mpk_path))
    module = size_module(module, cfg, text, serve)
    analysis = analyze(module)
    if not analysis.ok:
        raise MpkError(analysis.diagnostics, text)
    wdt = ir.DType(weight_dtype) if weight_dtype else None
    mem = memory_plan(module, analysis, wdt)
    if memory_bytes is None:
        if device == "cpu":
            memory_bytes = host_memory_bytes()
        else:
            memory_bytes = int(DEVICE_MEMORY_GB.get(analysis.serve.target, 80) * 1e9)
    check_fits(mem, memory_bytes, device if device != "cpu" else "the host (CPU path)")
    tied = cfg.get("tie_word_embeddings")
    plan = binding.plan(
        module, analysis, src, tied=None if tied is None else bool(tied), what=f"{fmt} checkpoint {ckpt.name}"
    )
    weights = plan.load(src, wdt, progress=lambda i, n, name: tick("load weights", i, n))
    tick("tokenizer")
    tok = make_tok()
    if tok is not None and not tok.eos_token_ids and cfg.get("eos_token_id") is not None:
        e = cfg["eos_token_id"]
        tok.eos_token_ids = tuple(e if isinstance(e, list) else [e])
    return LoadedModel(module, analysis, weights, dict(cfg), tok, text, mpk_path, ckpt, fmt)
