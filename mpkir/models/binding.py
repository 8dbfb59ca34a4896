"""Bind a module's weights to checkpoint tensors: check every name and shape first, then load.

A *tensor source* is anything with ``names()`` (checkpoint names), ``shape(name)`` (the logical
shape, read without loading data) and ``load(name)`` (a NumPy array).  The safetensors and GGUF
loaders provide one each.  :func:`bind` compares what the module declares with what the source
holds and reports every missing, extra or wrong-shaped tensor at once, by name with both shapes,
before a single tensor is read: nothing runs half-loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError

IGNORED_EXTRAS = ("rotary_emb.inv_freq", "rope_freqs.weight")
"""Checkpoint tensors that carry no weights of the forward pass (precomputed rope tables)."""

OUTPUT_NAME = "lm_head.weight"
EMBED_NAME = "model.embed_tokens.weight"


class TensorSource(Protocol):
    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def load(self, name: str) -> np.ndarray: ...


@dataclass
class Expected:
    """One tensor the module needs: checkpoint name, shape, storage dtype and the declaring weight."""

    name: str
    shape: tuple[int, ...]
    dtype: ir.DType
    decl: ir.WeightDecl


@dataclass
class Binding:
    """The plan: for every module checkpoint name, the source tensor that fills it."""

    expected: list[Expected]
    source_of: dict[str, str] = field(default_factory=dict)

    def load(
        self,
        src: TensorSource,
        dtype: ir.DType | None = None,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read and convert every tensor (to its declared storage dtype, or ``dtype``)."""
        out: dict[str, np.ndarray] = {}
        cache: dict[str, np.ndarray] = {}
        for i, e in enumerate(self.expected):
            sname = self.source_of[e.name]
            want = (dtype or e.dtype).numpy
            if sname not in cache:
                cache[sname] = np.asarray(src.load(sname))
            arr = cache[sname]
            out[e.name] = np.ascontiguousarray(arr.reshape(e.shape).astype(want, copy=False))
            if progress is not None:
                progress(i + 1, len(self.expected), e.name)
        return out


def expected_tensors(module: ir.Module, analysis) -> list[Expected]:
    """Every (checkpoint name, shape, dtype) the module's weights need, layer by layer."""
    out: list[Expected] = []
    for w in module.weights:
        t = analysis.globals[w.name]
        shape = tuple(int(d) for d in t.shape)
        if w.index is None:
            out.append(Expected(w.checkpoint_name(), shape, t.dtype, w))
            continue
        from mpkir.semantics import eval_int

        count = eval_int(w.index.count, analysis.env, f"layer count of '{w.name}'")
        out.extend(Expected(w.checkpoint_name(layer), shape, t.dtype, w) for layer in range(count))
    return out


def plan(
    module: ir.Module,
    analysis,
    src: TensorSource,
    *,
    tied: bool | None = None,
    allow_extra: bool = False,
    what: str = "checkpoint",
) -> Binding:
    """Match the module against the source; raise :class:`MpkError` listing every problem.

    ``tied``: the output projection shares the embedding table (``tie_word_embeddings``); ``None``
    lets a missing ``lm_head.weight`` fall back to the embedding when the checkpoint has no separate one.
    """
    names = list(src.names())
    have = set(names)
    exp = expected_tensors(module, analysis)
    b = Binding(exp)
    diags: list[Diagnostic] = []
    used: set[str] = set()
    for e in exp:
        sname = _source_name(e, have, tied)
        if sname not in have:
            diags.append(
                Diagnostic(
                    f"{what} has no tensor '{e.name}' (weight '{e.decl.name}' expects shape {list(e.shape)})",
                    e.decl.loc,
                )
            )
            continue
        got = tuple(int(x) for x in src.shape(sname))
        used.add(sname)
        if int(np.prod(got)) != int(np.prod(e.shape)) or _squeeze(got) != _squeeze(e.shape):
            alias = f" (read from '{sname}')" if sname != e.name else ""
            diags.append(
                Diagnostic(
                    f"tensor '{e.name}'{alias} has shape {list(got)} in the {what} but weight "
                    f"'{e.decl.name}' expects {list(e.shape)}",
                    e.decl.loc,
                )
            )
            continue
        b.source_of[e.name] = sname
    if not allow_extra:
        for n in names:
            if n in used or any(n.endswith(s) for s in IGNORED_EXTRAS):
                continue
            if tied and n == OUTPUT_NAME:  # a tied checkpoint that also stores a copy of the embedding
                continue
            diags.append(
                Diagnostic(
                    f"{what} tensor '{n}' (shape {list(src.shape(n))}) is not bound by any "
                    f"weight of the module"
                )
            )
    if diags:
        n_miss = sum("has no tensor" in d.message for d in diags)
        n_shape = sum("expects" in d.message and "has shape" in d.message for d in diags)
        n_extra = sum("not bound" in d.message for d in diags)
        diags.append(
            Diagnostic(
                f"cannot bind the {what} to model '{module.model_name}': {n_miss} missing, "
                f"{n_shape} wrong-shaped, {n_extra} extra tensor(s); nothing was loaded"
            )
        )
        raise MpkError(diags)
    return b


def _source_name(e: Expected, have: set[str], tied: bool | None) -> str:
    """The checkpoint tensor that fills ``e``: its own name, except that a module binding
    ``lm_head.weight`` reads the embedding table from a tied checkpoint that does not store one
    (:func:`mpkir.models.config.bind_output` rewrites the module itself for untied configs)."""
    tie = tied is True or (tied is None and OUTPUT_NAME not in have)
    if e.name == OUTPUT_NAME and tie and EMBED_NAME in have:
        return EMBED_NAME
    return e.name


def _squeeze(shape: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(x) for x in shape if int(x) != 1)


class DictSource:
    """A tensor source over an in-memory mapping (tests, converted checkpoints)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = dict(tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def load(self, name: str) -> np.ndarray:
        return self.tensors[name]
