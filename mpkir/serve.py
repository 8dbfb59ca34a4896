"""The ``serve { ... }`` block: its schema, defaults and the checks that a configuration can work."""

from __future__ import annotations

from dataclasses import dataclass, fields

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError
from mpkir.ops.base import AttrSpec
from mpkir.semantics import Env, resolve_attr

TARGETS = ("h100", "h200", "a100", "b200", "l40s", "rtx4090")


@dataclass(frozen=True)
class ServeConfig:
    """Serving configuration of a module (defaults apply to keys the file leaves out)."""

    max_requests: int = 1
    max_tokens: int = 1
    max_seq_len: int = 4096
    page_size: int = 64
    num_pages: int = 64
    mode: str = "decode"
    sampling: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    speculative: str = "none"
    spec_k: int = 4
    ngram: int = 3
    gpus: int = 1
    target: str = "h100"
    eos_token: int = -1

    @property
    def pages_per_seq(self) -> int:
        return self.max_seq_len // self.page_size


SCHEMA: tuple[AttrSpec, ...] = (
    AttrSpec("max_requests", "int", doc="requests in flight"),
    AttrSpec("max_tokens", "int", doc="tokens processed per step (all requests together)"),
    AttrSpec("max_seq_len", "int", doc="longest sequence (prompt + generated)"),
    AttrSpec("page_size", "int", doc="KV-cache positions per page"),
    AttrSpec("num_pages", "int", doc="KV-cache pages in the pool"),
    AttrSpec("mode", "enum", choices=("decode", "prefill", "mixed")),
    AttrSpec("sampling", "enum", choices=("greedy", "sample")),
    AttrSpec("temperature", "float"),
    AttrSpec("top_k", "int", doc="0 turns top-k off"),
    AttrSpec("top_p", "float"),
    AttrSpec("seed", "int"),
    AttrSpec("speculative", "enum", choices=("none", "ngram")),
    AttrSpec("spec_k", "int", doc="draft tokens per step (speculative = ngram)"),
    AttrSpec("ngram", "int", doc="n of the prompt-lookup n-gram"),
    AttrSpec("gpus", "int", doc="tensor-parallel GPUs"),
    AttrSpec("target", "enum", choices=TARGETS),
    AttrSpec("eos_token", "int", doc="end-of-sequence token id (-1: none)"),
)


def serve_config(decl: ir.ServeDecl | None, env: Env) -> tuple[ServeConfig, list[Diagnostic]]:
    """Resolve and validate a serve block; every problem is returned as a located diagnostic."""
    if decl is None:
        return ServeConfig(), []
    diags: list[Diagnostic] = []
    given: dict[str, object] = {}
    locs: dict[str, object] = {}
    specs = {s.name: s for s in SCHEMA}
    for item in decl.items:
        spec = specs.get(item.key)
        if spec is None:
            diags.append(Diagnostic(f"unknown serve setting '{item.key}'", item.loc,
                                    notes=("known settings: " + ", ".join(specs),)))
            continue
        if item.key in given:
            diags.append(Diagnostic(f"serve setting '{item.key}' given twice", item.loc))
            continue
        try:
            given[item.key] = resolve_attr(spec, item.value, env)
            locs[item.key] = item.loc
        except MpkError as e:
            diags.extend(e.diagnostics)
    defaults = {f.name: f.default for f in fields(ServeConfig)}
    vals = {**defaults, **given}
    if "max_tokens" not in given:
        per_req = 1 + (vals["spec_k"] if vals["speculative"] == "ngram" else 0)
        vals["max_tokens"] = vals["max_requests"] * per_req
    if "num_pages" not in given and vals["page_size"] > 0:
        vals["num_pages"] = vals["max_requests"] * -(-vals["max_seq_len"] // vals["page_size"])
    cfg = ServeConfig(**vals)  # type: ignore[arg-type]

    def bad(key: str, msg: str) -> None:
        diags.append(Diagnostic(msg, locs.get(key) or decl.loc))  # type: ignore[arg-type]

    for key in ("max_requests", "max_tokens", "max_seq_len", "page_size", "num_pages", "gpus", "spec_k",
                "ngram"):
        if getattr(cfg, key) < 1:
            bad(key, f"serve: {key} must be at least 1, got {getattr(cfg, key)}")
    if diags:
        return cfg, diags
    if cfg.max_seq_len % cfg.page_size:
        bad("page_size", f"serve: page_size {cfg.page_size} does not divide max_seq_len {cfg.max_seq_len}")
    if cfg.num_pages * cfg.page_size < cfg.max_seq_len:
        bad("num_pages", f"serve: {cfg.num_pages} pages of {cfg.page_size} positions cannot hold one "
                         f"sequence of max_seq_len {cfg.max_seq_len}")
    per_req = 1 + (cfg.spec_k if cfg.speculative == "ngram" else 0)
    if cfg.mode == "decode" and cfg.max_tokens < cfg.max_requests * per_req:
        bad("max_tokens", f"serve: max_tokens {cfg.max_tokens} is fewer than max_requests {cfg.max_requests}"
                          f" x {per_req} token(s) per request per decode step")
    if cfg.max_tokens < cfg.max_requests:
        bad("max_tokens", f"serve: max_tokens {cfg.max_tokens} is fewer than max_requests {cfg.max_requests}")
    if cfg.sampling == "sample" and cfg.temperature <= 0:
        bad("temperature", f"serve: temperature must be positive when sampling, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        bad("top_p", f"serve: top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        bad("top_k", f"serve: top_k must be 0 (off) or positive, got {cfg.top_k}")
    if cfg.gpus & (cfg.gpus - 1):
        bad("gpus", f"serve: gpus must be a power of two, got {cfg.gpus}")
    if cfg.speculative == "ngram" and cfg.sampling != "greedy":
        bad("speculative", "serve: speculative = ngram needs sampling = greedy (greedy acceptance)")
    return cfg, diags
