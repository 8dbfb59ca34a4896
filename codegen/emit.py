"""Write the megakernel of a :class:`~mpkir.codegen.lower.Plan` as one self-contained CUDA C++ source.

A plan with found programs in it (:class:`~mpkir.codegen.superopt_tasks.SuperoptPlan`) also gets their bodies,
emitted by the superoptimizer's generic emitter (:mod:`mpkir.passes.superopt.cuda`), each behind a task
adapter, plus the glue bodies its rewrite uses (``mk_so_rope_table``, ``mk_so_argmax_tile``): still one
kernel, one dispatch.
"""

from __future__ import annotations

import os
from importlib import resources

from mpkir.codegen.lower import NT, Plan

_HEADERS = ("mk_runtime.cuh", "mk_tasks.cuh", "mk_sample.cuh", "mk_pages.cuh")

# Rope cos/sin tables for found head-norm+rope programs: one task per live token b. Angles exactly as
# mk_head_norm_rope computes them: f32(pos) * inv_freq[i] in f32 (inv_freq: the host's table, llama3
# scaling included), cos/sin in float64, rounded once to f32. Plain C++ too (the CPU tests run it).
# p0 positions i32 [maxB], p1 inverse frequencies f32 [D/2], p2 cos f32 [maxB,1,D], p3 sin; a16 D, a17 b.
SO_GLUE = r"""
__device__ void so_rope_table(const int* pos, const float* inv, float* cs, float* sn, int D, int b) {
#ifdef __CUDACC__
  const float p = (float)__ldcg(pos + b);
#else
  const float p = (float)pos[b];
#endif
  const int half = D / 2;
  for (int i = MKSO_TID; i < D; i += MKSO_NT) {
    const int j = i < half ? i : i - half;
#ifdef __CUDACC__
    const float ang = __fmul_rn(p, inv[j]);
    double s, c;
    sincos((double)ang, &s, &c);
#else
    const float ang = p * inv[j];
    const double s = sin((double)ang), c = cos((double)ang);
#endif
    cs[(long)b * D + i] = (float)c;
    sn[(long)b * D + i] = (float)s;
  }
}
"""

SO_GLUE_ADAPTER = r"""
__device__ void mk_so_rope_table(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  if (t.a[17] >= B) return;
  so_rope_table((const int*)t.p[0], (const float*)t.p[1], (float*)t.p[2], (float*)t.p[3], t.a[16], t.a[17]);
}
"""

# Argmax stage 1 over a tile of bf16 logits a found lm_head body wrote (the epilogue mk_linear fuses, flag 2):
# per live token b, the (max, first index) of columns [n0, n0 + R) into this tile's partials, as mk_linear
# writes them for mk_argmax_final; ties and NaN as there (strictly greater wins, equal values keep the lower
# index). Block-wide steps only: each thread's candidate, then a tree in shared memory (2 * MKSO_NT words).
# p2 logits at column n0 (row stride a18), p6 partials {float, int}[maxB]; a17 R, a23 n0 (the parameters of
# the hand-written tile it stands for).
SO_ARGMAX_SMEM = 2 * 4 * NT
SO_ARGMAX = r"""
static_assert((MKSO_NT & (MKSO_NT - 1)) == 0, "so_argmax_tile: a power-of-two CTA");
__device__ void so_argmax_tile(const __nv_bfloat16* lg, int R, int NS, int n0, float* part, int B,
                               char* smem) {
  float* sv = (float*)smem;
  int* si = (int*)(sv + MKSO_NT);
  const int me = MKSO_TID;
  for (int b = 0; b < B; ++b) {
    float best = MKSO_NEG_INF;
    int bi = 0x7fffffff;
    for (int r = me; r < R; r += MKSO_NT) {
      const float v = mkso_ld(lg + (long)b * NS + r);
      if (v > best || (v == best && r < bi)) { best = v; bi = r; }
    }
    sv[me] = best;
    si[me] = bi;
    MKSO_SYNC();
    for (int s = MKSO_NT / 2; s > 0; s >>= 1) {
      if (me < s) {
        const float v = sv[me + s];
        const int i = si[me + s];
        if (v > sv[me] || (v == sv[me] && i < si[me])) { sv[me] = v; si[me] = i; }
      }
      MKSO_SYNC();
    }
    if (me == 0) { part[2 * b] = sv[0]; ((int*)part)[2 * b + 1] = si[0] + n0; }
    MKSO_SYNC();
  }
}
"""
SO_ARGMAX_CALL = (
    "so_argmax_tile((const __nv_bfloat16*)t.p[2], t.a[17], t.a[18], t.a[23], (float*)t.p[6], B, smem)"
)
SO_ARGMAX_ADAPTER = f"""
__device__ void mk_so_argmax_tile(const MkTask& t, int it, int B, char* smem) {{
  if (!mk_block_wait(t)) return;
  {SO_ARGMAX_CALL};
}}
"""
_GLUE = {"mk_so_rope_table": SO_GLUE + SO_GLUE_ADAPTER, "mk_so_argmax_tile": SO_ARGMAX + SO_ARGMAX_ADAPTER}


def _read(name: str) -> str:
    return resources.files("mpkir.codegen").joinpath(name).read_text(encoding="utf-8")


def _strip_once(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.strip() != "#pragma once")


def so_bodies(plan: Plan) -> list:
    """The emitted :class:`~mpkir.passes.superopt.cuda.Body` of every found program the plan uses."""
    from mpkir.passes.superopt.cuda import emit_body
    from mpkir.passes.superopt.program import parse_program

    return [
        emit_body(parse_program(v.program), dict(v.dtypes), v.func, v.strided)
        for v in getattr(plan, "so_variants", ())
        if getattr(v, "form", "block") == "block"
    ]


def so_paged_sources(plan: Plan) -> list[str]:
    """Body + adapter of every found split-KV attention program the plan runs over its paged KV cache."""
    from mpkir.passes.superopt.paged import adapter, emit_paged_attention
    from mpkir.passes.superopt.program import parse_program

    return [
        emit_paged_attention(parse_program(v.program), v.func).source + adapter(v.func)
        for v in getattr(plan, "so_variants", ())
        if getattr(v, "form", "block") == "paged_attention"
    ]


def so_adapter(body) -> str:
    """A found body as a megakernel task: pointers ``t.p[0..]`` (inputs then outputs), strided outputs' row
    strides ``t.a[18..]``, tile ``t.a[16]``; a tile whose first token ``t.a[17]`` is not live this launch
    returns at once (as hand-written bodies do)."""
    from mpkir.passes.superopt.cuda import task_args

    return (
        f"__device__ void mk_{body.func}(const MkTask& t, int it, int B, char* smem) {{\n"
        f"  if (!mk_block_wait(t)) return;\n"
        f"  if (t.a[17] >= B) return;\n"
        f"  {body.func}({', '.join(task_args(body))});\n}}\n"
    )


def so_source(plan: Plan) -> str:
    """The found bodies, their adapters and the glue the plan uses ('' for a hand-written-only plan)."""
    bodies = so_bodies(plan)
    paged = so_paged_sources(plan)
    glue = [g for v, g in _GLUE.items() if v in plan.variants]
    if not bodies and not glue and not paged:
        return ""
    from mpkir.passes.superopt.cuda import PRELUDE

    out = [PRELUDE, *glue]
    for b in bodies:
        out += [b.source, so_adapter(b)]
    out += paged
    return "\n".join(out)


def emit_cuda(plan: Plan) -> str:
    """The whole program as CUDA C++: runtime, the task bodies, a dispatch over the plan's variants."""
    out = [
        f"// mpkir megakernel for model '{plan.model}': {len(plan.ops)} ops, "
        f"{plan.num_sms} workers x {NT} threads, {plan.smem_bytes} B dynamic shared memory"
        + (f", {plan.sched_warps} scheduler warps in one more CTA" if plan.sched_warps else ""),
        f"#define MK_NT {NT}",
        f"#define MK_SCHED_WARPS {plan.sched_warps}",
    ]
    if plan.numerics == "exact":  # mk_tasks.cuh's float64 accumulation (lower.NUMERICS)
        out.append("#define MK_EXACT 1")
    if os.environ.get("MPKIR_DESC_PREFETCH", "1") == "0":  # A/B switch of mk_kernel.cuh's descriptor prefetch
        out.append("#define MK_DESC_PREFETCH 0")
    for h in _HEADERS:
        out.append(f"// ---- {h}")
        out.append(_strip_once(_read(h)))
    so = so_source(plan)
    if so:
        out.append("// ---- found task bodies (superoptimizer, mpkir.passes.superopt.cuda) and their glue")
        out.append(so)
    out.append("// ---- dispatch over the task variants this program uses")
    out.append("__device__ __forceinline__ void mk_dispatch(const MkTask& t, int it, int B, char* smem) {")
    out.append("  switch (t.a[0]) {")
    for i, v in enumerate(plan.variants):
        out.append(f"    case {i}: {v}(t, it, B, smem); break;")
    out.append("    default: break;")
    out.append("  }")
    out.append("}")
    out.append("// ---- mk_kernel.cuh")
    out.append(_strip_once(_read("mk_kernel.cuh")))
    return "\n".join(out) + "\n"
