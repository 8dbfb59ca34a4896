"""The megakernel's linear tile bodies (codegen/mk_tasks.cuh: ``mk_linear`` on CUDA cores, ``mk_linear_bulk``
on CUDA cores over a ring of bulk-copied weight stages, ``mk_linear_mma`` on tensor cores, plain and with the
pipelined weight stream) run on the CPU as one CTA of real threads
(mpkir.testing.cta) at shapes where each warp walks several K blocks and row blocks: the output equals the
float64 reference within bf16 rounding, and the pipelined stream gives exactly the plain body's bits."""

from __future__ import annotations

import numpy as np
import pytest

from mpkir.codegen.lower import bulk_smem
from mpkir.runtime.host import TASK_DTYPE
from mpkir.testing.cta import compile_tasks, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
NT = 128
# mk_linear_mma<U, NG, P>: P bit 1 double-buffers the weight stream, bit 2 loads before the wait
VARIANTS = ["mk_linear_mma<4,1,0>", "mk_linear_mma<4,1,2>", "mk_linear_mma<2,1,0>", "mk_linear_mma<2,1,1>",
            "mk_linear_mma<2,1,3>", "mk_linear<8,0>", "mk_linear<8,1>", "mk_linear<4,1>",
            "mk_linear_bulk<1>", "mk_linear_bulk<2>", "mk_linear_bulk<8>"]
# same U: same products in each mma, same sums; mk_linear's lanes sum the same chunks in one order for any U
SAME_BITS = [(0, 1), (2, 3), (2, 4), (5, 6), (5, 7), (8, 9), (8, 10)]
POISON = 0x7FC1  # a NaN no body writes


@pytest.fixture(scope="module")
def lib():
    return compile_tasks(VARIANTS, NT)


def bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def run_linear(lib, variant: str, x: np.ndarray, w: np.ndarray, B: int, ring: tuple[int, int] = (3, 2)
               ) -> np.ndarray:
    """out[b, n] = x[b] . w[n] through one task of ``variant`` (mode 0, no epilogue), bf16 output; ``ring``:
    mk_linear_bulk's (rows per stage, stages)."""
    K = x.shape[1]
    R = w.shape[0]
    out = np.full((x.shape[0], R), POISON, np.uint16)
    t = np.zeros(1, TASK_DTYPE)
    t["p"][0, :3] = [x.ctypes.data, w.ctypes.data, out.ctypes.data]
    t["a"][0, 0] = VARIANTS.index(variant)
    for k, v in {16: K, 17: R, 18: R, 19: K, 20: 0, 22: 0, 23: 0, 25: 0, 26: ring[0], 27: ring[1]}.items():
        t["a"][0, k] = v
    smem = 8 * (K + 32) * 2 + 2 * (NT // 32) * 128 * 4 + (NT // 32) * 8 * 4
    if variant.startswith("mk_linear_bulk"):
        smem = bulk_smem(K, R, *ring, int(variant.split("<")[1].rstrip(">")))
    lib.mk_cpu_run_tasks(t.ctypes.data, 1, 1, B, smem)
    return out


def applies(variant: str, K: int) -> bool:
    """The lowering's rule: the tensor-core body needs K a multiple of its 32*U-wide K blocks, the bulk body
    256-column segments."""
    if variant.startswith("mk_linear_bulk"):
        return K % 256 == 0
    u = int(variant.split("<")[1].split(",")[0])
    return K % (32 * u) == 0 if variant.startswith("mk_linear_mma") else K % 8 == 0


@pytest.mark.parametrize("K,R,B", [(2048, 40, 8), (1024, 96, 5), (512, 8, 3), (1024, 24, 12), (1040, 20, 2)])
def test_linear_bodies_equal_the_reference(lib, K, R, B):
    rng = np.random.default_rng()
    x = bf16(rng.normal(0, 1, (16, K)))
    w = bf16(rng.normal(0, 0.05, (R, K)))
    ref = f32(x).astype(np.float64)[:B] @ f32(w).astype(np.float64).T
    outs = {v: run_linear(lib, v, x, w, B) for v in VARIANTS if applies(v, K)}
    assert len(outs) >= 3
    for v, o in outs.items():
        assert (o[B:] == POISON).all(), f"{v} wrote rows past the batch"
        got = f32(o[:B]).astype(np.float64)
        assert np.isfinite(got).all(), f"{v} left unwritten outputs"
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2, v
    for i, j in SAME_BITS:
        if VARIANTS[i] not in outs:
            continue
        assert (outs[VARIANTS[i]] == outs[VARIANTS[j]]).all(), (VARIANTS[i], VARIANTS[j])


@pytest.mark.parametrize("ring", [(1, 2), (4, 3), (64, 2)])
def test_bulk_body_bits_do_not_depend_on_the_ring(lib, ring):
    """mk_linear_bulk: every (row, 256-column segment) partial is one warp's sum whatever the stage size, the
    ring's depth (wrapped many times here) and the token pass; 37 rows leave a short last stage."""
    rng = np.random.default_rng()
    K, R, B = 1024, 37, 11
    x = bf16(rng.normal(0, 1, (16, K)))
    w = bf16(rng.normal(0, 0.05, (R, K)))
    want = run_linear(lib, "mk_linear_bulk<8>", x, w, B)
    got = run_linear(lib, "mk_linear_bulk<2>", x, w, B, ring)
    assert (want[B:] == POISON).all() and (got[B:] == POISON).all()
    assert (got == want).all()
    ref = f32(x).astype(np.float64)[:B] @ f32(w).astype(np.float64).T
    assert np.linalg.norm(f32(got[:B]) - ref) / np.linalg.norm(ref) < 1e-2
