"""The operator registry: every operator of the language, by name.

Each family module exports ``OPS``, a tuple of :class:`~mpkir.ops.base.OpDef`; adding an operator is
adding one ``OpDef`` to one of those tuples.
"""

from __future__ import annotations

from mpkir.ops import attention, basic, norm, sampling, shape
from mpkir.ops.base import OpDef

_FAMILIES = (basic, norm, shape, attention, sampling)


def _build() -> dict[str, OpDef]:
    table: dict[str, OpDef] = {}
    for fam in _FAMILIES:
        for op in fam.OPS:
            if op.name in table:
                raise RuntimeError(f"operator {op.name!r} registered twice")
            table[op.name] = op
    return table


OPS: dict[str, OpDef] = _build()


def lookup(name: str) -> OpDef | None:
    return OPS.get(name)
