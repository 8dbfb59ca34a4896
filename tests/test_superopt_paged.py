"""The found split-KV attention program over the megakernel's paged KV cache: the EMITTED body (compiled as
C++ on the CPU) against ``paged_attention``'s float64 reference on random paged caches (issue 5)."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest

from mpkir.ops.attention import PAGED_ATTENTION
from mpkir.passes.superopt.cpuexec import _compile, compiler, from_bf16, round_bf16, to_bf16
from mpkir.passes.superopt.cuda import PRELUDE
from mpkir.passes.superopt.paged import cpu_entry, emit_paged_attention, split_roles
from mpkir.passes.superopt.program import ProgramError, parse_fused

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")


def split_program(G: int, D: int, N: int, grid: int, loop: int, scale: float) -> str:
    """The split-KV program the search finds (bench/superopt_programs.json), at other sizes."""
    return (
        f"program attn_split_kv grid({grid}) loop({loop}) {{\n"
        f"  in q: [{G}, {D}] imap(-1) fmap(-1)\n"
        f"  in k: [{N}, {D}] imap(0) fmap(0)\n"
        f"  in v: [{N}, {D}] imap(0) fmap(0)\n"
        f"  body %s = matmul_nt(q, k)\n"
        f"  body %s2 = scale(%s, c={float(scale)!r})\n"
        f"  acc %o, %l, %m = online_softmax(%s2, v)\n"
        f"  out o_part: [{grid}, {G}, {D}] = %o omap(0)\n"
        f"  out l_part: [{grid}, {G}, 1] = %l omap(0)\n"
        f"  out m_part: [{grid}, {G}, 1] = %m omap(0)\n}}\n"
    )


def found(G: int, D: int) -> str | None:
    for e in json.loads((ROOT / "bench" / "superopt_programs.json").read_text()):
        if e["kind"] == "decode_attention" and (e["dims"]["G"], e["dims"]["D"]) == (G, D):
            return e["program"]
    return None


def run_paged(text: str, q, kn, vn, kc, vc, table, pos, sid, S: int) -> np.ndarray:
    """Every (token, kv head, split) task of the emitted body, then mk_attention_merge's merge (float64)."""
    body = emit_paged_attention(parse_fused(text), "so_paged")
    lib = _compile(PRELUDE + body.source + cpu_entry("so_paged"))
    B, Hq, D = q.shape
    Hkv, G = kn.shape[1], Hq // kn.shape[1]
    bufs = [to_bf16(x) for x in (q, kn, vn, kc, vc)]
    bufs += [np.ascontiguousarray(x, np.int32) for x in (table, pos, sid)]
    out = (
        np.full((B, Hq, D), 0x7FC0, np.uint16)
        if S == 1
        else np.full((B, Hkv, S, G, D + 2), np.nan, np.float32)  # poisoned: every slot must be written
    )
    bufs.append(out)
    ptrs = (ctypes.c_void_p * len(bufs))(*[b.ctypes.data for b in bufs])
    smem = ctypes.create_string_buffer(body.smem_bytes + 16)
    lib.cpu_so_paged(ptrs, B, Hkv, S, kc.shape[1], table.shape[1], smem)
    if S == 1:
        return from_bf16(out)
    pp = out.astype(np.float64)
    assert np.isfinite(pp[..., 1:]).all(), "a split left its partial unwritten"
    m, ls, a = pp[..., 0], pp[..., 1], pp[..., 2:]  # [B,Hkv,S,G], [B,Hkv,S,G], [B,Hkv,S,G,D]
    M = m.max(axis=2, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.where(np.isneginf(m), 0.0, np.exp(m - np.where(np.isneginf(M), 0.0, M)))
    L, A = (ls * e).sum(2), (a * e[..., None]).sum(2)
    y = np.where(L[..., None] > 0, A / np.where(L > 0, L, 1.0)[..., None], 0.0)
    return y.reshape(B, Hq, D)


def case(rng, G: int, D: int, Hkv: int = 2, PG: int = 16, PPS: int = 6):
    """Two sequences on shuffled pages; three live tokens (two of sequence 0: a prefill chunk), a padding."""
    P = 2 * PPS + 3
    pages = rng.permutation(P)
    table = np.stack([pages[:PPS], pages[PPS : 2 * PPS]]).astype(np.int32)
    pos = np.array([rng.integers(40, PG * PPS - 1), 0, rng.integers(1, 30), 0], np.int32)
    pos[1] = pos[0] + 1 if pos[0] + 1 < PG * PPS else pos[0] - 1
    sid = np.array([0, 0, 1, -1], np.int32)
    B, Hq = 4, Hkv * G
    q = round_bf16(rng.standard_normal((B, Hq, D)))
    kn = round_bf16(rng.standard_normal((B, Hkv, D)))
    vn = round_bf16(rng.standard_normal((B, Hkv, D)))
    kc = round_bf16(rng.standard_normal((P, PG, Hkv, D)))
    vc = round_bf16(rng.standard_normal((P, PG, Hkv, D)))
    for b in range(B):  # the step's k/v append (the megakernel's rope / append task runs before attention)
        if sid[b] >= 0:
            kc[table[sid[b], pos[b] // PG], pos[b] % PG] = kn[b]
            vc[table[sid[b], pos[b] // PG], pos[b] % PG] = vn[b]
    return q, kn, vn, kc, vc, table, pos, sid


def reference(q, kn, vn, kc, vc, table, pos, sid, scale):
    return PAGED_ATTENTION.reference(
        [q, kn, vn, kc.copy(), vc.copy(), table, pos, sid], {"scale": scale}, None
    )[0].astype(np.float64)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "G,D,grid,loop,T,S",
    [
        (2, 128, 32, 1, 128, 16),  # the found program (qwen3-0.6b), 16 splits: most splits empty or short
        (4, 64, 32, 1, 128, 3),  # the found program (llama-3.2-1b)
        (2, 64, 8, 2, 16, 5),  # 16-row tiles: several tiles per split, tails masked
        (4, 128, 16, 2, 32, 1),  # one split: bf16 output written directly
        (2, 128, 32, 4, 4, 2),  # 4-row tiles
    ],
)
def test_emitted_paged_body_matches_paged_attention(G, D, grid, loop, T, S):
    rng = np.random.default_rng(G * 1000 + D + 7 * S + loop)
    scale = 1.0 / np.sqrt(D)
    text = found(G, D) if (grid, loop) == (32, 1) else None
    text = text or split_program(G, D, T * grid * loop, grid, loop, scale)
    args = case(rng, G, D)
    got = run_paged(text, *args, S)
    ref = reference(*args, scale)
    assert np.isfinite(got).all()
    assert np.all(got[3] == 0.0), "a padding token (seq_id < 0) must output 0"
    tol = 8e-3 if S == 1 else 1e-4
    for b in range(3):
        assert _rel(got[b], ref[b]) < tol, (b, _rel(got[b], ref[b]))
    # the check can fail: attending over one row fewer (the mask off by one) is far off
    short = reference(*args[:6], args[6] - np.array([1, 1, 1, 0], np.int32), args[7], scale)
    assert _rel(got[0], short[0]) > 10 * tol


def test_split_roles_rejects_other_programs():
    text = split_program(2, 64, 256, 4, 1, 0.125)
    assert split_roles(parse_fused(text)).rows == 64
    with pytest.raises(ProgramError):  # v used by a body op
        split_roles(
            parse_fused(
                text.replace("body %s2 = scale(%s", "body %s2 = matmul_nt(q, v)\n  body %s3 = scale(%s")
            )
        )
    with pytest.raises(ProgramError):  # q split across the grid
        split_roles(parse_fused(text.replace("in q: [2, 64] imap(-1)", "in q: [2, 64] imap(1)")))


@pytest.mark.parametrize("G,D", [(2, 128), (4, 64)])
def test_paged_tiling_of_the_found_program_is_proved(G, D):
    """Finite field + Z3: the found program's paged tiling (splits of ceil(len/S) rows, T-row tiles, masked
    tail dropped, empty splits skipped, exact merge) equals softmax attention over the first len rows."""
    from mpkir.passes.superopt.paged import prove_paged

    e = next(
        e
        for e in json.loads((ROOT / "bench" / "superopt_programs.json").read_text())
        if e["kind"] == "decode_attention" and (e["dims"]["G"], e["dims"]["D"]) == (G, D)
    )
    r = prove_paged(
        parse_fused(e["program"]),
        e["consts"]["scale"],
        cases=[(1, 3), (3, 2), (5, 2), (7, 3)],
        z3_cases=[(3, 2)],
    )
    assert r["proved"], r
    assert "valid distinct pages" in r["assumed"]


def test_paged_proof_refutes_a_mask_off_by_one():
    """The check can fail: a tiling that drops one live row (or attends one row too many) is refuted."""
    from mpkir.passes.superopt.interp import run_program
    from mpkir.passes.superopt.paged import resized, run_paged
    from mpkir.passes.superopt.prove import ff_equal
    from mpkir.passes.superopt.targets import Subgraph, inputs_of, target

    p = resized(parse_fused(split_program(2, 64, 256, 4, 1, 0.125)).programs[0], 2, 2)
    for n, wrong in ((5, 4), (5, 6)):
        sg = Subgraph("decode_attention", (), (("G", 2), ("D", 2), ("N", 6)), (("scale", 0.125),))
        t = target(Subgraph("decode_attention", (), (("G", 2), ("D", 2), ("N", n)), (("scale", 0.125),)))
        ok, why = ff_equal(
            lambda ins, dom, wrong=wrong: {"y": run_paged(p, ins["q"], ins["k"], ins["v"], wrong, 2, dom)},
            lambda ins, dom, t=t, n=n: run_program(
                t, {"q": ins["q"], "k": ins["k"][:n], "v": ins["v"][:n]}, dom
            ),
            lambda mk, sg=sg: {k: mk(sh) for k, sh in inputs_of(sg).items()},
        )
        assert not ok and "counterexample" in why


def test_paged_text_form_round_trips_and_dispatches():
    from mpkir.passes.superopt.cuda import emit_body
    from mpkir.passes.superopt.domains import Float
    from mpkir.passes.superopt.interp import run_program
    from mpkir.passes.superopt.paged import as_paged
    from mpkir.passes.superopt.program import parse_program, print_program

    dense = parse_fused(found(2, 128)).programs[0]
    p = as_paged(dense)
    text = print_program(p)
    assert "threads(512) paged(k, v) {" in text and "paged" not in print_program(dense)
    assert parse_program(text) == p and parse_program(print_program(dense)) == dense
    assert emit_body(p, func="so_t").source == emit_paged_attention(p, "so_t").source
    with pytest.raises(ProgramError, match="run_paged"):
        run_program(p, {}, Float())
    from mpkir.passes.superopt.program import validate

    with pytest.raises(ProgramError, match="only the k and v"):
        validate(parse_program(text.replace("paged(k, v)", "paged(q)")))
