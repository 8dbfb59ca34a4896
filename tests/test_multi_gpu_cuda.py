"""The CUDA collective task bodies (codegen/mk_allreduce.cuh): they compile for sm_90a with nvcc on a CPU-only
machine, use system-scope release/acquire flags and no NVLink multicast; on a GPU, the probe program runs the
allreduce body with N ranks emulated by N co-resident CTAs of ONE GPU (each with its own buffers and
counters) and matches the float32 rank-order sum."""

from __future__ import annotations

import numpy as np
import pytest

from mpkir.codegen.allreduce import BODIES, AllreduceTile, header_source, probe_source
from mpkir.testing.nvcc import NVCC, nvcc_sm90a


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_collective_bodies_compile_for_sm90a(tmp_path):
    r = nvcc_sm90a(probe_source(), tmp_path, output="probe.o")
    assert r.returncode == 0, r.stderr[-4000:]
    r = nvcc_sm90a(probe_source(), tmp_path, output="probe.ptx", ptx=True)
    assert r.returncode == 0, r.stderr[-4000:]
    ptx = (tmp_path / "probe.ptx").read_text()
    assert "ld.acquire.sys" in ptx and "red.release.sys" in ptx   # flags at system scope (peers)
    assert "multimem" not in ptx                                   # no NVLink multicast
    assert "%ctaid" not in ptx.split(".entry mk_probe_all")[1]     # task bodies never read blockIdx


def test_header_defines_every_body_and_no_block_index():
    src = "\n".join(line.split("//")[0] for line in header_source().splitlines())
    for b in BODIES:
        assert f"__device__ void {b}(const MkTask& t, int it, int B, char* smem)" in src
    assert "blockIdx" not in src


def test_tile_parameters():
    t = AllreduceTile(world=4, cols=64, row_stride=4096, event=17, triggers=3, slot_stride=8 * 4096)
    assert t.params() == {16: 64, 17: 4096, 19: 17, 20: 3, 21: 32768} and t.body == "mk_allreduce_bf16"
    with pytest.raises(ValueError, match="multiples of 8"):
        AllreduceTile(world=2, cols=60, row_stride=4096, event=1, triggers=1, slot_stride=0).params()
    with pytest.raises(ValueError, match="world size 9"):
        AllreduceTile(world=9, cols=64, row_stride=64, event=1, triggers=1, slot_stride=0).params()


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4, 8])
def test_probe_allreduce_on_one_gpu(world):
    import cupy as cp
    import ml_dtypes

    opts = ("--gpu-architecture=sm_90a", "-std=c++17")
    mod = cp.RawModule(code=probe_source(), options=opts, backend="nvrtc")
    fn = mod.get_function("mk_probe")
    rows, cols = 8, 256
    rng = np.random.default_rng(world)
    x = cp.zeros((world, 2, rows, cols), dtype=cp.uint16)
    y = cp.full((world, rows, cols), 0x7FC0, dtype=cp.uint16)             # poisoned (bf16 NaN)
    counters = cp.zeros((world, 4), dtype=cp.uint64)
    status = cp.zeros(4 + 8 * 132, dtype=cp.int32)
    # MkPeers: 8 counter pointers, then int rank, int world (72 bytes each)
    peers = np.zeros((world, 9), dtype=np.int64)
    for q in range(world):
        peers[q, :world] = [counters.data.ptr + r * 32 for r in range(world)]
        peers[q, 8] = q | (world << 32)
    peers_d = cp.asarray(peers)
    for it in (1, 2, 3):   # counters never reset: iteration it waits for it signals per rank
        parts = rng.standard_normal((world, rows, cols)).astype(ml_dtypes.bfloat16)
        src = cp.asarray(parts.view(np.uint16))
        args = (src, x, y, counters, peers_d, status, np.int32(rows), np.int32(cols), np.int32(it),
                np.int32(world))
        fn((world,), (512,), args)
        cp.cuda.Device().synchronize()
        assert int(status[0]) == 0
        acc = parts[0].astype(np.float32)
        for q in range(1, world):
            acc = acc + parts[q].astype(np.float32)
        want = acc.astype(ml_dtypes.bfloat16)
        got = cp.asnumpy(y).view(ml_dtypes.bfloat16)
        for q in range(world):
            assert np.array_equal(got[q].view(np.uint16), want.view(np.uint16)), f"rank {q} iteration {it}"
