"""Found block programs as megakernel task bodies (issue 5).

* Semantics: the emitted CUDA text itself, compiled as C++ and run task by task on the CPU (bf16 storage as
  on the GPU, outputs poisoned), matches the float64 reference of the subgraph on fresh random inputs, for
  every program the search finds at small sizes and for other legal grids/loops/layouts of them.
* Compilation: every program found at the examples' real sizes (bench/superopt_programs.json, written by
  the search) emits a body + MkTask adapter + persistent mini kernel that nvcc compiles for sm_90a, within
  the task contract (no blockIdx in bodies, dynamic shared memory within the megakernel's budget).
* The device benchmark's pieces (task array layout, dry run) work without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpkir.passes.superopt import interp
from mpkir.passes.superopt import search as S
from mpkir.passes.superopt.cpuexec import compiler, round_bf16, run_emitted
from mpkir.passes.superopt.cuda import SMEM_LIMIT, emit_bodies, emit_task_module
from mpkir.passes.superopt.domains import Float
from mpkir.passes.superopt.program import parse_fused, print_fused
from mpkir.passes.superopt.targets import Subgraph, inputs_of, target
from mpkir.testing.nvcc import NVCC, nvcc_sm90a

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "bench" / "superopt_programs.json"
needs_cxx = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")

NORM = Subgraph("norm_linear", (), (("M", 3), ("K", 64), ("N", 48)), (("eps", 1e-5),))
ACT = Subgraph("act_down", (), (("M", 3), ("F", 64), ("H", 32)))
ROPE = Subgraph("headnorm_rope", (), (("T", 3), ("Hh", 4), ("D", 16)), (("eps", 1e-6),))
ATTN = Subgraph("decode_attention", (), (("G", 2), ("D", 16), ("N", 128)), (("scale", 0.25),))


@functools.cache
def _found(sg: Subgraph):
    return S.search(sg, budget_s=30)


@functools.cache
def _structure(kind: str):
    """(body, accs, epilogue, output) of the program the search found (reused at other grids/loops)."""
    p = _found(NORM if kind == "norm_linear" else ACT).program.programs[0]
    return p.body, p.accs, p.epilogue, p.outputs[0].value


def _inputs(sg, seed):
    rng = np.random.default_rng(seed)
    return {n: round_bf16(rng.standard_normal(s)) for n, s in inputs_of(sg).items()}


def _check_emitted(sg, f, seed):
    ins = _inputs(sg, seed)
    got = run_emitted(f, ins)["y"]
    ref = interp.run_program(target(sg), ins, Float())["y"]
    assert np.all(np.isfinite(got)), "poisoned output left unwritten"
    err = np.linalg.norm(got.reshape(ref.shape) - ref) / np.linalg.norm(ref)
    assert err < 1e-2, f"{print_fused(f)}\nrel err {err}"
    return err


@needs_cxx
@pytest.mark.parametrize("sg", [NORM, ACT, ROPE, ATTN], ids=lambda s: s.kind)
def test_found_program_body_matches_float64(sg):
    r = _found(sg)
    assert r.proof["proved"]
    _check_emitted(sg, r.program, seed=int(np.random.SeedSequence().entropy % 2**32))


@needs_cxx
@settings(max_examples=6 if settings.default.max_examples <= 60 else 60)  # a C++ build each
@given(
    st.sampled_from(["norm_linear", "act_down"]),
    st.sampled_from([1, 2, 4, 8]),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 2**32 - 1),
)
def test_any_grid_and_loop_of_a_found_structure(kind, grid, loop, seed):
    sg = NORM if kind == "norm_linear" else ACT
    _check_emitted(sg, S._concretize(sg, _structure(kind), grid, loop), seed)


@needs_cxx
@pytest.mark.parametrize("layout", ["token_head", "token", "head"])
def test_headnorm_rope_layouts(layout):
    _check_emitted(ROPE, S.headnorm_rope_program(ROPE, layout), seed=11)


@needs_cxx
@pytest.mark.parametrize("splits,loop", [(1, 4), (4, 2), (8, 1), (2, 8)])
def test_split_kv_attention_layouts(splits, loop):
    # large logits make the online-softmax rescale matter (a wrong max handling would overflow or drift)
    sg = Subgraph("decode_attention", (), (("G", 3), ("D", 16), ("N", 128)), (("scale", 2.0),))
    _check_emitted(sg, S.attention_program(sg, splits, loop), seed=splits * 10 + loop)


@needs_cxx
def test_cpu_executor_catches_a_wrong_body():
    # the harness can fail: the merge without the exp(m_i - m) rescale is far off
    sg = Subgraph("decode_attention", (), (("G", 2), ("D", 16), ("N", 128)), (("scale", 2.0),))
    ins = _inputs(sg, 3)
    got = run_emitted(S.attention_program(sg, 4, 2, rescale=False), ins)["y"]
    ref = interp.run_program(target(sg), ins, Float())["y"]
    assert np.linalg.norm(got.reshape(ref.shape) - ref) / np.linalg.norm(ref) > 0.05


def _entries():
    return json.loads(PROGRAMS.read_text())


def test_exported_programs_are_current_and_cover_the_four_kinds():
    es = _entries()
    assert {e["kind"] for e in es} == {"norm_linear", "act_down", "headnorm_rope", "decode_attention"}
    for e in es:
        assert e["version"] == S.VERSION, (
            "stale bench/superopt_programs.json: rerun superopt_bench.py --export"
        )
        assert e["proof"]["finite_field"] and e["proof"]["z3"] == "proved"
        assert isinstance(e["applied"], bool) and e["decision"]
        f = parse_fused(e["program"])
        for b in emit_bodies(f):
            assert b.smem_bytes <= SMEM_LIMIT, (e["kind"], e["dims"], b.smem_bytes)
            assert "blockIdx" not in b.source and "__shared__" not in b.source


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_real_size_programs_compile_as_megakernel_tasks(tmp_path):
    fs = [(f"e{i}_", parse_fused(e["program"])) for i, e in enumerate(_entries())]
    src, bodies = emit_task_module(fs)
    assert len(bodies) == sum(len(f.programs) for _, f in fs)
    assert len(re.findall(r"__device__ void mk_so_", src)) == len(bodies)
    r = nvcc_sm90a(src, tmp_path, output="so.o", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _bench():
    spec = importlib.util.spec_from_file_location("superopt_bench", ROOT / "bench" / "superopt_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_task_array_layout():
    bench = _bench()
    f = S.attention_program(ATTN, 4, 2)
    b = emit_bodies(f)[0]
    t = bench._task_array(b, [11, 22, 33, 44, 55, 66])
    assert t.itemsize == 224 and len(t) == b.ntasks == 4
    raw = t.view(np.uint8).reshape(4, 224)
    assert raw[2, :8].view(np.int64)[0] == 11 and raw[2, 40:48].view(np.int64)[0] == 66
    assert raw[2, 96 + 16 * 4 : 96 + 17 * 4].view(np.int32)[0] == 2  # a[16] = tile index


@needs_cxx
def test_bench_dry_run_small_entries(tmp_path):
    bench = _bench()
    out = tmp_path / "dry.json"
    rc = bench.main(
        ["--dry-run", "--only", "headnorm_rope,decode_attention", "--out", str(out), "--cpu-macs", "2e6"]
    )
    res = json.loads(out.read_text())
    assert rc == 0 and res["dry_run"] and res["rows"]
    for row in res["rows"]:
        assert row["nvcc"] or NVCC is None
        assert row.get("cpu_rel_err", 0.0) < 1e-2


class _Arr(np.ndarray):
    """A host array posing as a CuPy device array (``.data.ptr`` is its address)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _fake_cupy(bodies):
    """Just enough of CuPy for the bench's device path: 'kernels' run the emitted task bodies on the CPU
    through the same MkTask arrays (unfused kernels are no-ops: their outputs stay poisoned)."""
    from mpkir.passes.superopt.cpuexec import load_task_runners

    lib = load_task_runners(bodies)
    smem = {b.func: ctypes.create_string_buffer(max(16, b.smem_bytes)) for b in bodies}

    class _Kernel:
        def __init__(self, name):
            self.name, self.max_dynamic_shared_size_bytes = name, 0

        def __call__(self, grid, block, args, shared_mem=0):
            if self.name.startswith("run_"):
                func = self.name[4:]
                assert block == (512,) and shared_mem >= smem[func]._length_ - 16 and grid[0] >= 1
                tasks, n = args
                getattr(lib, f"cpu_run_{func}")(
                    ctypes.c_void_p(tasks.data.ptr), ctypes.c_int(int(n)), smem[func]
                )

    class _Module:
        def __init__(self, code, options, backend):
            assert "sm_90a" in " ".join(options) and backend == "nvrtc"

        def get_function(self, name):
            return _Kernel(name)

    class _Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    device = types.SimpleNamespace(id=0, synchronize=lambda: None)
    cuda = types.SimpleNamespace(
        Device=lambda *a: device,
        Event=_Event,
        get_elapsed_time=lambda a, b: 0.001,
        runtime=types.SimpleNamespace(
            getDeviceProperties=lambda i: {"multiProcessorCount": 4, "name": b"cpu"}
        ),
    )
    return types.SimpleNamespace(
        cuda=cuda,
        RawModule=_Module,
        asarray=lambda x: np.ascontiguousarray(x).view(_Arr),
        asnumpy=lambda x: np.array(x),
        full=lambda shape, v, dtype: np.full(shape, v, dtype).view(_Arr),
        empty=lambda shape, dtype: np.empty(shape, dtype).view(_Arr),
        uint16=np.uint16,
        uint8=np.uint8,
        float32=np.float32,
        nan=np.nan,
    )


@needs_cxx
def test_bench_device_path_on_a_fake_gpu(tmp_path, monkeypatch):
    bench = _bench()
    entries = [e for e in _entries() if bench._macs(e) <= 5e7]  # every kind, the lm_heads left out
    assert {e["kind"] for e in entries} == {"norm_linear", "act_down", "headnorm_rope", "decode_attention"}
    progs = tmp_path / "programs.json"
    progs.write_text(json.dumps(entries))
    _src, per = bench.build_source(entries)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy([b for bs in per for b in bs]))
    monkeypatch.setattr(bench._Gpu, "__init__", _small_flush(bench._Gpu.__init__))
    out = tmp_path / "gpu.json"
    rc = bench.main(["--out", str(out), "--programs", str(progs), "--reps", "2"])
    res = json.loads(out.read_text())
    assert len(res["rows"]) == len(entries)
    for row in res["rows"]:
        assert "error" not in row, row
        assert row["ok"] and row["rel_err"] < 1e-2 and row["floor_us"] > 0
        assert row["unfused_rel_err"] == float("inf")  # the no-op unfused kernels left their NaN poison
    assert rc == 0


def _small_flush(init):
    def wrapped(self, cp):
        init(self, cp)
        self.flush = cp.empty(1 << 20, cp.uint8)

    return wrapped
