"""The ``serve { ... }`` block: its schema, defaults and the checks that a configuration can work."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, Span, part
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


_POSITIVE = ("max_requests", "max_tokens", "max_seq_len", "page_size", "num_pages", "gpus", "spec_k", "ngram")


def serve_config(decl: ir.ServeDecl | None, env: Env) -> tuple[ServeConfig, list[Diagnostic]]:
    """Resolve and validate a serve block; every problem is returned as a located diagnostic.

    Each value is checked on its own, then every cross-check whose values are individually valid runs,
    so one bad value does not hide the other problems.
    """
    if decl is None:
        return ServeConfig(), []
    diags: list[Diagnostic] = []
    given: dict[str, object] = {}
    locs: dict[str, Span | None] = {}
    bad_keys: set[str] = set()
    specs = {s.name: s for s in SCHEMA}
    for item in decl.items:
        spec = specs.get(item.key)
        if spec is None:
            close = difflib.get_close_matches(item.key, list(specs), n=1)
            note = f"did you mean '{close[0]}'?" if close else "known settings: " + ", ".join(specs)
            diags.append(Diagnostic(f"unknown serve setting '{item.key}'", part(item.loc, "name"),
                                    notes=(note,)))
            continue
        if item.key in given or item.key in bad_keys:
            diags.append(Diagnostic(f"serve setting '{item.key}' given twice", part(item.loc, "name")))
            continue
        try:
            given[item.key] = resolve_attr(spec, item.value, env, "serve setting")
            locs[item.key] = item.value.loc or item.loc
        except MpkError as e:
            diags.extend(e.diagnostics)
            bad_keys.add(item.key)
    defaults = {f.name: f.default for f in fields(ServeConfig)}
    vals = {**defaults, **given}

    def bad(keys: tuple[str, ...], msg: str) -> None:
        """Report at the first of ``keys`` the file gives (a problem made of defaults: the block)."""
        loc = next((locs[k] for k in keys if k in locs), None)
        diags.append(Diagnostic(msg, loc or decl.loc))

    for key in _POSITIVE:
        if vals[key] < 1:
            bad((key,), f"serve: {key} must be at least 1, got {vals[key]}")
            bad_keys.add(key)
    if not 0 < vals["top_p"] <= 1:
        bad(("top_p",), f"serve: top_p must be in (0, 1], got {vals['top_p']}")
    if vals["top_k"] < 0:
        bad(("top_k",), f"serve: top_k must be 0 (off) or positive, got {vals['top_k']}")
    if vals["temperature"] < 0:
        bad(("temperature",), f"serve: temperature must not be negative, got {vals['temperature']}")
    elif vals["sampling"] == "sample" and vals["temperature"] == 0:
        bad(("temperature", "sampling"), "serve: temperature must be positive when sampling = sample, got 0")
    if vals["seed"] < 0:
        bad(("seed",), f"serve: seed must not be negative, got {vals['seed']}")
    if vals["eos_token"] < -1:
        bad(("eos_token",), f"serve: eos_token must be a token id or -1 (none), got {vals['eos_token']}")
    if vals["gpus"] >= 1 and vals["gpus"] & (vals["gpus"] - 1):
        bad(("gpus",), f"serve: gpus must be a power of two, got {vals['gpus']}")
    if vals["speculative"] == "ngram" and vals["sampling"] != "greedy":
        bad(("speculative", "sampling"),
            "serve: speculative = ngram needs sampling = greedy (greedy acceptance)")

    def ok(*keys: str) -> bool:
        return not any(k in bad_keys for k in keys)

    # derived defaults (only from valid values)
    per_req = 1 + (vals["spec_k"] if vals["speculative"] == "ngram" else 0)
    if "max_tokens" not in given and ok("max_requests", "spec_k"):
        vals["max_tokens"] = vals["max_requests"] * per_req
    if "num_pages" not in given and ok("max_requests", "max_seq_len", "page_size"):
        vals["num_pages"] = vals["max_requests"] * -(-vals["max_seq_len"] // vals["page_size"])
    if ok("max_seq_len", "page_size") and vals["max_seq_len"] % vals["page_size"]:
        bad(("page_size", "max_seq_len"),
            f"serve: page_size {vals['page_size']} does not divide max_seq_len {vals['max_seq_len']}")
    if ok("num_pages", "page_size", "max_seq_len") and \
            vals["num_pages"] * vals["page_size"] < vals["max_seq_len"]:
        bad(("num_pages", "page_size", "max_seq_len"),
            f"serve: {vals['num_pages']} pages of {vals['page_size']} positions cannot hold one sequence of "
            f"max_seq_len {vals['max_seq_len']}")
    elif ok("num_pages", "max_requests") and vals["num_pages"] < vals["max_requests"]:
        bad(("num_pages", "max_requests"),
            f"serve: num_pages {vals['num_pages']} is fewer than max_requests {vals['max_requests']}: every "
            f"request needs at least one page")
    if ok("max_tokens", "max_requests", "spec_k"):
        if vals["max_tokens"] < vals["max_requests"]:
            bad(("max_tokens", "max_requests"),
                f"serve: max_tokens {vals['max_tokens']} is fewer than max_requests {vals['max_requests']}")
        elif vals["mode"] == "decode" and vals["max_tokens"] < vals["max_requests"] * per_req:
            bad(("max_tokens", "max_requests", "spec_k"),
                f"serve: max_tokens {vals['max_tokens']} is fewer than max_requests {vals['max_requests']}"
                f" x {per_req} token(s) per request per decode step")
    if (vals["speculative"] == "ngram" and ok("spec_k", "max_seq_len")
            and vals["spec_k"] >= vals["max_seq_len"]):
        bad(("spec_k", "max_seq_len"),
            f"serve: spec_k {vals['spec_k']} draft tokens do not fit in max_seq_len {vals['max_seq_len']}")
    cfg = ServeConfig(**vals)  # type: ignore[arg-type]
    return cfg, diags
