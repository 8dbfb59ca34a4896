"""Weight sharding: full checkpoint tensors → one tensor-parallel rank's weights.

A rank module (from the ``shard`` pass) declares each sharded weight with ``shard(axis, parts, index)``:
its declared type is block ``index`` of ``parts`` equal contiguous blocks of the checkpoint tensor along
``axis``.  :func:`shard_weights` slices a ``{checkpoint name: array}`` dict accordingly.  Because tied
weights (``embed`` whole, ``lm_head`` split by vocabulary) bind one checkpoint name with different
slices, a rank's weights are keyed by :func:`weight_key` (the checkpoint name, plus the slice when sharded).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, part
from mpkir.semantics import eval_int


def shard_of(decl: ir.WeightDecl, env) -> tuple[int, int, int] | None:
    """``(axis, parts, index)`` of a weight, or None when it is the whole checkpoint tensor."""
    if decl.shard is None:
        return None
    s = decl.shard
    return (eval_int(s.axis, env, "shard axis"), eval_int(s.parts, env, "shard parts"),
            eval_int(s.index, env, "shard index"))


def weight_key(decl: ir.WeightDecl, layer: int | None, env) -> str:
    """The key of one weight tensor of a rank: ``name`` or ``name#shard(axis=A,parts=P,index=I)``."""
    name = decl.checkpoint_name(layer)
    sh = shard_of(decl, env)
    if sh is None:
        return name
    return f"{name}#shard(axis={sh[0]},parts={sh[1]},index={sh[2]})"


def _layers(decl: ir.WeightDecl, env) -> list[int | None]:
    if decl.index is None:
        return [None]
    return list(range(eval_int(decl.index.count, env, "layer count")))


def shard_weights(module: ir.Module, checkpoint: Mapping[str, np.ndarray],
                  analysis=None) -> dict[str, np.ndarray]:
    """``{weight_key: array}`` for every weight (and layer) of ``module``, sliced from ``checkpoint``.

    Every missing or ill-shaped tensor is reported (by name, with the shapes), located at its declaration.
    """
    from mpkir.verify import verify

    a = analysis or verify(module)
    env = a.env
    out: dict[str, np.ndarray] = {}
    diags: list[Diagnostic] = []
    for d in module.weights:
        want = tuple(int(x) for x in a.globals[d.name].shape)
        sh = shard_of(d, env)
        full = list(want)
        if sh is not None:
            full[sh[0]] *= sh[1]
        full_t = tuple(full)
        for layer in _layers(d, env):
            name = d.checkpoint_name(layer)
            loc = part(d.loc, "checkpoint")
            what = f"weight '{d.name}'" + ("" if layer is None else f"[{layer}]")
            if name not in checkpoint:
                diags.append(Diagnostic(f"{what}: checkpoint tensor '{name}' is missing (expected shape "
                                        f"{full_t})", loc))
                continue
            arr = np.asarray(checkpoint[name])
            if tuple(arr.shape) != full_t:
                extra = "" if sh is None else f" (the full tensor of the {want} shard {sh[2]} of {sh[1]} " \
                                              f"along axis {sh[0]})"
                diags.append(Diagnostic(f"{what}: checkpoint tensor '{name}' has shape {tuple(arr.shape)}, "
                                        f"expected {full_t}{extra}", loc))
                continue
            if sh is not None:
                ax, parts, idx = sh
                n = want[ax]
                arr = np.ascontiguousarray(np.take(arr, np.arange(idx * n, (idx + 1) * n), axis=ax))
                _ = parts
            out[weight_key(d, layer, env)] = arr
    if diags:
        raise MpkError(diags)
    return out
