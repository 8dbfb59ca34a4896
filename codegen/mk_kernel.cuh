// mpkir megakernel: the persistent worker kernel. One CTA per SM, all resident (the host checks
// occupancy and refuses otherwise). Each worker walks its ahead-of-time task list once per decode step;
// tasks marked JIT are claimed dynamically from a per-op ticket counter (work queue) by whichever worker
// reaches the op's slot first. Counters are never reset: a wait for event e at step `it` needs
// counter[e] >= triggers(e) * it.
#pragma once

extern "C" __global__ void __launch_bounds__(MK_NT, 1)
mk_megakernel(const MkTask* __restrict__ tasks, const int* __restrict__ list_off, const int* __restrict__ list,
              unsigned long long* counters, int* status, int* dump, unsigned long long* trace, int trace_cap,
              int nsteps, int B, long long spin_limit, int* jit_tickets) {
  extern __shared__ __align__(16) char smem[];
  __shared__ MkTask s_task;
  __shared__ int s_ok, s_jit;
  const int sm = blockIdx.x;
  const int beg = list_off[sm], end = list_off[sm + 1];
  int ntrace = 0;
  for (int it = 1; it <= nsteps; ++it) {
    for (int i = beg; i < end; ++i) {
      int tid = list[i];
      if (tid < 0) {  // JIT slot of op -(tid+1): claim its next unclaimed task of this step (CAS on a ticket)
        if (threadIdx.x == 0) {
          int* jt = jit_tickets + 4 * (-(tid + 1));
          const int first = jt[1], count = jt[2], lim = count * it;
          int v = atomicAdd(jt, 0), got = -1;
          while (v < lim) {
            const int w = atomicCAS(jt, v, v + 1);
            if (w == v) { got = first + (v - count * (it - 1)); break; }
            v = w;
          }
          s_jit = got;
        }
        __syncthreads();
        tid = s_jit;
        __syncthreads();
        if (tid < 0) continue;
        --i;  // come back to this slot for another ticket
      }
      if (threadIdx.x < (int)(sizeof(MkTask) / 16)) ((uint4*)&s_task)[threadIdx.x] = ((const uint4*)(tasks + tid))[threadIdx.x];
      __syncthreads();
      unsigned long long t0 = 0;
      if (threadIdx.x == 0) {
        t0 = mk_globaltimer();
        if (s_task.p[11] && s_task.a[12]) mk_prefetch_l2((const void*)s_task.p[11], (unsigned)s_task.a[12]);
        mk_wctx.counters = counters; mk_wctx.status = status; mk_wctx.dump = dump;
        mk_wctx.spin_limit = spin_limit; mk_wctx.tid = tid; mk_wctx.it = it; mk_wctx.ok = 1; mk_wctx.waited = 0;
      }
      __syncthreads();
      mk_dispatch(s_task, it, B, smem);      // bodies call mk_block_wait() themselves
      if (!mk_block_wait(s_task)) return;     // (no-op when the body waited) every task waits before signalling
      if (threadIdx.x == 0) {
        mk_red_release(counters + s_task.a[1], 1ull);
        if (trace && ntrace < trace_cap) {
          unsigned long long* e = trace + ((size_t)sm * trace_cap + ntrace) * 4;
          e[0] = ((unsigned long long)it << 32) | (unsigned)tid; e[1] = t0; e[2] = mk_wctx.t1; e[3] = mk_globaltimer();
        }
        ++ntrace;
      }
    }
  }
}
