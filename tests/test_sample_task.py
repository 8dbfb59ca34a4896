"""The megakernel's ``mk_sample`` task body (codegen/mk_sample.cuh) run on the CPU as one CTA of real
threads (mpkir.testing.cta): every row's token equals the ``sample`` operator's reference
(mpkir.ops.sampling)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpkir.codegen.lower import SAMPLE_SMEM, dbits, halves64
from mpkir.ops.sampling import sample_ref
from mpkir.runtime.host import TASK_DTYPE
from mpkir.testing.cta import compile_tasks, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")


def _lib(nt: int):
    return compile_tasks(["mk_sample"], nt)


def run_sample(lib, logits, positions, temperature, top_k, top_p, seed, f32, it=1, B=None):
    """Every row through the body; returns (tokens, history row of step ``it``)."""
    rows, V = logits.shape
    maxB = rows
    B = rows if B is None else B
    if f32:
        buf = np.ascontiguousarray(logits, np.float32)
    else:
        u = np.ascontiguousarray(logits, np.float32).view(np.uint32).astype(np.uint64)
        buf = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)   # bf16, round to nearest even
    pos = np.ascontiguousarray(positions, np.int32)
    out = np.full(maxB, -7, np.int32)
    hist = np.full((it, maxB), -7, np.int32)
    for b in range(rows):
        t = np.zeros(1, TASK_DTYPE)   # variant 0: mk_sample
        t["p"][0, :4] = [a.ctypes.data for a in (buf, out, hist, pos)]
        vals = {16: V, 17: b, 18: maxB, 19: int(f32), 20: V, 23: top_k}
        vals[21], vals[22] = halves64(dbits(temperature))
        vals[24], vals[25] = halves64(dbits(top_p))
        vals[26], vals[27] = halves64(seed)
        for k, v in vals.items():
            t["a"][0, k] = v
        lib.mk_cpu_run_tasks(t.ctypes.data, 1, it, B, SAMPLE_SMEM)
    stored = buf.astype(np.float32) if f32 else (buf.astype(np.uint32) << 16).view(np.float32)
    return out, hist[it - 1], stored


@pytest.mark.parametrize("nt", [1 << 1, 1 << 3])
@pytest.mark.parametrize("f32", [True, False], ids=["f32", "bf16"])
@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 1.0), (0.8, 20, 0.95), (1.3, 0, 0.9), (0.5, 1, 1.0),
    (2.0, 0, 0.3), (0.9, 4000, 0.999)])
def test_sample_body_equals_the_operator(nt, f32, temperature, top_k, top_p):
    rng = np.random.default_rng()
    rows, V = 6, 4099
    logits = rng.normal(0, 3, (rows, V)).astype(np.float32)
    logits[1] = np.round(logits[1])            # many ties: top-k / top-p boundaries fall inside tie groups
    logits[2, :] = 0.25                        # all equal
    logits[3, rng.integers(0, V, 50)] = logits[3].max()   # a tie for the maximum
    positions = rng.integers(-5, 5000, rows)
    seed = int(rng.integers(-(2**63), 2**63))
    out, hist, stored = run_sample(_lib(nt), logits, positions, temperature, top_k, top_p, seed, f32, it=3)
    want = sample_ref(stored, positions, temperature, top_k, top_p, seed)
    assert out.tolist() == want.tolist()
    assert hist.tolist() == want.tolist()


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_sample_body_random_cases(data):
    """Random vocabularies, value grids (ties), temperatures, top-k/top-p, seeds; rows past B untouched."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="rng"))
    V = data.draw(st.integers(1, 700), label="V")
    rows = data.draw(st.integers(1, 4), label="rows")
    grid = data.draw(st.sampled_from([0, 1, 8]), label="grid")   # 0: continuous values
    x = rng.normal(0, data.draw(st.sampled_from([0.1, 2.0, 30.0])), (rows, V))
    logits = (np.round(x * grid) / grid if grid else x).astype(np.float32)
    temperature = data.draw(st.sampled_from([0.0, 0.05, 0.6, 1.0, 4.0]), label="temperature")
    top_k = data.draw(st.integers(0, V + 2), label="top_k")
    top_p = data.draw(st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.05]), label="top_p")
    seed = data.draw(st.integers(-(2**63), 2**64 - 1), label="seed")
    positions = rng.integers(0, 2**31 - 1, rows)
    f32 = data.draw(st.booleans(), label="f32")
    B = data.draw(st.integers(1, rows), label="B")
    out, hist, stored = run_sample(_lib(4), logits, positions, temperature, top_k, top_p, seed, f32, B=B)
    want = sample_ref(stored[:B], positions[:B], temperature, top_k, top_p, seed)
    assert out[:B].tolist() == want.tolist() and hist[:B].tolist() == want.tolist()
    assert (out[B:] == -7).all() and (hist[B:] == -7).all()
