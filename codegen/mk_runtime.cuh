// mpkir megakernel: device runtime (worker loop, event counters, watchdog, trace).
// Inlined into the generated .cu by mpkir.codegen; the generated part defines MK_NT and mk_dispatch().
#pragma once
#include <cuda_bf16.h>
#define MK_NEG_INF (__int_as_float(0xff800000))

#ifndef MK_NT
#define MK_NT 512
#endif
#define MK_NWARP (MK_NT / 32)
#define MK_TILE_B 8          // tokens per GEMV pass (batch > 8 loops over token groups)

// One task: pre-offset pointers + integer parameters (floats stored as their bits). 224 bytes.
struct __align__(16) MkTask {
  long long p[12];  // p[11]: weight prefetch address (0: none)
  int a[32];        // a[0] variant, a[1] signal event, a[2] #waits, a[3] wait-lag bits,
                    // a[4..7] wait events, a[8..11] triggers per iteration, a[12] prefetch bytes,
                    // a[13] prefetch bytes of the next task on this SM (0: none), a[16..31] body params
};

// status[0]: error code (0 ok, 1 watchdog timeout), status[1]: abort flag, status[2]: first SM that timed out
// dump[sm*8 + ...]: task, event, iteration, target (lo), value (lo), steps done, 0, valid
#define MK_DUMP 8

__device__ __forceinline__ unsigned long long mk_ld_acquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void mk_red_release(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long mk_ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void mk_red_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void mk_st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long mk_globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Weights are static for the whole launch: stream them into L2 before the task's inputs are ready.
__device__ __forceinline__ void mk_prefetch_l2(const void* p, unsigned bytes) {
  const char* c = (const char*)p;
  while (bytes >= 16) {
    unsigned n = bytes > 65536u ? 65536u : (bytes & ~15u);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(c), "r"(n) : "memory");
    c += n;
    bytes -= n;
  }
}
// Bulk copies of static data (weights) into shared memory, completed on an mbarrier (Hopper's copy engine:
// many bytes in flight per SM without registers). A barrier is initialised for one arrival per phase; the
// issuing thread arrives with the phase's byte count, the copy completes the transaction, waiters poll the
// phase parity. mk_bulk_fence orders this CTA's earlier generic-proxy shared-memory accesses before the copies.
__device__ __forceinline__ unsigned mk_smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mk_mbar_init(unsigned long long* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(mk_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mk_mbar_inval(unsigned long long* bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(mk_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mk_bulk_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n\tfence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void mk_bulk_load(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(mk_smem_addr(bar)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(mk_smem_addr(dst)), "l"(src), "r"(bytes), "r"(mk_smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mk_mbar_wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                 "selp.u32 %0, 1, 0, p;\n\t}" : "=r"(done) : "r"(mk_smem_addr(bar)), "r"(parity) : "memory");
}
// 16-byte streaming load of static data (weights): read-only path, no L1 allocation.
__device__ __forceinline__ uint4 mk_ld_weight(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
// Activations are written by other SMs during the launch: read them at L2 (never a stale L1 line).
__device__ __forceinline__ uint4 mk_ld_act16(const void* p) { return __ldcg((const uint4*)p); }
__device__ __forceinline__ float mk_ld_bf16(const __nv_bfloat16* p) {
  unsigned short u = __ldcg((const unsigned short*)p);
  return __uint_as_float(((unsigned)u) << 16);
}
__device__ __forceinline__ int mk_ld_i32(const int* p) { return __ldcg(p); }
__device__ __forceinline__ float mk_bf16_round(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}
__device__ __forceinline__ void mk_unpack8(uint4 v, float* f) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void mk_unpack8(uint4 v, double* d) {
  float f[8];
  mk_unpack8(v, f);
#pragma unroll
  for (int i = 0; i < 8; ++i) d[i] = f[i];
}
__device__ __forceinline__ float mk_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double mk_warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float mk_af(const MkTask& t, int i) { return __int_as_float(t.a[i]); }

// Wait context of the running task (one per CTA): bodies call mk_block_wait() after issuing loads that do not
// depend on the task's inputs (its weights), so the weight fetch overlaps the dependency wait.
struct MkWaitCtx {
  unsigned long long* counters;
  int* status;
  int* dump;
  long long spin_limit;
  unsigned long long t1;
  int tid, it, ok, waited;
};
__shared__ MkWaitCtx mk_wctx;

// A bounded wait gives up: error `code` (unless the launch is already aborting; the first CTA to fail is
// recorded), the abort flag every wait polls, and this CTA's dump row: task, event, step, target, value
// seen, steps done, whether it timed out (the host's hang report prints them).
__device__ __noinline__ void mk_give_up(int* status, int* dump, bool aborted, int code, int task, int ev, int it,
                                        unsigned long long target, unsigned long long seen, int done, bool late) {
  if (!aborted && atomicCAS(status, 0, code) == 0) status[2] = blockIdx.x;
  *(volatile int*)(status + 1) = 1;
  int* d = dump + blockIdx.x * MK_DUMP;
  d[0] = task; d[1] = ev; d[2] = it; d[3] = (int)target; d[4] = (int)seen; d[5] = done; d[6] = late; d[7] = 1;
}

__device__ __forceinline__ bool mk_wait(const MkTask& T, int it, unsigned long long* counters, int* status,
                                        int* dump, long long spin_limit, int tid, int steps_done) {
  const int nw = T.a[2];
  for (int k = 0; k < nw; ++k) {
    const int lag = (T.a[3] >> k) & 1;
    const int need_it = it - lag;
    if (need_it <= 0) continue;
    const int ev = T.a[4 + k];
    const unsigned long long target = (unsigned long long)T.a[8 + k] * (unsigned long long)need_it;
    unsigned long long v = mk_ld_acquire(counters + ev);
    long long spins = 0;
    unsigned ns = 20;
    while (v < target) {
      __nanosleep(ns);
      ns = ns < 200 ? ns + 20 : 200;
      v = mk_ld_acquire(counters + ev);
      ++spins;
      if ((spins & 255) == 0 || spins > spin_limit) {
        const bool aborted = *(volatile int*)(status + 1) != 0;
        if (aborted || spins > spin_limit) {
          mk_give_up(status, dump, aborted, 1, tid, ev, it, target, v, steps_done, spins > spin_limit);
          return false;
        }
      }
    }
  }
  return true;
}

__device__ __noinline__ void mk_block_wait_slow(const MkTask& T) {
  mk_wctx.ok = mk_wait(T, mk_wctx.it, mk_wctx.counters, mk_wctx.status, mk_wctx.dump, mk_wctx.spin_limit,
                       mk_wctx.tid, mk_wctx.it - 1);
  mk_wctx.t1 = mk_globaltimer();
  mk_wctx.waited = 1;
}
// Block-wide: wait for the task's events (once); false if the launch is aborting.
__device__ __forceinline__ bool mk_block_wait(const MkTask& T) {
  if (threadIdx.x == 0 && !mk_wctx.waited) mk_block_wait_slow(T);
  __syncthreads();
  return mk_wctx.ok;
}

