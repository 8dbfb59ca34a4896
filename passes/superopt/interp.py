"""The reference interpreter of block programs, generic over a number domain (the spec of imap/fmap/omap
and of every block op that the CUDA emitter must match)."""

from __future__ import annotations

import itertools

import numpy as np

from mpkir.passes.superopt.program import Fused, Program, ProgramError, validate


def _tile(dom, x, inp, g, it, prog: Program):
    sl = [slice(None)] * len(inp.shape)
    for a, d in enumerate(inp.imap):
        if d >= 0:
            n = inp.shape[d] // prog.grid[a]
            sl[d] = slice(g[a] * n, (g[a] + 1) * n)
    if inp.fmap >= 0:
        d = inp.fmap
        whole = sl[d]
        start = 0 if whole.start is None else whole.start
        size = (inp.shape[d] if whole.stop is None else whole.stop - start) // prog.loop
        sl[d] = slice(start + it * size, start + (it + 1) * size)
    return dom.take(x, tuple(sl))


def _rot_half(dom, x):
    h = x.shape[-1] // 2
    return dom.concat([dom.neg(dom.take(x, (..., slice(h, None)))), dom.take(x, (..., slice(0, h)))], -1)


def apply_op(dom, kind: str, args, attrs: dict):
    a = args[0]
    if kind in ("add", "sub", "mul", "div"):
        return getattr(dom, kind)(a, args[1])
    if kind == "matmul":
        return dom.matmul(a, args[1])
    if kind == "matmul_nt":
        return dom.matmul(a, dom.transpose(args[1]))
    if kind in ("exp", "silu", "rsqrt"):
        return getattr(dom, kind)(a)
    if kind == "square":
        return dom.mul(a, a)
    if kind == "rot_half":
        return _rot_half(dom, a)
    if kind in ("sum", "max"):
        return getattr(dom, kind)(a, int(attrs.get("axis", -1)))
    if kind == "scale":
        return dom.mul(a, dom.const(attrs["c"]))
    if kind == "addc":
        return dom.add(a, dom.const(attrs["c"]))
    if kind == "rsqrt_mean":
        s = dom.mul(a, dom.inv_int(int(attrs["n"])))
        return dom.rsqrt(dom.add(s, dom.const(attrs["eps"])))
    raise ValueError(f"unknown block op {kind}")


def online_softmax_step(dom, acc: dict, results, s, v, first: bool) -> None:
    """One iteration of ``online_softmax``: scores s [..., n], values v [n, d] into acc[o], acc[l], acc[m]."""
    o_k, l_k, m_k = results
    mt = dom.max(s, -1)
    if first:
        m_new = mt
        p = dom.exp(dom.sub(s, m_new))
        acc[l_k] = dom.sum(p, -1)
        acc[o_k] = dom.matmul(p, v)
    else:
        m_new = dom.maximum(acc[m_k], mt)
        alpha = dom.exp(dom.sub(acc[m_k], m_new))
        p = dom.exp(dom.sub(s, m_new))
        acc[l_k] = dom.add(dom.mul(acc[l_k], alpha), dom.sum(p, -1))
        acc[o_k] = dom.add(dom.mul(acc[o_k], alpha), dom.matmul(p, v))
    acc[m_k] = m_new


def run_program(prog: Program, inputs: dict, dom) -> dict:
    """Run ``prog`` on whole input tensors; returns its output tensors (assembled from the blocks)."""
    validate(prog)
    if prog.paged:
        raise ProgramError(
            f"{prog.name}: a paged program depends on each token's length and split count: run it with "
            "passes.superopt.paged.run_paged"
        )
    outs = {o.name: None for o in prog.outputs}
    pieces: dict[str, dict] = {o.name: {} for o in prog.outputs}
    for g in itertools.product(*(range(n) for n in prog.grid)):
        acc: dict[str, object] = {}
        for it in range(prog.loop):
            env = {i.name: _tile(dom, inputs[i.name], i, g, it, prog) for i in prog.inputs}
            for op in prog.body:
                r = apply_op(dom, op.kind, [env[x.lstrip("%")] for x in op.args], dict(op.attrs))
                env[op.results[0]] = r
            for op in prog.accs:
                vals = [env[x.lstrip("%")] for x in op.args]
                if op.kind == "sum":
                    k = op.results[0]
                    acc[k] = vals[0] if it == 0 else dom.add(acc[k], vals[0])
                elif op.kind == "max":
                    k = op.results[0]
                    acc[k] = vals[0] if it == 0 else dom.maximum(acc[k], vals[0])
                elif op.kind == "online_softmax":
                    online_softmax_step(dom, acc, op.results, vals[0], vals[1], it == 0)
        env = dict(env) if prog.loop else {}
        env.update(acc)
        for op in prog.epilogue:
            env[op.results[0]] = apply_op(dom, op.kind, [env[x.lstrip("%")] for x in op.args], dict(op.attrs))
        for o in prog.outputs:
            pieces[o.name][g] = env[o.value.lstrip("%")]
    for o in prog.outputs:
        outs[o.name] = _assemble(dom, prog, o, pieces[o.name])
    return outs


def _assemble(dom, prog, o, blocks):
    """Concatenate block tiles along each grid axis's omap dim (axes with omap -1 must agree)."""

    def rec(axis, prefix):
        if axis == len(prog.grid):
            t = blocks[tuple(prefix)]
            while t.ndim < len(o.shape):
                t = t.reshape(1, *t.shape)
            return t
        parts = [rec(axis + 1, [*prefix, i]) for i in range(prog.grid[axis])]
        d = o.omap[axis]
        if d < 0:
            return parts[0]
        return dom.concat(parts, d)

    out = rec(0, [])
    if tuple(out.shape) != tuple(o.shape) and int(np.prod(out.shape)) == int(np.prod(o.shape)):
        out = out.reshape(*o.shape)
    if tuple(out.shape) != tuple(o.shape):
        raise ValueError(f"{prog.name}: output {o.name} assembled to {tuple(out.shape)}, declared {o.shape}")
    return out


def run_fused(f: Fused, inputs: dict, dom) -> dict:
    env = dict(inputs)
    for p in f.programs:
        env.update(run_program(p, env, dom))
    return env
