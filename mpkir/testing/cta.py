"""Run a megakernel task body on the CPU: its CUDA text compiled as C++20, one CTA of ``nt`` real threads.

For bodies written with block-wide steps only (``threadIdx.x``, ``__syncthreads``, shared-memory atomics,
``__ldcg``, bit casts, double ``exp``/``log``; no warp intrinsics): ``__syncthreads`` is a ``std::barrier``
of the ``nt`` threads, ``atomicAdd`` an atomic read-modify-write, so races between threads of the CTA are
real. ``MkTask`` has the device layout; ``mk_block_wait`` returns true (the test has no events).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SHIM = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#define __device__
#define __forceinline__ inline
#define __noinline__
using std::max;
using std::min;
struct MkThreadIdx { int x; };
static thread_local MkThreadIdx threadIdx;
static std::barrier<>* mk_cta_barrier;
#define __syncthreads() mk_cta_barrier->arrive_and_wait()
template <class T> static inline T __ldcg(const T* p) { return *(const volatile T*)p; }
static inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
struct alignas(16) MkTask { long long p[12]; int a[32]; };
static inline bool mk_block_wait(const MkTask&) { return true; }
"""

RUN = r"""
extern "C" void mk_cta_run(const MkTask* t, int it, int B) {
  std::vector<char> smem(1 << 20);
  std::barrier<> bar(MK_NT);
  mk_cta_barrier = &bar;
  std::vector<std::thread> threads;
  for (int i = 0; i < MK_NT; ++i)
    threads.emplace_back([&, i] { threadIdx.x = i; BODY(*t, it, B, smem.data()); });
  for (auto& th : threads) th.join();
}
"""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


class TaskStruct(ctypes.Structure):
    """``MkTask``: 12 pointers, 32 ints (224 bytes, 16-byte aligned on the device)."""

    _fields_ = [("p", ctypes.c_longlong * 12), ("a", ctypes.c_int * 32)]


def compile_body(header: str, body: str, nt: int) -> ctypes.CDLL:
    """``codegen/<header>`` with the shim, ``body`` run by ``mk_cta_run(task*, it, B)`` on ``nt`` threads."""
    lib = compile_source([header], nt, f"#define BODY {body}\n{RUN}")
    lib.mk_cta_run.argtypes = [ctypes.POINTER(TaskStruct), ctypes.c_int, ctypes.c_int]
    return lib


def compile_source(headers: list[str], nt: int, tail: str) -> ctypes.CDLL:
    """The shim, ``codegen/<header>`` for each header, then ``tail`` (C++ with ``extern "C"`` entries)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) for the CPU CTA")
    from mpkir import codegen

    texts = "\n".join((Path(codegen.__file__).parent / h).read_text() for h in headers)
    src = f"#define MK_NT {nt}\n{SHIM}\n{texts}\n{tail}"
    d = Path(tempfile.gettempdir()) / "mpkir_cta"
    d.mkdir(exist_ok=True)
    so = d / (hashlib.sha256(src.encode()).hexdigest()[:24] + ".so")
    if not so.exists():
        cpp = d / f"{so.stem}.{os.getpid()}.cpp"
        cpp.write_text(src)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(tmp), str(cpp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        cpp.unlink()
        if r.returncode:
            raise RuntimeError(f"C++ compile of {', '.join(headers)} failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, so)
    return ctypes.CDLL(str(so))
