"""A found split-KV attention program run over the megakernel's PAGED KV cache (issue 5).

The search finds and proves ``attn_split_kv`` over a dense k/v of fixed length N (grid axis 0 splits the
rows, ``online_softmax`` accumulates over row tiles of T = N / grid / loop rows). The megakernel's attention
reads k/v rows through a page table up to each token's position. :func:`emit_paged_attention` emits the
program's OWN block ops (its body ops through the generic emitter, its ``online_softmax`` accumulator) with
three run-time changes, in ``mk_attention``'s task contract (``codegen/mk_tasks.cuh``):

* tile origins: split ``s`` of ``S`` covers positions ``[s·c, min(L, (s+1)·c))``, ``c = ceil(L / S)``,
  ``L = pos[b] + 1`` (0 for a padding token, ``seq_id < 0``), walked in tiles of T rows; row ``p`` is gathered
  from page ``page_table[seq, p / PG]``, slot ``p % PG``, kv head ``kvh`` (the step's own row ``p == pos`` is
  read from the fresh k/v, as ``mk_attention`` does; the cache holds the same bf16 bits);
* the tail of the last tile is masked: its scores are set to -inf before ``online_softmax`` (exp → 0), and
  only tiles holding at least one live row run, so the running max is always finite;
* the partial (m, l, o) of each split is written in ``mk_attention_merge``'s layout ``[B, Hkv, S, G, D+2]``
  (m, l, o unnormalised; an empty split writes m = -inf, l = 0), or, for ``S == 1``, ``o / l`` in bf16
  (0 when l = 0: a padding token).

Text form: ``paged(k, v)`` after ``threads(..)`` (:func:`as_paged`); ``cuda.emit_body`` of a paged program
emits this body. Semantics (:func:`run_paged`, any number domain): the masked rows are DROPPED (the finite
field and Z3 domains have no -inf). Proof (:func:`prove_paged`, run by the megakernel rewrite before use):
finite field on 15 (length, splits) instances and Z3 on one, of the same program at 2-row tiles, against
softmax attention over the first ``length`` gathered rows. ASSUMED, not proved: the page table gathers valid,
distinct pages (the interpreter's ``paged_attention`` checks it; the GPU does not) and -inf masking equals
dropping in IEEE float (exp(-inf) = +0, fmax(x, -inf) = x, every tile run holds a live row); the CPU run of
the emitted code (tests/test_superopt_paged.py) checks the masking against ``paged_attention``'s reference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mpkir.passes.superopt.cuda import (
    Body,
    Param,
    _loop,
    _online_softmax,
    _op,
    _smem_layout,
    shapes,
    shapes_of_input,
)
from mpkir.passes.superopt.program import Fused, Program, ProgramError, validate


@dataclass(frozen=True)
class Roles:
    """Which values of a split-KV program play which part."""

    split: Program
    rows: int  # T: k/v rows per loop iteration
    G: int
    D: int
    src: str  # scores fed to online_softmax [G, T]
    o: str
    lsum: str
    m: str


def split_roles(f: Fused | Program) -> Roles:
    """Check the shape of a found split-KV program (its first program) and name its parts; ``ProgramError``
    when it is not one (q replicated [G, D]; k, v [N, D] split along rows; one online_softmax over a v input
    tile; no epilogue; outputs are the accumulator's o, l, m)."""
    p = f.programs[0] if isinstance(f, Fused) else f
    validate(replace(p, paged=()))
    ins = {i.name: i for i in p.inputs}
    if set(ins) != {"q", "k", "v"} or len(p.grid) != 1:
        raise ProgramError(f"{p.name}: not a split-KV attention program ({sorted(ins)}, grid {p.grid})")
    q, k, v = ins["q"], ins["k"], ins["v"]
    if q.imap != (-1,) or q.fmap != -1 or len(q.shape) != 2:
        raise ProgramError(f"{p.name}: q must be a replicated [G, D] tile")
    for x in (k, v):
        if len(x.shape) != 2 or x.imap != (0,) or x.fmap not in (0, -1) or x.shape[1] != q.shape[1]:
            raise ProgramError(f"{p.name}: {x.name} must be [N, D] split along its rows")
    if k.fmap != v.fmap or k.shape != v.shape:
        raise ProgramError(f"{p.name}: k and v tile differently")
    if len(p.accs) != 1 or p.accs[0].kind != "online_softmax" or p.epilogue:
        raise ProgramError(f"{p.name}: expected one online_softmax accumulator and no epilogue")
    acc = p.accs[0]
    if acc.args[1].lstrip("%") != "v":
        raise ProgramError(f"{p.name}: online_softmax must consume the v tile itself")
    if any("v" in [a.lstrip("%") for a in o.args] for o in p.body):
        raise ProgramError(f"{p.name}: body ops may not read v (only the accumulator does)")
    sh = shapes(p)
    G, D = q.shape
    T = shapes_of_input(p, k)[0]
    src = acc.args[0].lstrip("%")
    if sh[src] != (G, T):
        raise ProgramError(f"{p.name}: scores {src} are {sh[src]}, expected [{G}, {T}]")
    if sorted(o.value.lstrip("%") for o in p.outputs) != sorted(acc.results):
        raise ProgramError(f"{p.name}: outputs must be the accumulator's o, l, m")
    return Roles(p, T, G, D, src, *acc.results)


def as_paged(f: Fused | Program) -> Program:
    """The found split program in its paged text form (``paged(k, v)``): what a plan carries and emits."""
    p = split_roles(f).split
    return replace(p, paged=("k", "v"))


def emit_paged_attention(f: Fused | Program, func: str) -> Body:
    """The paged task body ``func(q, k_new, v_new, k_cache, v_cache, page_table, positions, seq_ids, out, b,
    kvh, s, S, Hkv, PG, PPS, smem)`` and, in ``Body.source``, its ``mk_<func>`` adapter is NOT included (see
    :func:`adapter`)."""
    r = split_roles(f)
    p, T, G, D = r.split, r.rows, r.G, r.D
    sh = shapes(p)
    layout, total = _smem_layout(p, sh)
    bf = "const __nv_bfloat16* __restrict__"
    sig = (
        f"{bf} q, {bf} kn, {bf} vn, {bf} kc, {bf} vc, const int* __restrict__ ptab, const int* posv, "
        f"const int* seqv, void* outp, int b, int kvh, int s, int S, int Hkv, int PG, int PPS, char* smem"
    )
    L = [f"__device__ void {func}({sig}) {{"]
    L += [f"  float* {name} = (float*)(smem + {off});" for name, off in layout]
    L += [
        "  const int seq = mkso_ldi(seqv + b), pos = mkso_ldi(posv + b);",
        "  const int len = seq >= 0 ? pos + 1 : 0, chunk = (len + S - 1) / S;",
        "  const int p0 = s * chunk, p1 = len < p0 + chunk ? len : p0 + chunk;",
        f"  const int nit = p1 > p0 ? (p1 - p0 + {T - 1}) / {T} : 0;",
        f"  const size_t qo = ((size_t)b * Hkv * {G} + (size_t)kvh * {G}) * {D};",
        f"  const size_t no = ((size_t)b * Hkv + kvh) * {D};",
    ]
    L.append(_loop(G * D, "s_q[i] = mkso_ld(q + qo + i);").rstrip("\n"))
    body = [
        # gather T rows of k and v (8 elements per thread step); rows past p1 are zero (masked below)
        f"  for (int c = MKSO_TID; c < {T * D // 8}; c += MKSO_NT) {{\n"
        f"    const int e = c * 8, r = e / {D}, d = e % {D}, p = p0 + it * {T} + r;\n"
        f"    if (p < p1) {{\n"
        f"      const __nv_bfloat16 *kr, *vr;\n"
        f"      if (p == pos) {{ kr = kn + no; vr = vn + no; }} else {{\n"
        f"        const int pg = mkso_ldi(ptab + (size_t)seq * PPS + p / PG);\n"
        f"        const size_t ro = (((size_t)pg * PG + p % PG) * Hkv + kvh) * {D};\n"
        f"        kr = kc + ro; vr = vc + ro;\n      }}\n"
        f"      mkso_ld8(kr + d, s_k + e); mkso_ld8(vr + d, s_v + e);\n"
        f"    }} else {{\n"
        f"      for (int j = 0; j < 8; ++j) {{ s_k[e + j] = 0.f; s_v[e + j] = 0.f; }}\n    }}\n  }}\n"
        "  MKSO_SYNC();\n"
    ]
    body += [_op(o, sh) for o in p.body]
    body.append(_loop(G * T, f"if (p0 + it * {T} + i % {T} >= p1) s_{r.src}[i] = MKSO_NEG_INF;"))
    body.append(_online_softmax(p.accs[0], sh))
    L.append("  for (int it = 0; it < nit; ++it) {")
    L += ["  " + x for x in "".join(body).splitlines()]
    L.append("  }")
    L.append(
        _loop(
            G * D,
            f"if (nit == 0) {{ a_{r.o}[i] = 0.f; if (i < {G}) {{ a_{r.lsum}[i] = 0.f; "
            f"a_{r.m}[i] = MKSO_NEG_INF; }} }}",
        ).rstrip("\n")
    )
    L += [
        "  if (S == 1) {",
        "    __nv_bfloat16* out = (__nv_bfloat16*)outp + qo;",
        _loop(
            G * D, f"const float l = a_{r.lsum}[i / {D}]; mkso_st(out + i, l > 0.f ? a_{r.o}[i] / l : 0.f);"
        ).rstrip("\n"),
        "  } else {",
        f"    float* pp = (float*)outp + (((size_t)b * Hkv + kvh) * S + s) * {G * (D + 2)};",
        _loop(
            G * D,
            f"const int g = i / {D}, d = i % {D}; pp[g * {D + 2} + 2 + d] = a_{r.o}[i]; "
            f"if (d == 0) {{ pp[g * {D + 2}] = a_{r.m}[g]; pp[g * {D + 2} + 1] = a_{r.lsum}[g]; }}",
        ).rstrip("\n"),
        "  }",
        "}",
    ]
    params = (
        Param("q", (0,), "bf16", False),
        Param("k", (0,), "bf16", False),
        Param("v", (0,), "bf16", False),
    )
    return Body(func, p, params, 0, total, "\n".join(L) + "\n")


def adapter(func: str) -> str:
    """``mk_<func>``: the body as a megakernel task with ``mk_attention``'s pointers and arguments (p0 q,
    p1 k, p2 v, p3/p4 caches, p5 page table, p6 positions, p7 seq ids, p8 partials or out; a16 b, a17 kv head,
    a18 split, a19 splits, a20 Hkv, a21 page size, a22 pages per sequence)."""
    bf = "(const __nv_bfloat16*)"
    return (
        f"__device__ void mk_{func}(const MkTask& t, int it, int B, char* smem) {{\n"
        f"  if (!mk_block_wait(t)) return;\n"
        f"  if (t.a[16] >= B) return;\n"
        f"  {func}({bf}t.p[0], {bf}t.p[1], {bf}t.p[2], {bf}t.p[3], {bf}t.p[4], (const int*)t.p[5], "
        f"(const int*)t.p[6], (const int*)t.p[7], (void*)t.p[8], t.a[16], t.a[17], t.a[18], t.a[19], "
        f"t.a[20], t.a[21], t.a[22], smem);\n}}\n"
    )


def cpu_entry(func: str) -> str:
    """``cpu_<func>(ptrs, B, Hkv, S, PG, PPS, smem)``: every (token, kv head, split) task in order."""
    return (
        f'extern "C" void cpu_{func}(void** x, int B, int Hkv, int S, int PG, int PPS, char* smem) {{\n'
        f"  for (int b = 0; b < B; ++b) for (int h = 0; h < Hkv; ++h) for (int s = 0; s < S; ++s)\n"
        f"    {func}((const __nv_bfloat16*)x[0], (const __nv_bfloat16*)x[1], (const __nv_bfloat16*)x[2], "
        f"(const __nv_bfloat16*)x[3], (const __nv_bfloat16*)x[4], (const int*)x[5], (const int*)x[6], "
        f"(const int*)x[7], x[8], b, h, s, S, Hkv, PG, PPS, smem);\n}}\n"
    )


# ------------------------------------------------------------------ the paged semantics and its proof
def run_paged(f: Fused | Program, q, k, v, length: int, splits: int, dom):
    """The paged tiling of a split-KV program in any number domain, over k, v = the gathered rows (row p of
    the sequence at index p): split s covers rows [s·c, min(len, (s+1)·c)), c = ceil(len / splits), in tiles
    of T rows; the masked tail rows of the last tile are DROPPED (the domains have no -inf; the emitted code
    masks them to -inf, which contributes exp(-inf) = 0 to l and o and never wins the max); empty splits are
    skipped and the partials merged exactly as ``mk_attention_merge`` (m_i rescaled to the max of the live
    splits). Returns y [G, D] (zeros for length 0: a padding token)."""
    from mpkir.passes.superopt.interp import apply_op, online_softmax_step

    r = split_roles(f)
    p = r.split
    chunk = -(-length // splits) if length else 0
    parts = []
    for s in range(splits):
        p0, p1 = s * chunk, min(length, (s + 1) * chunk)
        acc: dict = {}
        for it, start in enumerate(range(p0, p1, r.rows)):
            rows = (slice(start, min(start + r.rows, p1)), slice(None))
            env = {"q": q, "k": dom.take(k, rows), "v": dom.take(v, rows)}
            for op in p.body:
                env[op.results[0]] = apply_op(
                    dom, op.kind, [env[a.lstrip("%")] for a in op.args], dict(op.attrs)
                )
            online_softmax_step(dom, acc, p.accs[0].results, env[r.src], env["v"], it == 0)
        if acc:
            parts.append((acc[r.o], acc[r.lsum], acc[r.m]))
    if not parts:
        return dom.zeros((r.G, r.D))
    M = parts[0][2]
    for _o, _l, m in parts[1:]:
        M = dom.maximum(M, m)
    num = den = None
    for o, ls, m in parts:
        w = dom.exp(dom.sub(m, M))
        num = dom.mul(o, w) if num is None else dom.add(num, dom.mul(o, w))
        den = dom.mul(ls, w) if den is None else dom.add(den, dom.mul(ls, w))
    return dom.div(num, den)


def resized(p: Program, D: int, rows: int, G: int | None = None) -> Program:
    """The same split-KV program (same ops and constants) with head dim ``D`` and ``rows``-row tiles: the
    paged proof's small instance."""
    r = split_roles(p)
    G = G or r.G
    n = rows * p.grid[0] * (p.loop if p.inputs[1].fmap >= 0 else 1)
    ins = tuple(replace(i, shape=(G, D) if i.name == "q" else (n, D)) for i in p.inputs)
    outs = tuple(replace(o, shape=(o.shape[0], G, D if o.value.lstrip("%") == r.o else 1)) for o in p.outputs)
    return replace(p, inputs=ins, outputs=outs)


def prove_paged(f: Fused | Program, scale: float, cases=None, z3_cases=None) -> dict:
    """Prove the paged tiling (:func:`run_paged`) of the found split program equal to softmax attention over
    the first ``length`` gathered rows (``targets.target`` of decode_attention with N = length), on small
    instances of the same program (2-row tiles): finite field (head dim 2, its group) on every
    (length, splits) of ``cases``, Z3 (group 1, head dim 1) on ``z3_cases``.
    ASSUMED (not proved): the page table gathers valid, distinct pages, and masking to -inf equals dropping
    (IEEE: exp(-inf) = +0, fmax(x, -inf) = x; every tile run holds a live row)."""
    from mpkir.passes.superopt.interp import run_program
    from mpkir.passes.superopt.prove import ff_equal, z3_equal
    from mpkir.passes.superopt.targets import Subgraph, inputs_of, target

    cases = cases or [(n, s) for n in (1, 2, 3, 5, 7) for s in (1, 2, 3)]
    # Z3 on length 3 over 2 splits: a full tile, a masked 1-row tail tile, the merge of two partials (longer
    # instances, e.g. (5, 2), prove too, at a larger Z3 resource count)
    z3_cases = z3_cases or [(3, 2)]
    out: dict = {
        "instance": "2-row tiles; finite field: head dim 2; Z3: group 1, head dim 1",
        "assumed": "the page table gathers valid distinct pages; -inf masking == dropping the masked rows",
        "finite_field": [],
        "z3": [],
    }

    def check(eq, p, n, s):
        G, D = split_roles(p).G, split_roles(p).D
        sg = Subgraph("decode_attention", (), (("G", G), ("D", D), ("N", n)), (("scale", scale),))
        t = target(sg)
        return eq(
            lambda ins, dom: {"y": run_paged(p, ins["q"], ins["k"], ins["v"], n, s, dom)},
            lambda ins, dom: run_program(t, ins, dom),
            lambda mk: {k: mk(sh) for k, sh in inputs_of(sg).items()},
        )

    base = split_roles(f).split
    pf, pz = resized(base, 2, 2), resized(base, 1, 2, G=1)
    for n, s in cases:
        ok, why = check(ff_equal, pf, n, s)
        out["finite_field"].append({"length": n, "splits": s, "ok": ok, "why": why})
    for n, s in z3_cases:
        status, why = check(z3_equal, pz, n, s)
        out["z3"].append({"length": n, "splits": s, "status": status, "why": why})
    out["proved"] = all(x["ok"] for x in out["finite_field"]) and all(
        x["status"] == "proved" for x in out["z3"]
    )
    return out


__all__ = [
    "Roles",
    "adapter",
    "as_paged",
    "cpu_entry",
    "emit_paged_attention",
    "prove_paged",
    "resized",
    "run_paged",
    "split_roles",
]
