"""CUDA codegen (no GPU needed): lowering invariants, and every example's kernel compiles with nvcc for
sm_90a (``nvcc -gencode arch=compute_90a,code=sm_90a -c``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mpkir.codegen.emit import emit_cuda
from mpkir.codegen.lower import lower
from mpkir.diagnostics import MpkError
from mpkir.parser import parse_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = ["smollm2_135m", "qwen3_0_6b", "llama3_2_1b", "qwen3_1_7b", "qwen3_8b"]
NVCC = shutil.which("nvcc")


def _plan(name: str, batch=None):
    m, _ = parse_file(str(EXAMPLES / f"{name}.mpk"))
    return lower(m, greedy=True, batch=batch)


@pytest.mark.parametrize("name", ["smollm2_135m", "qwen3_0_6b", "llama3_2_1b"])
@pytest.mark.parametrize("batch", [1, 3])
def test_plan_invariants(name, batch):
    p = _plan(name, batch)
    assert p.batch == batch
    seen = set()
    for lst in p.lists:  # every AOT task exactly once; JIT slots name ops
        for t in lst:
            if t >= 0:
                assert t not in seen
                seen.add(t)
    jit_tasks = sum(len(o.tasks) for o in p.ops if o.jit)
    assert len(seen) + jit_tasks == p.num_tasks
    op_of = {}
    for i, o in enumerate(p.ops):
        for j in range(len(o.tasks)):
            op_of[o.first_task + j] = i
        for d, lag in o.deps:  # same-step waits only on earlier ops (topological: no deadlock)
            assert lag == 1 or d < i
    for lst in p.lists:  # each SM's list is in op order
        ops = [op_of[t] if t >= 0 else -t - 1 for t in lst]
        assert ops == sorted(ops)
    emb = next(o for o in p.ops if o.kind == "embedding")
    assert any(lag == 1 for _, lag in emb.deps)  # next step's embedding waits for this step's token
    # per-token tasks exist only for live tokens
    assert all(t.a[17] < batch for t in emb.tasks)
    assert p.smem_bytes <= 227 * 1024


def test_kernel_source_independent_of_batch_within_a_kernel_family():
    assert emit_cuda(_plan("qwen3_0_6b", 3)) == emit_cuda(_plan("qwen3_0_6b", 8))


def test_unsupported_is_a_diagnostic():
    m, _ = parse_file(str(EXAMPLES / "rmsnorm_linear.mpk"))
    with pytest.raises(MpkError):
        lower(m, greedy=True)


def test_sample_needs_greedy():
    m, _ = parse_file(str(EXAMPLES / "llama3_2_1b.mpk"))
    with pytest.raises(MpkError, match="sampling"):
        lower(m)


def _nvcc(src: str, tmp_path: Path) -> None:
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    r = subprocess.run(
        [
            NVCC,
            "-gencode",
            "arch=compute_90a,code=sm_90a",
            "-std=c++17",
            "-c",
            str(cu),
            "-o",
            str(tmp_path / "k.o"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("name", MODELS)
def test_example_kernel_compiles(name, tmp_path):
    # batch 8 uses the tensor-core GEMV; batch 1 the CUDA-core one (compiled for two models: same bodies)
    for batch in (1, 8) if name in ("smollm2_135m", "llama3_2_1b") else (8,):
        _nvcc(emit_cuda(_plan(name, batch)), tmp_path)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_small_example_kernel_compiles(tmp_path):
    _nvcc(emit_cuda(_plan("mlp")), tmp_path)
