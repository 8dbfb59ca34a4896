"""The partitioner: cut a module's graphs into the subgraph kinds the search knows, with concrete sizes
(symbolic dims at their bound).  Loop bodies are partitioned once (every layer repeats them)."""

from __future__ import annotations

from mpkir import ir
from mpkir.passes.superopt.targets import Subgraph
from mpkir.semantics import eval_expr


def _stmts(body):
    for s in body:
        if isinstance(s, ir.ForStmt):
            yield from _stmts(s.body)
        elif isinstance(s, ir.OpStmt):
            yield s


def _shape(t, env):
    return tuple(env.dims.get(d, d) if isinstance(d, str) else d for d in t.shape)


def _attr(s, key, env, default):
    for a in s.attrs:
        if a.key == key:
            return float(eval_expr(a.value, env))
    return default


def partition(module: ir.Module, analysis) -> list[Subgraph]:
    env = analysis.env
    out: list[Subgraph] = []
    seen = set()
    for g in module.decls:
        if not isinstance(g, ir.GraphDecl):
            continue
        types = analysis.graphs[g.name].types
        stmts = list(_stmts(g.body))
        users: dict[str, list[ir.OpStmt]] = {}
        for s in stmts:
            for o in s.operands:
                if isinstance(o, ir.ValueRef):
                    users.setdefault(o.name, []).append(s)

        def add(sg):
            key = (sg.kind, sg.dims, sg.consts, sg.outs)
            if key not in seen:
                seen.add(key)
                out.append(sg)

        for s in stmts:
            if s.op == "rmsnorm":
                lins = [u for u in users.get(s.results[0], []) if u.op == "linear" and len(u.operands) == 2]
                if lins:
                    m, k = _shape(types[s.results[0]], env)[-2:]
                    n = sum(_shape(types[u.results[0]], env)[-1] for u in lins)
                    add(
                        Subgraph(
                            "norm_linear",
                            tuple([s.results[0]] + [u.results[0] for u in lins]),
                            (("M", m), ("K", k), ("N", n)),
                            (("eps", _attr(s, "eps", env, 1e-6)),),
                            len(lins),
                        )
                    )
            elif s.op == "silu_mul" and len(s.operands) == 2:
                downs = [u for u in users.get(s.results[0], []) if u.op == "linear"]
                if downs:
                    m, f = _shape(types[s.results[0]], env)[-2:]
                    h = _shape(types[downs[0].results[0]], env)[-1]
                    add(
                        Subgraph(
                            "act_down", (s.results[0], downs[0].results[0]), (("M", m), ("F", f), ("H", h))
                        )
                    )
            elif s.op == "head_rmsnorm":
                ropes = [u for u in users.get(s.results[0], []) if u.op == "rope"]
                if ropes:
                    t, hh, d = _shape(types[s.results[0]], env)
                    add(
                        Subgraph(
                            "headnorm_rope",
                            (s.results[0], ropes[0].results[0]),
                            (("T", t), ("Hh", hh), ("D", d)),
                            (("eps", _attr(s, "eps", env, 1e-6)),),
                        )
                    )
            elif s.op == "paged_attention":
                _, hq, d = (
                    _shape(types[s.operands[0].name], env)
                    if isinstance(s.operands[0], ir.ValueRef)
                    else (0, 0, 0)
                )
                _, hkv, _ = _shape(types[s.operands[1].name], env)
                n = int(analysis.serve.max_seq_len) if getattr(analysis, "serve", None) else 2048
                scale = _attr(s, "scale", env, 0.0) or d**-0.5
                add(
                    Subgraph(
                        "decode_attention",
                        (s.results[0],),
                        (("G", hq // hkv), ("D", d), ("N", n)),
                        (("scale", scale),),
                    )
                )
    return out
