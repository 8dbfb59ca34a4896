"""Run megakernel task bodies on the CPU: their CUDA text compiled as C++20, one CTA of ``nt`` real threads.

``__syncthreads`` is a barrier of the ``nt`` threads, ``atomicAdd`` an atomic read-modify-write, so races
between threads of the CTA are real; warps (shuffles, ``__syncwarp``, the tensor-core mma) are emulated for
CTAs of whole warps. ``MkTask`` has the device layout; ``mk_block_wait`` returns true (the caller runs the
tasks in an order that respects their events). :func:`compile_tasks` builds the task bodies,
:func:`compile_source` any header with its own ``extern "C"`` entry.
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
// A sense-reversing barrier that yields while it waits (far cheaper than a futex barrier for the many short
// waits of emulated warps and blocks).
struct MkBarrier {
  explicit MkBarrier(int n) : n(n) {}
  void arrive_and_wait() {
    const int s = sense.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count.store(0, std::memory_order_relaxed);
      sense.store(s ^ 1, std::memory_order_release);
    } else {
      while (sense.load(std::memory_order_acquire) == s) std::this_thread::yield();
    }
  }
  const int n;
  std::atomic<int> count{0}, sense{0};
};
static MkBarrier* mk_cta_barrier;
#define __syncthreads() mk_cta_barrier->arrive_and_wait()
template <class T> static inline T __ldcg(const T* p) {
  T r;
  std::memcpy((void*)&r, (const void*)p, sizeof(T));
  return r;
}
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

def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def compile_source(headers: list[str], nt: int, tail: str, prelude: str = "") -> ctypes.CDLL:
    """The shim (and ``prelude``), ``codegen/<header>`` for each header, then ``tail`` (C++ with
    ``extern "C"`` entries)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) for the CPU CTA")
    from mpkir import codegen

    texts = "\n".join((Path(codegen.__file__).parent / h).read_text() for h in headers)
    src = f"#define MK_NT {nt}\n{SHIM}\n{prelude}\n{texts}\n{tail}"
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


# ---------------------------------------------------------------------------------------------------------
# The megakernel's task bodies (codegen/mk_tasks.cuh, mk_sample.cuh) on the CPU: the device runtime's helpers
# (mk_runtime.cuh) replaced by plain C++, warps emulated (shuffles and __syncwarp through a per-warp barrier,
# the tensor-core mma through the warp's fragments gathered in memory), events ignored (the caller runs the
# tasks in an order that respects them).
TASK_SHIM = r"""
#define MK_CPU_EMULATION 1
#define __align__(n) alignas(n)
#include <math.h>
#include <memory>
#define MK_NWARP ((MK_NT + 31) / 32)
#define MK_TILE_B 8
struct alignas(16) uint4 { unsigned x, y, z, w; };
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
struct __nv_bfloat16 { unsigned short x; };
static inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fc0};
  return __nv_bfloat16{(unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
static inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.x << 16); }
#define __expf(x) expf(x)  // (glibc declares its own __expf)
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __fmul_rn(float a, float b) { return a * b; }
template <class T> static inline T __ldg(const T* p) { return *p; }
#define MK_NEG_INF (__int_as_float(0xff800000))

struct MkCpuCta {
  std::unique_ptr<MkBarrier> warp[MK_NWARP];
  alignas(16) unsigned char xch[MK_NT][8];
  unsigned frag[MK_NT][6];
  double red[2][MK_NT];  // mk_cpu_butterfly's exchanges (float or double values)
};
static MkCpuCta* mk_cpu_cta;
static inline void __syncwarp(unsigned = 0xffffffffu) {
  mk_cpu_cta->warp[threadIdx.x / 32]->arrive_and_wait();
}
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int off) {
  const int t = threadIdx.x;
  std::memcpy(mk_cpu_cta->xch[t], &v, sizeof(T));
  __syncwarp();
  T r;
  std::memcpy(&r, mk_cpu_cta->xch[(t & ~31) | ((t & 31) ^ off)], sizeof(T));
  __syncwarp();
  return r;
}
// A warp's xor-butterfly reduction (offsets 16, 8, .., 1: mk_warp_sum, and mkso_warp_sum / mkso_warp_max of
// the found bodies) from ONE exchange: each lane replays the butterfly on the warp's 32 values (the same
// operations in the same order, so the shuffles' result bit for bit) -- one warp barrier instead of 10. The
// exchange alternates between two buffers: a lane writes one again only after the next call's barrier, which
// every lane reaches after reading it.
static thread_local int mk_cpu_red_k;
template <class T, class F> static inline T mk_cpu_butterfly(T v, F op) {
  const int t = threadIdx.x;
  double* r = mk_cpu_cta->red[mk_cpu_red_k ^= 1];
  r[t] = v;
  __syncwarp();
  T a[32], b[32];
  for (int l = 0; l < 32; ++l) a[l] = r[(t & ~31) | l];
  for (int o = 16; o > 0; o >>= 1) {
    for (int l = 0; l < 32; ++l) b[l] = op(a[l], a[l ^ o]);
    std::memcpy(a, b, sizeof a);
  }
  return a[t & 31];
}
static inline float mk_cpu_warp_sum(float v) {
  return mk_cpu_butterfly(v, [](float x, float y) { return x + y; });
}
static inline float mk_cpu_warp_max(float v) {
  return mk_cpu_butterfly(v, [](float x, float y) { return fmaxf(x, y); });
}
// mma.sync.m16n8k16.row.col f32 += bf16 x bf16 of the warp: a0 (row g, k 2q..2q+1), a1 (row g+8), a2 (row g,
// k 2q+8..), a3 (row g+8, k 2q+8..); b0 (k 2q..2q+1, col g), b1 (k 2q+8..); c0,c1 (row g, cols 2q, 2q+1),
// c2,c3 (row g+8); g = lane / 4, q = lane % 4. The 16 products are summed in float64, then added in float32.
static inline void mk_mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                               unsigned b1) {
  const int t = threadIdx.x, w0 = t & ~31;
  unsigned* f = mk_cpu_cta->frag[t];
  f[0] = a0; f[1] = a1; f[2] = a2; f[3] = a3; f[4] = b0; f[5] = b1;
  __syncwarp();
  float A[16][16], Bm[16][8];
  for (int l = 0; l < 32; ++l) {
    const unsigned* h = mk_cpu_cta->frag[w0 + l];
    const int g = l / 4, q = l % 4;
    for (int e = 0; e < 2; ++e) {
      const int sh = 16 * e;
      A[g][2 * q + e] = __uint_as_float(((h[0] >> sh) & 0xffffu) << 16);
      A[g + 8][2 * q + e] = __uint_as_float(((h[1] >> sh) & 0xffffu) << 16);
      A[g][2 * q + 8 + e] = __uint_as_float(((h[2] >> sh) & 0xffffu) << 16);
      A[g + 8][2 * q + 8 + e] = __uint_as_float(((h[3] >> sh) & 0xffffu) << 16);
      Bm[2 * q + e][g] = __uint_as_float(((h[4] >> sh) & 0xffffu) << 16);
      Bm[2 * q + 8 + e][g] = __uint_as_float(((h[5] >> sh) & 0xffffu) << 16);
    }
  }
  __syncwarp();
  const int l = t & 31, g = l / 4, q = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * q + (e & 1);
    double s = 0.0;
    for (int k = 0; k < 16; ++k) s += (double)A[row][k] * (double)Bm[k][col];
    c[e] += (float)s;
  }
}

// mk_runtime.cuh's helpers
static inline void mk_prefetch_l2(const void*, unsigned) {}
static inline uint4 mk_ld_weight(const void* p) { uint4 r; std::memcpy(&r, p, 16); return r; }
static inline uint4 mk_ld_act16(const void* p) { uint4 r; std::memcpy(&r, p, 16); return r; }
static inline float mk_ld_bf16(const __nv_bfloat16* p) { return __bfloat162float(*p); }
static inline int mk_ld_i32(const int* p) { return *p; }
static inline float mk_bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
static inline void mk_unpack8(uint4 v, float* f) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
static inline void mk_unpack8(uint4 v, double* d) {
  float f[8];
  mk_unpack8(v, f);
  for (int i = 0; i < 8; ++i) d[i] = f[i];
}
static inline float mk_warp_sum(float v) { return mk_cpu_warp_sum(v); }
static inline double mk_warp_sum(double v) {
  return mk_cpu_butterfly(v, [](double x, double y) { return x + y; });
}
// bulk copies into shared memory: the issuing thread copies at once and completes the barrier's phase (the
// barrier word counts completed phases; a wait for parity p returns once phase p is complete)
static inline void mk_mbar_init(unsigned long long* bar) {
  std::atomic_ref<unsigned long long>(*bar).store(0);
}
static inline void mk_mbar_inval(unsigned long long*) {}
static inline void mk_bulk_fence() {}
static inline void mk_bulk_load(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
  std::memcpy(dst, src, bytes);
  std::atomic_ref<unsigned long long>(*bar).fetch_add(1, std::memory_order_release);
}
static inline void mk_mbar_wait(unsigned long long* bar, unsigned parity) {
  while ((std::atomic_ref<unsigned long long>(*bar).load(std::memory_order_acquire) & 1u) == parity)
    std::this_thread::yield();
}

static inline float mk_af(const MkTask& t, int i) { return __int_as_float(t.a[i]); }
"""

RUN_TASKS = r"""
extern "C" void mk_cpu_run_tasks(const MkTask* tasks, int n, int it, int B, int smem_bytes) {
  std::vector<char> buf((size_t)smem_bytes + 64);
  char* smem = (char*)(((uintptr_t)buf.data() + 15) & ~(uintptr_t)15);
  MkCpuCta cta;
  for (int w = 0; w < MK_NWARP; ++w) cta.warp[w] = std::make_unique<MkBarrier>(MK_NT < 32 ? MK_NT : 32);
  mk_cpu_cta = &cta;
  MkBarrier bar(MK_NT);
  mk_cta_barrier = &bar;
  std::vector<std::thread> threads;
  for (int i = 0; i < MK_NT; ++i)
    threads.emplace_back([&, i] {
      threadIdx.x = i;
      for (int k = 0; k < n; ++k) {
        mk_cpu_dispatch(tasks[k], it, B, smem);
        bar.arrive_and_wait();
      }
    });
  for (auto& th : threads) th.join();
}
"""


def compile_tasks(variants, nt: int = 512, extra: str = "", exact: bool = False) -> ctypes.CDLL:
    """The task bodies of ``codegen/mk_tasks.cuh`` and ``mk_sample.cuh`` for the plan's ``variants`` (in
    ``Plan.variants`` order: ``a[0]`` indexes them), run by ``mk_cpu_run_tasks(tasks, n, it, B, smem)``: the
    ``n`` tasks one after the other, each by one emulated CTA of ``nt`` threads: whole warps, or fewer than
    32 threads for bodies without warp operations (``mk_sample``).
    ``extra``: more bodies (the found programs of ``codegen.emit.so_source``); ``exact``: the float64
    accumulation of an exact plan (``MK_EXACT``)."""
    if nt % 32 and nt > 32:
        raise ValueError(f"a CTA of {nt} threads is neither whole warps nor part of one")
    cases = "\n".join(f"    case {i}: {v}(t, it, B, smem); break;" for i, v in enumerate(variants))
    dispatch = ("static void mk_cpu_dispatch(const MkTask& t, int it, int B, char* smem) {\n"
                f"  switch (t.a[0]) {{\n{cases}\n    default: break;\n  }}\n}}\n")
    lib = compile_source(["mk_tasks.cuh", "mk_sample.cuh"], nt, extra + "\n" + dispatch + RUN_TASKS,
                         prelude=("#define MK_EXACT 1\n" if exact else "") + TASK_SHIM)
    lib.mk_cpu_run_tasks.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib
