"""The ``superopt`` pass: search every partitioned subgraph (cached) and rewrite the module IR.

IR rewrite (with existing operators, so the result verifies and runs in the interpreter): linears that
read the same value with distinct weights are merged (rule ``merge-matmuls-sharing-input``):
``%m_w = concat(@wq, @wk, @wv, axis=0)``, ``%m = linear(%x, %m_w)``, ``%q, %k, %v = split(%m, ...)``.
The fused block programs found for each subgraph are searched and cached (the CLI report shows them,
with the decision: applied only when the predicted gain is > 1 and beats the hand-written body).  Their
task bodies are emitted by :mod:`mpkir.passes.superopt.cuda`; the megakernel's lowering
(``codegen/lower.py``) does not read them yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mpkir import ir
from mpkir.passes.manager import register


def _merge_body(body, types) -> tuple:
    users: dict[str, list[int]] = {}
    for i, s in enumerate(body):
        if (
            isinstance(s, ir.OpStmt)
            and s.op == "linear"
            and len(s.operands) == 2
            and isinstance(s.operands[0], ir.ValueRef)
            and isinstance(s.operands[1], ir.GlobalRef)
        ):
            users.setdefault(s.operands[0].name, []).append(i)
    groups = {x: ix for x, ix in users.items() if len(ix) >= 2}
    drop, insert = set(), {}
    for x, ix in groups.items():
        stmts = [body[i] for i in ix]
        first = stmts[0].results[0]
        w_name, m_name = f"{first}_merged_w", f"{first}_merged"
        sizes = [types[s.results[0]].shape[-1] for s in stmts]
        if not all(isinstance(n, int) for n in sizes):
            continue
        cat = ir.OpStmt(
            (w_name,), "concat", tuple(s.operands[1] for s in stmts), (ir.Attr("axis", ir.Num(0)),)
        )
        lin = ir.OpStmt((m_name,), "linear", (ir.ValueRef(x), ir.ValueRef(w_name)))
        spl = ir.OpStmt(
            tuple(s.results[0] for s in stmts),
            "split",
            (ir.ValueRef(m_name),),
            (ir.Attr("sizes", ir.ListVal(tuple(ir.Num(n) for n in sizes))), ir.Attr("axis", ir.Num(-1))),
        )
        insert[ix[0]] = (cat, lin, spl)
        drop.update(ix)
    out = []
    for i, s in enumerate(body):
        if i in insert:
            out.extend(insert[i])
        elif i in drop:
            continue
        elif isinstance(s, ir.ForStmt):
            out.append(dataclasses.replace(s, body=_merge_body(s.body, types)))
        else:
            out.append(s)
    return tuple(out)


@register
@dataclass(frozen=True)
class Superopt:
    """Mirage-style superoptimizer: search and prove fused programs; merge linears sharing an input."""

    name: ClassVar[str] = "superopt"
    budget: float = 30.0
    seed: int = 0
    cache_dir: str = ""
    search: bool = True

    def run(self, module: ir.Module) -> ir.Module:
        from mpkir.verify import analyze

        a = analyze(module)
        if self.search:
            from mpkir.passes.superopt.partition import partition
            from mpkir.passes.superopt.search import cached_search

            for sg in partition(module, a):
                with contextlib.suppress(LookupError):
                    cached_search(sg, self.cache_dir or None, seed=self.seed, budget_s=self.budget)
        decls = []
        for d in module.decls:
            if isinstance(d, ir.GraphDecl):
                d = dataclasses.replace(d, body=_merge_body(d.body, a.graphs[d.name].types))
            decls.append(d)
        return dataclasses.replace(module, decls=tuple(decls))
