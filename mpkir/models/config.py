"""HF ``config.json`` → the constants of a ``.mpk`` model, so one file serves a whole model family.

A ``.mpk`` model declares its sizes as constants (``const hidden = 576``).  :func:`apply_config`
rewrites those ``ConstDecl`` s of a parsed module by name before verification; every constant
derived from them by an expression (``const q_dim = heads * head_dim``) follows automatically.

Which constant takes which config key:

1. an annotation on the const's line in the ``.mpk`` source wins:
   ``const hidden = 576  // config: hidden_size``;
2. otherwise the first name of :data:`CONST_NAMES` that the module declares (``hidden``, ``layers``, ...).

Config keys without a constant in the module are ignored; constants without a config value keep the
value written in the file.  ``head_dim`` defaults to ``hidden_size / num_attention_heads`` and
``num_key_value_heads`` to ``num_attention_heads`` (as in HF).  Tied vs untied output projection is a
binding matter (``tie_word_embeddings``, see :mod:`mpkir.models.binding`).  Features the operators
cannot express (non-SiLU MLPs, rope scaling) are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError

CONST_NAMES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden", "hidden_size", "d_model", "dim", "hidden_dim"),
    "num_hidden_layers": ("layers", "num_layers", "n_layers", "num_hidden_layers"),
    "num_attention_heads": ("heads", "q_heads", "num_heads", "n_heads", "num_attention_heads"),
    "num_key_value_heads": ("kv_heads", "num_kv_heads", "n_kv_heads", "num_key_value_heads"),
    "head_dim": ("head_dim", "d_head"),
    "intermediate_size": ("ffn", "intermediate", "intermediate_size", "ffn_dim", "mlp_dim", "ffn_hidden"),
    "vocab_size": ("vocab", "vocab_size", "n_vocab"),
    "rope_theta": ("rope_theta", "theta", "rope_base"),
    "rms_norm_eps": ("eps", "rms_eps", "norm_eps", "rms_norm_eps"),
}
"""Config key → constant names it fills (first one the module declares), the documented table."""

_ANNOT = re.compile(r"^\s*const\s+([A-Za-z_]\w*)\s*=[^\n]*?//\s*config:\s*([A-Za-z_][\w.]*)", re.M)

SUPPORTED_ACTS = ("silu", "swish")


def config_values(config: Mapping[str, Any]) -> dict[str, int | float]:
    """The config's model sizes, with HF's defaults for ``head_dim`` and ``num_key_value_heads``."""
    out: dict[str, int | float] = {}
    for key in CONST_NAMES:
        v = config.get(key)
        if v is not None:
            out[key] = v
    if "num_attention_heads" in out:
        out.setdefault("num_key_value_heads", out["num_attention_heads"])
        if "hidden_size" in out:
            out.setdefault("head_dim", int(out["hidden_size"]) // int(out["num_attention_heads"]))
    for k, v in list(out.items()):
        if isinstance(v, float) and k not in ("rope_theta", "rms_norm_eps") and v.is_integer():
            out[k] = int(v)
    return out


def unsupported(config: Mapping[str, Any]) -> list[str]:
    """What in the config the example models cannot express (each a sentence)."""
    probs: list[str] = []
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if act not in SUPPORTED_ACTS:
        probs.append(f"hidden_act '{act}' (the models use SiLU-gated MLPs)")
    rs = config.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type", "?")) if isinstance(rs, dict) else rs
        if kind not in ("default", None):
            probs.append(f"rope_scaling of type '{kind}' (the rope operator implements plain RoPE only)")
    if config.get("attention_bias") and config.get("model_type") in ("llama", "qwen3"):
        probs.append("attention_bias = true (the models declare no q/k/v biases)")
    return probs


def annotations(module: ir.Module, source: str | None = None) -> dict[str, str]:
    """``const NAME = ... // config: KEY`` annotations of the module's source: {const name: config key}."""
    if source is None:
        p = Path(module.path)
        if not p.is_file():
            return {}
        source = p.read_text()
    return {m.group(1): m.group(2) for m in _ANNOT.finditer(source)}


def const_map(module: ir.Module, source: str | None = None) -> dict[str, str]:
    """{const name: config key} for this module: annotations first, then :data:`CONST_NAMES`."""
    declared = {c.name for c in module.consts}
    out = {k: v for k, v in annotations(module, source).items() if k in declared}
    taken = set(out.values())
    for key, names in CONST_NAMES.items():
        if key in taken:
            continue
        name = next((n for n in names if n in declared and n not in out), None)
        if name is not None:
            out[name] = key
    return out


def set_consts(module: ir.Module, values: Mapping[str, int | float]) -> ir.Module:
    """A new module with the named constants' values replaced (unknown names raise)."""
    declared = {c.name for c in module.consts}
    unknown = sorted(set(values) - declared)
    if unknown:
        raise MpkError(
            Diagnostic(f"model '{module.model_name}' declares no constant(s) {', '.join(unknown)}")
        )
    decls = tuple(
        dataclasses.replace(d, value=ir.Num(values[d.name], d.value.loc))
        if isinstance(d, ir.ConstDecl) and d.name in values
        else d
        for d in module.decls
    )
    return dataclasses.replace(module, decls=decls)


def set_serve(module: ir.Module, **items: int | float | str) -> ir.Module:
    """A new module whose serve block has these settings (others kept; a block is added if none)."""

    def val(v):
        if isinstance(v, bool):
            return ir.Bool(v)
        if isinstance(v, str):
            return ir.Name(v)
        return ir.Num(v)

    old = module.serve
    kept = tuple(a for a in (old.items if old else ()) if a.key not in items)
    new_items = kept + tuple(ir.Attr(k, val(v)) for k, v in items.items())
    if old is None:
        decls = (*module.decls, ir.ServeDecl(new_items))
    else:
        decls = tuple(dataclasses.replace(d, items=new_items) if d is old else d for d in module.decls)
    return dataclasses.replace(module, decls=decls)


def apply_config(
    module: ir.Module, config: Mapping[str, Any], *, source: str | None = None, strict: bool = True
) -> ir.Module:
    """The module with its size constants taken from an HF ``config.json`` dict.

    With ``strict``, config features the model cannot express raise :class:`MpkError`.
    """
    if strict:
        probs = unsupported(config)
        if probs:
            raise MpkError(
                [
                    Diagnostic(f"config.json: {p} is not supported by model '{module.model_name}'")
                    for p in probs
                ]
            )
    vals = config_values(config)
    setting = {name: vals[key] for name, key in const_map(module, source).items() if key in vals}
    module = set_consts(module, setting)
    if "tie_word_embeddings" in config:
        module = bind_output(module, bool(config["tie_word_embeddings"]))
    return module


OUTPUT_NAME = "lm_head.weight"
EMBED_NAME = "model.embed_tokens.weight"
OUTPUT_DECLS = ("lm_head", "output", "unembed")


def bind_output(module: ir.Module, tied: bool) -> ir.Module:
    """Point the output projection at the embedding table (tied) or at ``lm_head.weight`` (untied).

    The output projection is the weight named ``lm_head``/``output``/``unembed`` or bound to
    ``lm_head.weight``; a module without one is returned unchanged.
    """
    want = EMBED_NAME if tied else OUTPUT_NAME
    decls = []
    for d in module.decls:
        if (
            isinstance(d, ir.WeightDecl)
            and d.index is None
            and (d.name in OUTPUT_DECLS or d.checkpoint == OUTPUT_NAME)
            and d.checkpoint != want
        ):
            d = dataclasses.replace(d, checkpoint=want)
        decls.append(d)
    return dataclasses.replace(module, decls=tuple(decls))


def describe(module: ir.Module, config: Mapping[str, Any], source: str | None = None) -> list[str]:
    """Human-readable 'const = value (config key)' lines for what :func:`apply_config` sets."""
    vals = config_values(config)
    return [f"{name} = {vals[key]} ({key})" for name, key in const_map(module, source).items() if key in vals]
