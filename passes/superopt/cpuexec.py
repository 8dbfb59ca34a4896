"""CPU executor of the *emitted* task bodies: the CUDA text of :mod:`cuda` compiled as plain C++ (one thread
walks every block-stride loop, ``__syncthreads`` is a no-op), driven tile by tile through the task index,
with bf16 storage exactly as on the GPU (round to nearest even).  It checks the emitter's indexing, tiling,
accumulators and dtypes without a GPU."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

from mpkir.passes.superopt.cuda import PRELUDE, cpu_harness, emit_bodies
from mpkir.passes.superopt.program import Fused


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float → bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def round_bf16(x: np.ndarray) -> np.ndarray:
    return from_bf16(to_bf16(x))


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _compile(src: str) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) for the CPU executor")
    d = os.path.join(tempfile.gettempdir(), "mpkir_superopt_cpu")
    os.makedirs(d, exist_ok=True)
    so = os.path.join(d, hashlib.sha256(src.encode()).hexdigest()[:24] + ".so")
    if not os.path.exists(so):
        fd, cpp = tempfile.mkstemp(dir=d, suffix=".cpp")
        with os.fdopen(fd, "w") as fh:
            fh.write(src)
        tmp = so + f".{os.getpid()}.tmp"
        r = subprocess.run([cxx, "-O1", "-shared", "-fPIC", "-o", tmp, cpp], capture_output=True, text=True)
        os.unlink(cpp)
        if r.returncode:
            raise RuntimeError(f"C++ compile of the emitted bodies failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, so)
    return ctypes.CDLL(so)


def run_emitted(f: Fused, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the emitted bodies of ``f`` on the CPU. ``inputs`` are float arrays (stored as bf16); returns
    every program output as float64 (outputs are poisoned with NaN before the run)."""
    bodies = emit_bodies(f)
    lib = _compile(PRELUDE + "\n".join(b.source for b in bodies) + "\n" + cpu_harness(bodies))
    env: dict[str, np.ndarray] = {}
    for k, v in inputs.items():
        env[k] = to_bf16(np.asarray(v, np.float64))
    out = {}
    for b in bodies:
        bufs = []
        for q in b.params:
            if q.output:
                a = (
                    np.full(q.shape, 0x7FC0, np.uint16)
                    if q.dtype == "bf16"
                    else np.full(q.shape, np.nan, np.float32)
                )
                env[q.name] = a
            else:
                a = env[q.name]
                if q.dtype == "f32" and a.dtype != np.float32:
                    a = env[q.name] = from_bf16(a).astype(np.float32)
                if tuple(a.shape) != tuple(q.shape):
                    raise ValueError(f"{b.func}: {q.name} has shape {a.shape}, expected {q.shape}")
            bufs.append(np.ascontiguousarray(a))
        for q, a in zip(b.params, bufs, strict=True):
            env[q.name] = a
        ptrs = (ctypes.c_void_p * len(bufs))(*[a.ctypes.data for a in bufs])
        smem = ctypes.create_string_buffer(max(16, b.smem_bytes))
        getattr(lib, f"cpu_{b.func}")(ptrs, smem)
        for q, a in zip(b.params, bufs, strict=True):
            if q.output:
                out[q.name] = from_bf16(a) if q.dtype == "bf16" else a.astype(np.float64)
    return out


def task_runner_source(bodies) -> str:
    """C++ entry points ``cpu_run_<func>(tasks, ntasks, smem)`` that walk an ``MkTask`` array exactly as the
    persistent mini kernel does (pointers ``p[0..]``, tile ``a[16]``): the task-array plumbing on the CPU."""
    out = ["struct MkTask { long long p[12]; int a[32]; };"]
    for b in bodies:
        args = [
            f"({q.ctype}*)t.p[{k}]" if q.output else f"(const {q.ctype}*)t.p[{k}]"
            for k, q in enumerate(b.params)
        ]
        out.append(
            f'extern "C" void cpu_run_{b.func}(const MkTask* tasks, int ntasks, char* smem) {{\n'
            f"  for (int i = 0; i < ntasks; ++i) {{ const MkTask& t = tasks[i];\n"
            f"    {b.func}({', '.join([*args, 't.a[16]', 'smem'])}); }}\n}}\n"
        )
    return "\n".join(out)


def load_task_runners(bodies) -> ctypes.CDLL:
    return _compile(PRELUDE + "\n".join(b.source for b in bodies) + "\n" + task_runner_source(bodies))
