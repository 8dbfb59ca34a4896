"""Generic CUDA emitter: any valid block program → one ``__device__`` task body.

Task contract: a fixed number of threads (``program.threads``), no ``blockIdx``; the runtime passes
each input pointer pre-offset to this task's tile origin (grid axes applied) and each output pointer
pre-offset to the task's output tile; strides are those of the whole (row-major) tensors and are
compile-time constants.  Every value lives in shared memory as float32; each op is a block-stride loop
followed by ``__syncthreads()``.  Simple and generic, not fast: it is the executable form of the spec.
"""

from __future__ import annotations

import numpy as np

from mpkir.passes.superopt.interp import _tile, apply_op
from mpkir.passes.superopt.program import Fused, Program, validate
from mpkir.passes.superopt.search import interp_float

_UN = {
    "exp": "expf({a})",
    "silu": "({a} / (1.f + expf(-{a})))",
    "rsqrt": "rsqrtf({a})",
    "square": "({a} * {a})",
}
_BIN = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def _f(v) -> str:
    return repr(float(v)) + "f"


def _strides(shape):
    s, out = 1, []
    for d in reversed(shape):
        out.append(s)
        s *= d
    return tuple(reversed(out))


def _idx(shape, var="i"):
    """C expressions of the multi-index of linear index ``var`` in ``shape``."""
    st = _strides(shape)
    return [f"(({var} / {st[k]}) % {shape[k]})" for k in range(len(shape))]


def _bcast(src, dst, idx):
    """Offset into a row-major ``src`` broadcast (NumPy rules) to ``dst`` at multi-index ``idx``."""
    st, off = _strides(src), ["0"]
    lead = len(dst) - len(src)
    for k, d in enumerate(src):
        if d != 1:
            off.append(f"{idx[lead + k]} * {st[k]}")
    return " + ".join(off)


def _shapes(p: Program) -> dict[str, tuple[int, ...]]:
    f = interp_float()
    env = {i.name: _tile(f, np.ones(i.shape), i, (0,) * len(p.grid), 0, p) for i in p.inputs}
    for o in p.body:
        env[o.results[0]] = apply_op(f, o.kind, [env[a.lstrip("%")] for a in o.args], dict(o.attrs))
    for o in p.accs:
        a = env[o.args[0].lstrip("%")]
        if o.kind == "online_softmax":
            v = env[o.args[1].lstrip("%")]
            env[o.results[0]] = np.ones(a.shape[:-1] + v.shape[-1:])
            env[o.results[1]] = env[o.results[2]] = np.ones((*a.shape[:-1], 1))
        else:
            env[o.results[0]] = a
    for o in p.epilogue:
        env[o.results[0]] = apply_op(f, o.kind, [env[a.lstrip("%")] for a in o.args], dict(o.attrs))
    return {k: tuple(np.shape(v)) for k, v in env.items()}


def _loop(n, body, threads):
    return f"  for (int i = threadIdx.x; i < {n}; i += {threads}) {{ {body} }}\n  __syncthreads();\n"


def _op(o, sh, threads) -> str:
    r = o.results[0]
    out = sh[r]
    n = int(np.prod(out)) if out else 1
    idx = _idx(out)
    args = [a.lstrip("%") for a in o.args]

    def at(a):
        return f"s_{a}[{_bcast(sh[a], out, idx)}]"

    if o.kind in _UN:
        return _loop(n, f"s_{r}[i] = {_UN[o.kind].format(a=at(args[0]))};", threads)
    if o.kind in _BIN:
        return _loop(n, f"s_{r}[i] = {at(args[0])} {_BIN[o.kind]} {at(args[1])};", threads)
    if o.kind == "scale":
        return _loop(n, f"s_{r}[i] = {at(args[0])} * {_f(o.attr('c'))};", threads)
    if o.kind == "addc":
        return _loop(n, f"s_{r}[i] = {at(args[0])} + {_f(o.attr('c'))};", threads)
    if o.kind == "rsqrt_mean":
        return _loop(
            n, f"s_{r}[i] = rsqrtf({at(args[0])} / {_f(o.attr('n'))} + {_f(o.attr('eps'))});", threads
        )
    if o.kind == "rot_half":
        d = out[-1]
        h = d // 2
        return _loop(
            n, f"int c = i % {d}; s_{r}[i] = c < {h} ? -s_{args[0]}[i + {h}] : s_{args[0]}[i - {h}];", threads
        )
    if o.kind in ("matmul", "matmul_nt"):
        a, b = sh[args[0]], sh[args[1]]
        k = a[-1]
        m_idx, n_idx = idx[-2], idx[-1]
        bo = f"{n_idx} * {k} + kk" if o.kind == "matmul_nt" else f"kk * {b[-1]} + {n_idx}"
        batch = f"(i / {out[-1] * out[-2]}) * {a[-1] * a[-2]}" if len(a) > 2 else "0"
        return _loop(
            n,
            f"float acc = 0.f; for (int kk = 0; kk < {k}; ++kk) acc += "
            f"s_{args[0]}[{batch} + {m_idx} * {k} + kk] * s_{args[1]}[{bo}]; s_{r}[i] = acc;",
            threads,
        )
    if o.kind in ("sum", "max"):
        src = sh[args[0]]
        ax = int(o.attr("axis", -1)) % len(src)
        st = _strides(src)
        base = " + ".join(f"{idx[k]} * {st[k]}" for k in range(len(src)) if k != ax) or "0"
        comb = "acc += v;" if o.kind == "sum" else "acc = fmaxf(acc, v);"
        init = "0.f" if o.kind == "sum" else "-INFINITY"
        return _loop(
            n,
            f"float acc = {init}; for (int j = 0; j < {src[ax]}; ++j) {{ float v = "
            f"s_{args[0]}[{base} + j * {st[ax]}]; {comb} }} s_{r}[i] = acc;",
            threads,
        )
    raise ValueError(f"no CUDA for {o.kind}")


def emit_program(p: Program, func: str | None = None) -> str:
    validate(p)
    sh = _shapes(p)
    t = p.threads
    func = func or f"superopt_{p.name}"
    params = [f"const __nv_bfloat16* __restrict__ {i.name}" for i in p.inputs]
    params += [f"__nv_bfloat16* __restrict__ out_{o.name}" for o in p.outputs]
    lines = [f"__device__ void {func}({', '.join(params)}) {{"]
    for name, s in sh.items():
        lines.append(f"  __shared__ float s_{name}[{max(1, int(np.prod(s)) if s else 1)}];")
    for o in p.accs:
        for r in o.results:
            lines.append(f"  __shared__ float a_{r}[{max(1, int(np.prod(sh[r])))}];")
    lines.append(f"  for (int it = 0; it < {p.loop}; ++it) {{")
    body = []
    for i in p.inputs:
        tile = sh[i.name]
        full = _strides(i.shape)
        idx = _idx(tile)
        off = " + ".join(f"{idx[k]} * {full[k]}" for k in range(len(tile))) or "0"
        it_off = f"it * {tile[i.fmap]} * {full[i.fmap]}" if i.fmap >= 0 else "0"
        body.append(
            _loop(
                int(np.prod(tile)) if tile else 1,
                f"s_{i.name}[i] = __bfloat162float({i.name}[{it_off} + {off}]);",
                t,
            )
        )
    body += [_op(o, sh, t) for o in p.body]
    for o in p.accs:
        r = o.results[0]
        n = int(np.prod(sh[r]))
        src = o.args[0].lstrip("%")
        if o.kind == "sum":
            body.append(_loop(n, f"a_{r}[i] = (it == 0 ? 0.f : a_{r}[i]) + s_{src}[i];", t))
        elif o.kind == "max":
            body.append(_loop(n, f"a_{r}[i] = it == 0 ? s_{src}[i] : fmaxf(a_{r}[i], s_{src}[i]);", t))
        else:  # online softmax, one thread per row
            ro, rl, rm = o.results
            s_sh, v_name = sh[src], o.args[1].lstrip("%")
            cols, d = s_sh[-1], sh[ro][-1]
            rows = int(np.prod(s_sh[:-1]))
            sv = f"s_{src}[r * {cols} + j]"
            ao = f"a_{ro}[r * {d} + c]"
            body.append(
                f"  for (int r = threadIdx.x; r < {rows}; r += {t}) {{\n"
                f"    float mt = -INFINITY;\n"
                f"    for (int j = 0; j < {cols}; ++j) mt = fmaxf(mt, {sv});\n"
                f"    float mo = it == 0 ? -INFINITY : a_{rm}[r]; float mn = fmaxf(mo, mt);\n"
                f"    float al = it == 0 ? 0.f : expf(mo - mn); float l = it == 0 ? 0.f : a_{rl}[r] * al;\n"
                f"    for (int c = 0; c < {d}; ++c) {ao} = it == 0 ? 0.f : {ao} * al;\n"
                f"    for (int j = 0; j < {cols}; ++j) {{ float pj = expf({sv} - mn); l += pj;\n"
                f"      for (int c = 0; c < {d}; ++c) {ao} += pj * s_{v_name}[j * {d} + c]; }}\n"
                f"    a_{rl}[r] = l; a_{rm}[r] = mn;\n  }}\n  __syncthreads();\n"
            )
    lines += ["  " + x for x in "".join(body).splitlines()]
    lines.append("  }")
    for o in p.accs:
        for r in o.results:
            lines.append(_loop(int(np.prod(sh[r])), f"s_{r}[i] = a_{r}[i];", t).rstrip("\n"))
    lines += [_op(o, sh, t).rstrip("\n") for o in p.epilogue]
    for o in p.outputs:
        v = o.value.lstrip("%")
        tile = sh[v]
        # the output tile is written at this task's origin with the full tensor's strides
        full = _strides(o.shape)
        tshape = (1,) * (len(o.shape) - len(tile)) + tuple(tile) if len(tile) <= len(o.shape) else tile
        idx = _idx(tshape)
        off = (
            " + ".join(f"{idx[k]} * {full[k]}" for k in range(len(o.shape)))
            if len(tshape) == len(o.shape)
            else "i"
        )
        lines.append(
            _loop(int(np.prod(tile)), f"out_{o.name}[{off}] = __float2bfloat16(s_{v}[i]);", t).rstrip("\n")
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def emit_fused(f: Fused) -> str:
    head = "#include <cuda_bf16.h>\n#include <math.h>\n\n"
    return head + "\n".join(emit_program(p) for p in f.programs)
