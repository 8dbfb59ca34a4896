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
binding matter (``tie_word_embeddings``, see :mod:`mpkir.models.binding`).

``rope_scaling`` (or transformers 5's ``rope_parameters``) of ``rope_type`` llama3 (Llama-3.1/3.2)
becomes attributes of every ``rope`` op (:func:`rope_scaling_attrs`, :func:`set_rope_scaling`):
``scaling=llama3, factor, low_freq_factor, high_freq_factor, original_max_position``; a module without
it is unchanged.  Features the operators cannot express (non-SiLU MLPs, other rope scalings) are
refused with the reason.
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


def _rope_params(config: Mapping[str, Any]) -> dict | None:
    rs = config.get("rope_scaling") or config.get("rope_parameters")
    return rs if isinstance(rs, dict) else None


def rope_type(config: Mapping[str, Any]) -> str:
    """The config's rope type: ``default`` when it has no scaling."""
    rs = _rope_params(config)
    if rs is None:
        return "default" if not config.get("rope_scaling") else str(config.get("rope_scaling"))
    return str(rs.get("rope_type", rs.get("type", "default")) or "default")


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_scaling_attrs(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The rope op's scaling attributes for a llama3 ``rope_scaling`` (None: no scaling).

    All four llama3 keys are required (as in HF); :func:`unsupported` reports missing ones.
    """
    if rope_type(config) != "llama3":
        return None
    rs = _rope_params(config) or {}
    missing = [k for k in LLAMA3_KEYS if k not in rs]
    if missing:
        raise MpkError(Diagnostic(f"config.json: rope_scaling of type 'llama3' without {', '.join(missing)}"))
    return {"scaling": "llama3", "factor": float(rs["factor"]),
            "low_freq_factor": float(rs["low_freq_factor"]),
            "high_freq_factor": float(rs["high_freq_factor"]),
            "original_max_position": int(rs["original_max_position_embeddings"])}


def set_rope_scaling(module: ir.Module, attrs: Mapping[str, Any]) -> ir.Module:
    """A new module whose ``rope`` ops carry these scaling attributes (replacing any they had)."""

    def val(v):
        return ir.Name(v) if isinstance(v, str) else ir.Num(v)

    def stmts(body):
        out = []
        for st in body:
            if isinstance(st, ir.ForStmt):
                st = dataclasses.replace(st, body=stmts(st.body))
            elif isinstance(st, ir.OpStmt) and st.op == "rope":
                kept = tuple(a for a in st.attrs if a.key not in attrs)
                st = dataclasses.replace(st, attrs=kept + tuple(ir.Attr(k, val(v)) for k, v in attrs.items()))
            out.append(st)
        return tuple(out)

    decls = tuple(dataclasses.replace(d, body=stmts(d.body)) if isinstance(d, ir.GraphDecl) else d
                  for d in module.decls)
    return dataclasses.replace(module, decls=decls)


def config_values(config: Mapping[str, Any]) -> dict[str, int | float]:
    """The config's model sizes, with HF's defaults for ``head_dim`` and ``num_key_value_heads``."""
    out: dict[str, int | float] = {}
    for key in CONST_NAMES:
        v = config.get(key)
        if v is not None:
            out[key] = v
    rs = _rope_params(config)
    if "rope_theta" not in out and rs is not None and rs.get("rope_theta") is not None:
        out["rope_theta"] = rs["rope_theta"]   # transformers 5 keeps it in rope_parameters
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
    kind = rope_type(config)
    if kind not in ("default", "llama3"):
        probs.append(f"rope_scaling of type '{kind}' (the rope operator implements plain and llama3 RoPE)")
    elif kind == "llama3":
        missing = [k for k in LLAMA3_KEYS if k not in (_rope_params(config) or {})]
        if missing:
            src = (_rope_params(config) or {}).get("source")
            probs.append(f"rope_scaling of type 'llama3' without {', '.join(missing)}"
                         + (f" (from {src})" if src else ""))
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
    scaling = rope_scaling_attrs(config)
    if scaling is not None:
        module = set_rope_scaling(module, scaling)
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
