"""Generic CUDA emitter: any valid block program → a ``__device__`` task body in the megakernel's contract.

Contract (``codegen/mk_runtime.cuh``): a fixed number of threads (``MKSO_NT``, default 512 = ``MK_NT``),
no ``blockIdx``, dynamic shared memory only (``char* smem``).  The body

    __device__ void so_<name>(const __nv_bfloat16* x, ..., __nv_bfloat16* out_y, int tile, char* smem)

takes one pointer per input then per output, each pre-offset to this instance of the subgraph (e.g. the
layer's weights) and addressing the whole row-major tensor, and the task's ``tile`` index (row-major over
the grid: one grid point = one task); it derives every tile origin from the program's imap/fmap/omap.
Tensors exchanged between the programs of one :class:`Fused` (e.g. split-KV partials) are float32, all
others bf16.  Every value lives in shared memory as float32; each op is a block-stride loop followed by
``__syncthreads()``.  :func:`task_adapter` wraps a body as ``mk_so_<name>(const MkTask&, int it, int B,
char* smem)`` (pointers ``t.p[0..]``, tile ``t.a[16]``) and :func:`mini_kernel` runs one task type over its
grid in a persistent launch.  The same text compiles as plain C++ (``MKSO_NT 1``) for the CPU executor
used by the tests, so what is checked on the CPU is the emitted code itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpkir.passes.superopt.domains import Float
from mpkir.passes.superopt.interp import apply_op
from mpkir.passes.superopt.program import Fused, Program, ProgramError, validate

THREADS = 512
SMEM_LIMIT = 227 * 1024 - 1024  # the megakernel's dynamic shared-memory budget (codegen/lower.py)

PRELUDE = r"""// superopt: generic block-program task bodies (mpkir.passes.superopt.cuda)
#if defined(__CUDACC__) || defined(MK_CPU_EMULATION)  // (the device, or mpkir.testing.cta's emulated CTA)
#ifdef __CUDACC__
#include <cuda_bf16.h>
#endif
#ifndef MKSO_NT
#ifdef MK_NT
#define MKSO_NT MK_NT
#else
#define MKSO_NT 512
#endif
#endif
#define MKSO_TID ((int)threadIdx.x)
#define MKSO_SYNC() __syncthreads()
#define MKSO_NEG_INF (__int_as_float(0xff800000))
#define MKSO_LANES 32
#define MKSO_LANE ((int)threadIdx.x & 31)
#define MKSO_WARP ((int)threadIdx.x >> 5)
#define MKSO_NWARP (MKSO_NT / 32)
#ifdef MK_CPU_EMULATION  // the same butterfly, replayed from one exchange (mpkir.testing.cta)
#define mkso_warp_sum mk_cpu_warp_sum
#define mkso_warp_max mk_cpu_warp_max
#else
__device__ __forceinline__ float mkso_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float mkso_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
#endif
__device__ __forceinline__ float mkso_ld(const __nv_bfloat16* p) {
  unsigned short u = __ldcg((const unsigned short*)p);
  return __uint_as_float(((unsigned)u) << 16);
}
__device__ __forceinline__ float mkso_ld(const float* p) { return __ldcg(p); }
__device__ __forceinline__ int mkso_ldi(const int* p) { return __ldcg(p); }
__device__ __forceinline__ void mkso_ld8(const __nv_bfloat16* p, float* f) {
  uint4 v = __ldcg((const uint4*)p);
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void mkso_st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void mkso_st(float* p, float v) { *p = v; }
#else  // plain C++: the CPU executor of the tests (one thread walks every block-stride loop)
#include <math.h>
#include <string.h>
#define __device__
#define __forceinline__ inline
#define __restrict__
#define MKSO_NT 1
#define MKSO_TID 0
#define MKSO_SYNC()
#define MKSO_NEG_INF (-INFINITY)
#define MKSO_LANES 1  // one "warp" of one lane: the lane loops cover everything, reductions are identities
#define MKSO_LANE 0
#define MKSO_WARP 0
#define MKSO_NWARP 1
static inline float mkso_warp_sum(float v) { return v; }
static inline float mkso_warp_max(float v) { return v; }
struct __nv_bfloat16 { unsigned short x; };
static inline float mkso_ld(const __nv_bfloat16* p) {
  unsigned u = ((unsigned)p->x) << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline float mkso_ld(const float* p) { return *p; }
static inline int mkso_ldi(const int* p) { return *p; }
static inline void mkso_ld8(const __nv_bfloat16* p, float* f) {
  for (int i = 0; i < 8; ++i) f[i] = mkso_ld(p + i);
}
static inline void mkso_st(__nv_bfloat16* p, float v) {
  unsigned u; memcpy(&u, &v, 4); u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; p->x = (unsigned short)u;
}
static inline void mkso_st(float* p, float v) { *p = v; }
static inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
#endif
"""

_UN = {
    "exp": "expf({a})",
    "silu": "({a} / (1.f + expf(-{a})))",
    "rsqrt": "rsqrtf({a})",
    "square": "({a} * {a})",
}
_BIN = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "bf16" | "f32"
    output: bool

    @property
    def ctype(self) -> str:
        return "__nv_bfloat16" if self.dtype == "bf16" else "float"


@dataclass(frozen=True)
class Body:
    """One emitted task type: its function name, pointer parameters (inputs then outputs), tasks, smem, and
    the outputs whose row stride is a parameter (``int ld_<name>`` after the pointers)."""

    func: str
    program: Program
    params: tuple[Param, ...]
    ntasks: int
    smem_bytes: int
    source: str
    strided: tuple[str, ...] = ()


def _f(v) -> str:
    return repr(float(v)) + "f"


def _numel(s) -> int:
    return int(np.prod(s)) if len(s) else 1


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


def shapes(p: Program) -> dict[str, tuple[int, ...]]:
    """Tile shape of every value of one task (inputs, body, accumulators, epilogue)."""
    f = Float()
    env = {i.name: np.ones(shapes_of_input(p, i)) for i in p.inputs}
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
    return {k: tuple(int(x) for x in np.shape(v)) for k, v in env.items()}


def _loop(n, body):
    return f"  for (int i = MKSO_TID; i < {n}; i += MKSO_NT) {{ {body} }}\n  MKSO_SYNC();\n"


def _op(o, sh) -> str:
    r = o.results[0]
    out = sh[r]
    n = _numel(out)
    idx = _idx(out)
    args = [a.lstrip("%") for a in o.args]

    def at(a):
        if sh[a] == out:  # same shape: the linear index itself
            return f"s_{a}[i]"
        return f"s_{a}[{_bcast(sh[a], out, idx)}]"

    if o.kind in _UN:
        return _loop(n, f"s_{r}[i] = {_UN[o.kind].format(a=at(args[0]))};")
    if o.kind in _BIN:
        return _loop(n, f"s_{r}[i] = {at(args[0])} {_BIN[o.kind]} {at(args[1])};")
    if o.kind == "scale":
        return _loop(n, f"s_{r}[i] = {at(args[0])} * {_f(o.attr('c'))};")
    if o.kind == "addc":
        return _loop(n, f"s_{r}[i] = {at(args[0])} + {_f(o.attr('c'))};")
    if o.kind == "rsqrt_mean":
        return _loop(n, f"s_{r}[i] = rsqrtf({at(args[0])} / {_f(o.attr('n'))} + {_f(o.attr('eps'))});")
    if o.kind == "rot_half":
        if sh[args[0]] != out:
            raise ProgramError(f"rot_half of a broadcast value {args[0]}")
        h = out[-1] // 2
        return _loop(
            n, f"int c = i % {out[-1]}; s_{r}[i] = c < {h} ? -s_{args[0]}[i + {h}] : s_{args[0]}[i - {h}];"
        )
    if _warp_mm(o, sh):
        return _matmul_nt_warp(r, args[0], args[1], sh)
    if o.kind in ("matmul", "matmul_nt"):
        a, b = sh[args[0]], sh[args[1]]
        if len(a) < 2 or len(b) < 2:
            raise ProgramError(f"{o.kind} needs operands of rank >= 2")
        m, k = a[-2], a[-1]
        nn = out[-1]
        a_off = f"({_bcast(a[:-2], out[:-2], idx[:-2])}) * {m * k}"
        b_off = f"({_bcast(b[:-2], out[:-2], idx[:-2])}) * {k * nn}"
        bo = f"{idx[-1]} * {k} + kk" if o.kind == "matmul_nt" else f"kk * {nn} + {idx[-1]}"
        # start the k walk at a per-thread rotation: no shared-memory bank conflicts on row-major tiles
        return _loop(
            n,
            f"const int ao = {a_off} + {idx[-2]} * {k}, bo = {b_off}; float acc = 0.f; "
            f"for (int q = 0; q < {k}; ++q) {{ const int kk = (q + i) % {k}; "
            f"acc += s_{args[0]}[ao + kk] * s_{args[1]}[bo + {bo}]; }} s_{r}[i] = acc;",
        )
    if o.kind in ("sum", "max"):
        src = sh[args[0]]
        ax = int(o.attr("axis", -1)) % len(src)
        st = _strides(src)
        base = " + ".join(f"{idx[k]} * {st[k]}" for k in range(len(src)) if k != ax) or "0"
        comb = "acc += v;" if o.kind == "sum" else "acc = fmaxf(acc, v);"
        init = "0.f" if o.kind == "sum" else "MKSO_NEG_INF"
        if src[ax] >= 32:  # a warp per output element, lanes along the reduced axis
            red = "mkso_warp_sum" if o.kind == "sum" else "mkso_warp_max"
            return (
                f"  for (int i = MKSO_WARP; i < {n}; i += MKSO_NWARP) {{\n"
                f"    float acc = {init};\n"
                f"    for (int j = MKSO_LANE; j < {src[ax]}; j += MKSO_LANES) {{ float v = "
                f"s_{args[0]}[{base} + j * {st[ax]}]; {comb} }}\n"
                f"    acc = {red}(acc);\n"
                f"    if (MKSO_LANE == 0) s_{r}[i] = acc;\n  }}\n  MKSO_SYNC();\n"
            )
        return _loop(
            n,
            f"float acc = {init}; for (int j = 0; j < {src[ax]}; ++j) {{ float v = "
            f"s_{args[0]}[{base} + j * {st[ax]}]; {comb} }} s_{r}[i] = acc;",
        )
    raise ProgramError(f"no CUDA for block op {o.kind}")


def _warp_mm(o, sh) -> bool:
    if o.kind != "matmul_nt":
        return False
    a, b = (sh[x.lstrip("%")] for x in o.args)
    return len(a) == 2 and len(b) == 2 and a[0] <= 16


def _mm_split(sh, a, b) -> tuple[int, int, int]:
    """(columns per warp C, column groups, K slices) of the warp matmul: when there are fewer column
    groups than warps, K is split across warps too (partials summed through shared memory)."""
    k, nn = sh[a][1], sh[b][0]
    c = next(x for x in (4, 2, 1) if nn % x == 0)
    groups = nn // c
    nwarp = THREADS // 32
    ks = 1
    while groups * ks * 2 <= nwarp and k % (ks * 2) == 0 and k // (ks * 2) >= 32:
        ks *= 2
    return c, groups, ks


def _matmul_nt_warp(r, a, b, sh) -> str:
    """out[M, N] = a[M, K] · b[N, K]ᵀ for small M: a warp per (group of C columns, K slice), lanes along
    K, M×C accumulators in registers (a is read once per C columns), warp-shuffle reduction."""
    (m, k), nn = sh[a], sh[b][0]
    c, groups, ks = _mm_split(sh, a, b)
    kl = k // ks
    dst = (
        f"s_{r}[mm * {nn} + grp * {c} + cc]"
        if ks == 1
        else f"mm_{r}[(ksl * {m} + mm) * {nn} + grp * {c} + cc]"
    )
    code = (
        f"  for (int wi = MKSO_WARP; wi < {groups * ks}; wi += MKSO_NWARP) {{\n"
        f"    const int grp = wi % {groups}, ksl = wi / {groups};\n"
        f"    float acc[{m}][{c}];\n"
        f"#pragma unroll\n    for (int mm = 0; mm < {m}; ++mm)\n"
        f"#pragma unroll\n      for (int cc = 0; cc < {c}; ++cc) acc[mm][cc] = 0.f;\n"
        f"    const float* bp = s_{b} + grp * {c * k};\n"
        f"    for (int kk = ksl * {kl} + MKSO_LANE; kk < (ksl + 1) * {kl}; kk += MKSO_LANES) {{\n"
        f"      float bv[{c}];\n"
        f"#pragma unroll\n      for (int cc = 0; cc < {c}; ++cc) bv[cc] = bp[cc * {k} + kk];\n"
        f"#pragma unroll\n      for (int mm = 0; mm < {m}; ++mm) {{\n"
        f"        const float av = s_{a}[mm * {k} + kk];\n"
        f"#pragma unroll\n        for (int cc = 0; cc < {c}; ++cc) acc[mm][cc] += av * bv[cc];\n"
        f"      }}\n    }}\n"
        f"#pragma unroll\n    for (int mm = 0; mm < {m}; ++mm)\n"
        f"#pragma unroll\n      for (int cc = 0; cc < {c}; ++cc) {{\n"
        f"        const float v = mkso_warp_sum(acc[mm][cc]);\n"
        f"        if (MKSO_LANE == 0) {dst} = v;\n"
        f"      }}\n  }}\n  MKSO_SYNC();\n"
    )
    if ks > 1:
        code += _loop(
            m * nn,
            f"float v = 0.f; for (int q = 0; q < {ks}; ++q) v += mm_{r}[q * {m * nn} + i]; s_{r}[i] = v;",
        )
    return code


def _grid_coords(p: Program) -> list[str]:
    out = []
    for a, n in enumerate(p.grid):
        inner = _numel(p.grid[a + 1 :])
        out.append(f"  const int g{a} = (tile / {inner}) % {n};")
    return out


def _in_origin(p: Program, i) -> tuple[str, str]:
    """(grid part, loop part) of the offset of a task's input tile in the whole tensor."""
    full = _strides(i.shape)
    seen, terms = set(), []
    for a, d in enumerate(i.imap):
        if d >= 0:
            if d in seen:
                raise ProgramError(f"{p.name}: input {i.name}: two grid axes split dim {d}")
            seen.add(d)
            terms.append(f"g{a} * {i.shape[d] // p.grid[a] * full[d]}")
    tile = shapes_of_input(p, i)
    it = f"it * {tile[i.fmap] * full[i.fmap]}" if i.fmap >= 0 else "0"
    return " + ".join(terms) or "0", it


def shapes_of_input(p: Program, i) -> tuple[int, ...]:
    s = list(i.shape)
    for a, d in enumerate(i.imap):
        if d >= 0:
            s[d] //= p.grid[a]
    if i.fmap >= 0:
        s[i.fmap] //= p.loop
    return tuple(s)


def _load(p: Program, i, dtype: str) -> str:
    tile = shapes_of_input(p, i)
    full = _strides(i.shape)
    _go, it = _in_origin(p, i)
    n = _numel(tile)
    if dtype == "bf16" and len(tile) and tile[-1] % 8 == 0 and i.shape[-1] % 8 == 0 and n >= 8:
        idx = _idx(tile, "e")
        off = " + ".join(f"{idx[k]} * {full[k]}" for k in range(len(tile)))
        return (
            f"  for (int c = MKSO_TID; c < {n // 8}; c += MKSO_NT) {{ const int e = c * 8; "
            f"mkso_ld8({i.name} + o_{i.name} + {it} + {off}, s_{i.name} + e); }}\n"
        )
    idx = _idx(tile)
    off = " + ".join(f"{idx[k]} * {full[k]}" for k in range(len(tile))) or "0"
    src = f"{i.name} + o_{i.name} + {it} + {off}"
    return f"  for (int i = MKSO_TID; i < {n}; i += MKSO_NT) {{ s_{i.name}[i] = mkso_ld({src}); }}\n"


def _scaled(c: int, s) -> str:
    """``c`` times stride ``s`` (an int, folded; or a runtime expression)."""
    return str(c * s) if isinstance(s, int) else f"{c} * {s}"


def _store(p: Program, o, sh, strided: tuple[str, ...] = ()) -> str:
    v = o.value.lstrip("%")
    t = list(sh[v])
    while len(t) > len(o.shape) and t[0] == 1:
        t.pop(0)
    t = [1] * (len(o.shape) - len(t)) + t
    if len(t) != len(o.shape):
        raise ProgramError(f"{p.name}: output {o.name}: tile {sh[v]} does not fit rank {len(o.shape)}")
    full: list = list(_strides(o.shape))
    if o.name in strided:  # the row stride is the body's parameter ld_<name> (a task argument)
        full[0] = f"ld_{o.name}"
    terms = []
    for d in range(len(o.shape)):
        axes = [a for a, od in enumerate(o.omap) if od == d]
        ext = t[d] * _numel([p.grid[a] for a in axes])
        if ext != o.shape[d]:
            raise ProgramError(
                f"{p.name}: output {o.name}: dim {d} assembles to {ext}, declared {o.shape[d]}"
            )
        if axes:
            lin = f"g{axes[0]}"
            for a in axes[1:]:
                lin = f"({lin} * {p.grid[a]} + g{a})"
            terms.append(f"{lin} * {_scaled(t[d], full[d])}")
    guard = " && ".join(f"g{a} == 0" for a, od in enumerate(o.omap) if od < 0 and p.grid[a] > 1)
    idx = _idx(tuple(t))
    off = " + ".join(f"{idx[k]} * {full[k]}" for k in range(len(t))) or "0"
    origin = " + ".join(terms) or "0"
    loop = _loop(_numel(t), f"mkso_st(out_{o.name} + {origin} + {off}, s_{v}[i]);")
    return f"  if ({guard}) {{\n{loop}  }}\n" if guard else loop


def _online_softmax(o, sh) -> str:
    ro, rl, rm = o.results
    src, v = o.args[0].lstrip("%"), o.args[1].lstrip("%")
    s_sh = sh[src]
    cols, d = s_sh[-1], sh[ro][-1]
    rows = _numel(s_sh[:-1])
    if sh[v] != (cols, d):
        raise ProgramError(f"online_softmax: value tile {sh[v]} is not [{cols}, {d}]")
    sv = f"s_{src}[r * {cols} + j]"
    return (
        # phase 1 (thread per row): new max, rescale factor, p = exp(s - m), row sum
        f"  for (int r = MKSO_WARP; r < {rows}; r += MKSO_NWARP) {{  // a warp per row, lanes along it\n"
        f"    float mt = MKSO_NEG_INF;\n"
        f"    for (int j = MKSO_LANE; j < {cols}; j += MKSO_LANES) mt = fmaxf(mt, {sv});\n"
        f"    mt = mkso_warp_max(mt);\n"
        f"    const float mo = it == 0 ? MKSO_NEG_INF : a_{rm}[r], mn = fmaxf(mo, mt);\n"
        f"    const float al = it == 0 ? 0.f : expf(mo - mn);\n"
        f"    float l = 0.f;\n"
        f"    for (int j = MKSO_LANE; j < {cols}; j += MKSO_LANES) {{\n"
        f"      const float pj = expf({sv} - mn); p_{ro}[r * {cols} + j] = pj; l += pj;\n    }}\n"
        f"    l = mkso_warp_sum(l);\n"
        f"    if (MKSO_LANE == 0) {{ a_{rl}[r] = (it == 0 ? 0.f : a_{rl}[r] * al) + l; a_{rm}[r] = mn; "
        f"al_{ro}[r] = al; }}\n"
        f"  }}\n  MKSO_SYNC();\n"
        # phase 2 (thread per output element): o = o * alpha + p @ v
        + _loop(
            rows * d,
            f"const int r = i / {d}, c = i % {d}; float acc = it == 0 ? 0.f : a_{ro}[i] * al_{ro}[r]; "
            f"for (int j = 0; j < {cols}; ++j) acc += p_{ro}[r * {cols} + j] * s_{v}[j * {d} + c]; "
            f"a_{ro}[i] = acc;",
        )
    )


def _smem_layout(p: Program, sh) -> tuple[list[tuple[str, int]], int]:
    bufs = [(f"s_{k}", _numel(s)) for k, s in sh.items()]
    for o in p.body + p.epilogue:
        if _warp_mm(o, sh):
            _c, _g, ks = _mm_split(sh, o.args[0].lstrip("%"), o.args[1].lstrip("%"))
            if ks > 1:
                bufs.append((f"mm_{o.results[0]}", ks * _numel(sh[o.results[0]])))
    for o in p.accs:
        bufs += [(f"a_{r}", _numel(sh[r])) for r in o.results]
        if o.kind == "online_softmax":
            src = o.args[0].lstrip("%")
            bufs += [(f"p_{o.results[0]}", _numel(sh[src])), (f"al_{o.results[0]}", _numel(sh[src][:-1]))]
    out, off = [], 0
    for name, n in bufs:
        out.append((name, off))
        off += (max(1, n) * 4 + 15) // 16 * 16
    return out, off


def emit_body(
    p: Program, dtypes: dict[str, str] | None = None, func: str | None = None, strided: tuple[str, ...] = ()
) -> Body:
    """The ``__device__`` body of one program; ``dtypes`` maps tensor names to 'f32' (default bf16);
    ``strided``: outputs whose row stride (elements between rows, the shape's otherwise) is a parameter
    ``ld_<name>``, so a task can write its tile into a narrower tensor. A paged program (``paged(k, v)``) gets
    mk_attention's contract instead (:mod:`paged`)."""
    if p.paged:
        from mpkir.passes.superopt.paged import emit_paged_attention

        return emit_paged_attention(p, func or f"so_{p.name}")
    validate(p)
    dtypes = dtypes or {}
    sh = shapes(p)
    func = func or f"so_{p.name}"
    params = tuple(Param(i.name, i.shape, dtypes.get(i.name, "bf16"), False) for i in p.inputs)
    params += tuple(Param(o.name, o.shape, dtypes.get(o.name, "bf16"), True) for o in p.outputs)
    strided = tuple(o.name for o in p.outputs if o.name in strided)
    sig = [f"const {q.ctype}* __restrict__ {q.name}" for q in params if not q.output]
    sig += [f"{q.ctype}* __restrict__ out_{q.name}" for q in params if q.output]
    sig += [f"int ld_{n}" for n in strided]
    lines = [f"__device__ void {func}({', '.join([*sig, 'int tile', 'char* smem'])}) {{"]
    lines += _grid_coords(p)
    layout, total = _smem_layout(p, sh)
    lines += [f"  float* {name} = (float*)(smem + {off});" for name, off in layout]
    for i in p.inputs:
        lines.append(f"  const int o_{i.name} = {_in_origin(p, i)[0]};")
    lines.append(f"  for (int it = 0; it < {p.loop}; ++it) {{")
    body = [_load(p, i, dtypes.get(i.name, "bf16")) for i in p.inputs]
    body.append("  MKSO_SYNC();\n")
    body += [_op(o, sh) for o in p.body]
    for o in p.accs:
        r = o.results[0]
        src = o.args[0].lstrip("%")
        if o.kind == "sum":
            body.append(_loop(_numel(sh[r]), f"a_{r}[i] = (it == 0 ? 0.f : a_{r}[i]) + s_{src}[i];"))
        elif o.kind == "max":
            body.append(
                _loop(_numel(sh[r]), f"a_{r}[i] = it == 0 ? s_{src}[i] : fmaxf(a_{r}[i], s_{src}[i]);")
            )
        else:
            body.append(_online_softmax(o, sh))
    lines += ["  " + x for x in "".join(body).splitlines()]
    lines.append("  }")
    for o in p.accs:
        for r in o.results:
            lines.append(_loop(_numel(sh[r]), f"s_{r}[i] = a_{r}[i];").rstrip("\n"))
    lines += [_op(o, sh).rstrip("\n") for o in p.epilogue]
    lines += [_store(p, o, sh, strided).rstrip("\n") for o in p.outputs]
    lines.append("}")
    return Body(func, p, params, p.ntasks, total, "\n".join(lines) + "\n", strided)


def fused_dtypes(f: Fused) -> dict[str, str]:
    """Tensors written by one program and read by a later one stay float32."""
    made, out = set(), {}
    for p in f.programs:
        for i in p.inputs:
            if i.name in made:
                out[i.name] = "f32"
        made.update(o.name for o in p.outputs)
    return out


def emit_bodies(f: Fused, prefix: str = "") -> list[Body]:
    dt = fused_dtypes(f)
    return [emit_body(p, dt, f"so_{prefix}{p.name}") for p in f.programs]


def task_args(b: Body) -> list[str]:
    """The body's arguments from a task ``t``: pointers ``t.p[0..]`` in parameter order, the row strides of
    its strided outputs ``t.a[18..]``, the tile index ``t.a[16]``, ``smem``."""
    if len(b.params) > 11:
        raise ProgramError(f"{b.func}: {len(b.params)} pointers (MkTask holds 11)")
    args = [
        f"({q.ctype}*)t.p[{k}]" if q.output else f"(const {q.ctype}*)t.p[{k}]" for k, q in enumerate(b.params)
    ]
    return [*args, *(f"t.a[{18 + k}]" for k in range(len(b.strided))), "t.a[16]", "smem"]


def task_adapter(b: Body) -> str:
    """The body as a megakernel task (arguments: :func:`task_args`)."""
    return (
        f"__device__ void mk_{b.func}(const MkTask& t, int it, int B, char* smem) {{\n"
        f"  if (!mk_block_wait(t)) return;\n"
        f"  {b.func}({', '.join(task_args(b))});\n}}\n"
    )


def mini_kernel(b: Body) -> str:
    """A persistent kernel of the task contract running only this task type: CTA c takes tasks c, c+grid, …
    (no events: every wait is already satisfied)."""
    return (
        f'extern "C" __global__ void __launch_bounds__(MKSO_NT, 1)\n'
        f"run_{b.func}(const MkTask* __restrict__ tasks, int ntasks) {{\n"
        f"  extern __shared__ __align__(16) char smem[];\n"
        f"  for (int i = blockIdx.x; i < ntasks; i += gridDim.x) {{\n"
        f"    if (threadIdx.x == 0) {{ mk_wctx.ok = 1; mk_wctx.waited = 1; mk_wctx.it = 1; }}\n"
        f"    __syncthreads();\n"
        f"    mk_{b.func}(tasks[i], 1, 0, smem);\n"
        f"    __syncthreads();\n  }}\n}}\n"
    )


def runtime_header() -> str:
    """The megakernel's device runtime (``codegen/mk_runtime.cuh``), read-only here."""
    try:
        import mpkir.codegen as cg

        return (Path(cg.__file__).parent / "mk_runtime.cuh").read_text()
    except (ImportError, OSError):
        return (Path(__file__).resolve().parents[2] / "codegen" / "mk_runtime.cuh").read_text()


def emit_fused(f: Fused, prefix: str = "") -> str:
    """Bodies only (no megakernel runtime): compiles with nvcc and, as plain C++, on the CPU."""
    return PRELUDE + "\n" + "\n".join(b.source for b in emit_bodies(f, prefix))


def emit_task_module(fs: list[tuple[str, Fused]]) -> tuple[str, list[Body]]:
    """One CUDA translation unit: the megakernel runtime, every body, its task adapter and mini kernel."""
    parts, bodies = [runtime_header(), PRELUDE], []
    for prefix, f in fs:
        for b in emit_bodies(f, prefix):
            if b.smem_bytes > SMEM_LIMIT:
                raise ProgramError(f"{b.func}: needs {b.smem_bytes} B of shared memory (limit {SMEM_LIMIT})")
            bodies.append(b)
            parts += [b.source, task_adapter(b), mini_kernel(b)]
    return "\n".join(parts), bodies


def cpu_harness(bodies: list[Body]) -> str:
    """``extern "C"`` entry points for the CPU executor: run every task of one body in order."""
    out = []
    for b in bodies:
        args = [
            f"({q.ctype}*)ptrs[{k}]" if q.output else f"(const {q.ctype}*)ptrs[{k}]"
            for k, q in enumerate(b.params)
        ]
        out.append(
            f'extern "C" void cpu_{b.func}(void** ptrs, char* smem) {{\n'
            f"  for (int tile = 0; tile < {b.ntasks}; ++tile)\n"
            f"    {b.func}({', '.join([*args, 'tile', 'smem'])});\n}}\n"
        )
    return "\n".join(out)


def smem_bytes(f: Fused) -> int:
    return max(b.smem_bytes for b in emit_bodies(f))


def hbm_bytes(f: Fused) -> int:
    """Compulsory HBM traffic (each top-level input read once, each output written once) for the floor."""
    dt = fused_dtypes(f)
    made, total = set(), 0
    for p in f.programs:
        for i in p.inputs:
            total += _numel(i.shape) * (4 if dt.get(i.name) == "f32" else 2) if i.name not in made else 0
        made.update(o.name for o in p.outputs)
    last = f.programs[-1]
    total += sum(_numel(o.shape) * 2 for o in last.outputs)
    return total


__all__ = [
    "PRELUDE",
    "SMEM_LIMIT",
    "THREADS",
    "Body",
    "Param",
    "cpu_harness",
    "emit_bodies",
    "emit_body",
    "emit_fused",
    "emit_task_module",
    "fused_dtypes",
    "hbm_bytes",
    "mini_kernel",
    "shapes",
    "smem_bytes",
    "task_adapter",
    "task_args",
]
