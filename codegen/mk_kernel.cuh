// mpkir megakernel: the persistent worker kernels. One CTA per SM, all resident (the host checks
// occupancy and refuses otherwise). Each worker walks its ahead-of-time task list once per decode step; a
// JIT slot in a list stands for an op whose tasks are handed out at run time to whichever workers reach it:
//   MK_SCHED_WARPS > 0  scheduler warps in one more CTA (the last) pop fired events from circular queues in
//                       device memory and launch the ops that waited on them: they open the op's head for
//                       the step; the workers take its tasks (first + index) with one atomic add each;
//   MK_SCHED_WARPS == 0 workers claim tickets from a per-op counter (compare-and-swap), no scheduler.
// The control block's layout is runtime/jit_queue.py's. Counters are never reset: a wait for event e at step
// `it` needs counter[e] >= triggers(e) * it.
//   mk_megakernel        nsteps steps in one launch (argmax feeds the next step's tokens)
//   mk_megakernel_serve  resident serving: each step's inputs come from a ring in pinned host memory, its
//                        logits (or argmax ids) go back to pinned memory, until the host sends "stop"
#pragma once
#ifndef MK_DESC_PREFETCH
#define MK_DESC_PREFETCH 1  // load the next ahead-of-time task's descriptor while a task runs (MPKIR_DESC_PREFETCH)
#endif
#ifndef MK_SCHED_WARPS
#define MK_SCHED_WARPS 0
#endif
#define MK_JIT_HDR 16
#define MK_JIT_REC 16
#define MK_JIT_OP(jit, q) ((jit) + MK_JIT_HDR + MK_JIT_REC * (q))

// Bounded spin until (*p >> 32) == stamp, with nanosleep back-off up to max_ns (0: none, a scheduler warp
// has its SM to itself). False on timeout or abort; the dump records (task -2, what, step, stamp, seen stamp).
__device__ __noinline__ bool mk_wait_stamp(const unsigned long long* p, unsigned stamp, int* status, int* dump,
                                           long long spin_limit, int what, int it, unsigned long long& v,
                                           unsigned max_ns) {
  v = mk_ld_acquire(p);
  long long spins = 0;
  unsigned ns = 20;
  while ((unsigned)(v >> 32) != stamp) {
    if (max_ns) {
      __nanosleep(ns);
      ns = ns < max_ns ? ns + 20 : max_ns;
    }
    v = mk_ld_acquire(p);
    ++spins;
    if ((spins & 255) == 0 || spins > spin_limit) {
      const bool aborted = *(volatile int*)(status + 1) != 0;
      if (aborted || spins > spin_limit) {
        mk_give_up(status, dump, aborted, 1, -2, what, it, stamp, v >> 32, it - 1, spins > spin_limit);
        return false;
      }
    }
  }
  return true;
}

// Thread 0 of a worker at JIT op q's slot, step it: the next task of q for this step, -1 when none is left,
// -2 if the launch is aborting.
__device__ __noinline__ int mk_jit_take(int* jit, int q, int it, int* status, int* dump, long long spin_limit) {
  int* r = MK_JIT_OP(jit, q);
#if MK_SCHED_WARPS
  // this step parity's head carries the step once the scheduler has launched the op (at most one step
  // behind: the head's previous user, step it - 2, is over for every visitor); its low word counts the
  // tasks taken
  unsigned long long* head = (unsigned long long*)(r + 2 * (it & 1));
  unsigned long long v;
  if (!mk_wait_stamp(head, (unsigned)it, status, dump, spin_limit, q, it, v, 200)) return -2;
  const unsigned idx = (unsigned)atomicAdd(head, 1ull);
  if (idx >= (unsigned)r[7]) return -1;
  return r[6] + (int)idx;
#else
  const int first = r[6], count = r[7], lim = count * it;
  int* ticket = r + 10;
  int v = atomicAdd(ticket, 0);
  while (v < lim) {
    const int w = atomicCAS(ticket, v, v + 1);
    if (w == v) return first + (v - count * (it - 1));
    v = w;
  }
  return -1;
#endif
}

#if MK_SCHED_WARPS
__device__ __forceinline__ unsigned long long mk_atom_add_release(unsigned long long* p, unsigned long long v) {
  unsigned long long old;
  asm volatile("atom.release.gpu.global.add.u64 %0, [%1], %2;" : "=l"(old) : "l"(p), "l"(v) : "memory");
  return old;
}
__device__ __forceinline__ void mk_st_release(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// A worker's signal of event ev (op index) at step it, whose tasks launch JIT ops: if it completes the event,
// the event goes to scheduler queue `queue` (reserve a position, publish its slot stamped position + 1).
__device__ __noinline__ void mk_signal_push(int* jit, unsigned long long* counters, int ev, int queue, int it) {
  const unsigned long long old = mk_atom_add_release(counters + ev, 1ull);
  if (old + 1 != (unsigned long long)MK_JIT_OP(jit, ev)[7] * (unsigned long long)it) return;
  const int L = jit[2];
  int* qb = jit + jit[3] + queue * (2 + 2 * L);
  const unsigned pos = atomicAdd((unsigned*)qb, 1u);
  mk_st_release((unsigned long long*)(qb + 2) + (pos & (L - 1)), ((unsigned long long)(pos + 1) << 32) | (unsigned)ev);
}

// Scheduler warp w: pop `n` fired events from queue w (cursor: its position); for each JIT op that waits on
// the event, count it into the op's ready counter; the count that completes a step launches the op: lane 0
// opens the head of the step's parity for the step. False if the launch is aborting.
__device__ __noinline__ bool mk_schedule(int* jit, int w, unsigned& cursor, long long n, int* status, int* dump,
                                         long long spin_limit) {
  const int lane = threadIdx.x & 31, L = jit[2];
  const int* qb = jit + jit[3] + w * (2 + 2 * L);
  const int* evl = jit + jit[4];
  const int* evops = evl + jit[0] + 1;
  for (long long k = 0; k < n; ++k) {
    unsigned long long v = 0;
    int ok = 1;
    if (lane == 0)
      ok = mk_wait_stamp((const unsigned long long*)(qb + 2) + (cursor & (L - 1)), cursor + 1, status, dump,
                         spin_limit, -1 - w, 0, v, 0);
    if (!__shfl_sync(0xffffffffu, ok, 0)) return false;
    const int ev = (int)(unsigned)__shfl_sync(0xffffffffu, v, 0);
    ++cursor;
    for (int c = evl[ev]; c < evl[ev + 1]; ++c) {
      int* r = MK_JIT_OP(jit, evops[c]);
      unsigned long long old = 0;
      if (lane == 0) old = atomicAdd((unsigned long long*)(r + 4), 1ull);
      old = __shfl_sync(0xffffffffu, old, 0);
      const unsigned long long nr = (unsigned long long)r[8];
      if ((old + 1) % nr) continue;
      const int it = (int)((old + 1) / nr);
      if (lane == 0) {
        __threadfence();
        atomicExch((unsigned long long*)(r + 2 * (it & 1)), (unsigned long long)it << 32);
      }
    }
  }
  return true;
}
#endif

// One walk of this SM's task list for step `it` (waits, JIT slots) over B live tokens; the bodies see step
// `body_it` (the serving kernel passes 1: each step's tokens and positions are fresh inputs, as in a launch's
// first step). False if the launch is aborting.
__device__ __forceinline__ bool mk_walk(const MkTask* __restrict__ tasks, const int* __restrict__ list, int beg,
                                        int end, unsigned long long* counters, int* status, int* dump,
                                        unsigned long long* trace, int trace_cap, int& ntrace, int it, int B,
                                        long long spin_limit, int* jit_tickets, int body_it, char* smem,
                                        MkTask& s_task, int& s_jit) {
  const int sm = blockIdx.x;
  // the next ahead-of-time task's descriptor, loaded into registers (threads 0..13) while this task runs
  uint4 next_desc = make_uint4(0, 0, 0, 0);
  int next_tid = -1;
  for (int i = beg; i < end; ++i) {
    int tid = list[i];
    if (tid < 0) {  // JIT slot of op -(tid+1): take its next task of this step, if any
      if (threadIdx.x == 0) s_jit = mk_jit_take(jit_tickets, -(tid + 1), it, status, dump, spin_limit);
      __syncthreads();
      tid = s_jit;
      __syncthreads();
      if (tid == -2) return false;
      if (tid < 0) continue;
      --i;  // come back to this slot for another task
    }
    constexpr int kDescWords = (int)(sizeof(MkTask) / 16);
    if (threadIdx.x < kDescWords)
      ((uint4*)&s_task)[threadIdx.x] =
          MK_DESC_PREFETCH && tid == next_tid ? next_desc : ((const uint4*)(tasks + tid))[threadIdx.x];
    __syncthreads();
    next_tid = i + 1 < end ? list[i + 1] : -1;  // (a JIT slot, negative, is claimed when reached)
    if (MK_DESC_PREFETCH && next_tid >= 0 && threadIdx.x < kDescWords)
      next_desc = ((const uint4*)(tasks + next_tid))[threadIdx.x];
    // the signal is read now: s_task is rewritten as soon as the task's last barrier has passed
    const int signal_ev = s_task.a[1];
#if MK_SCHED_WARPS
    const int signal_queue = s_task.a[15];  // > 0: the event launches JIT ops; scheduler queue + 1
#endif
#ifdef MK_COLLECTIVES
    const bool signal_sys = s_task.a[14] != 0;
#endif
    unsigned long long t0 = 0;
    if (threadIdx.x == 0) {
      t0 = mk_globaltimer();
      if (s_task.p[11] && s_task.a[12]) mk_prefetch_l2((const void*)s_task.p[11], (unsigned)s_task.a[12]);
      mk_wctx.counters = counters; mk_wctx.status = status; mk_wctx.dump = dump;
      mk_wctx.spin_limit = spin_limit; mk_wctx.tid = tid; mk_wctx.it = it; mk_wctx.ok = 1; mk_wctx.waited = 0;
    }
    __syncthreads();
    mk_dispatch(s_task, body_it, B, smem);   // bodies call mk_block_wait() themselves (waits: step it)
    if (!mk_block_wait(s_task)) return false;  // (no-op when the body waited) every task waits before signalling
    if (threadIdx.x == 0) {
#ifdef MK_COLLECTIVES  // a[14]: peers on other GPUs wait on this event (tensor parallel)
      if (signal_sys) { __threadfence_system(); mk_red_release_sys(counters + signal_ev, 1ull); } else
#endif
#if MK_SCHED_WARPS
      if (signal_queue) mk_signal_push(jit_tickets, counters, signal_ev, signal_queue - 1, it); else
#endif
      mk_red_release(counters + signal_ev, 1ull);
      if (trace && ntrace < trace_cap) {
        unsigned long long* e = trace + ((size_t)sm * trace_cap + ntrace) * 4;
        e[0] = ((unsigned long long)it << 32) | (unsigned)tid; e[1] = t0; e[2] = mk_wctx.t1; e[3] = mk_globaltimer();
      }
      ++ntrace;
    }
  }
  return true;
}

extern "C" __global__ void __launch_bounds__(MK_NT, 1)
mk_megakernel(const MkTask* __restrict__ tasks, const int* __restrict__ list_off, const int* __restrict__ list,
              unsigned long long* counters, int* status, int* dump, unsigned long long* trace, int trace_cap,
              int nsteps, int B, long long spin_limit, int* jit_tickets) {
  extern __shared__ __align__(16) char smem[];
  __shared__ MkTask s_task;
  __shared__ int s_jit;
#if MK_SCHED_WARPS
  if (blockIdx.x == gridDim.x - 1) {  // the scheduler CTA: each warp pops its queue's events of every step
    const int w = threadIdx.x >> 5;
    unsigned cursor = 0;
    if (w < MK_SCHED_WARPS)
      mk_schedule(jit_tickets, w, cursor, (long long)nsteps * jit_tickets[jit_tickets[5] + w], status, dump,
                  spin_limit);
    return;
  }
#endif
  const int beg = list_off[blockIdx.x], end = list_off[blockIdx.x + 1];
  int ntrace = 0;
  for (int it = 1; it <= nsteps; ++it)
    if (!mk_walk(tasks, list, beg, end, counters, status, dump, trace, trace_cap, ntrace, it, B, spin_limit,
                 jit_tickets, it, smem, s_task, s_jit))
      return;
}

// ------------------------------------------------------------------------------------------ serving
// Host ring (pinned, device-mapped), slot (it-1) % nslots, int32 words: [0,1] sequence number (u64, = it when
// published), [2] command (0 run, 1 stop), [3] live tokens T, [4] output (0 logits, 1 argmax ids, 2 sampled ids),
// [16 .. 16+io_n) the step's input block (copied as is over the device io block), and for output 2 (sampled
// ids) from word smp_off 8 words per row: temperature (f64 lo, hi), top_k, top_p (f64 lo, hi), seed (u64 lo,
// hi), position of the draw; with in-kernel KV pages, word [5] counts the request slots released since the
// last step, listed from word kcfg[4]. Output (pinned): out_done (u64, = it once the step's output is complete) and out
// (f32 [T][V] logits, or i32 [T] ids).
// sctl (device, zeroed per launch, u64 words): [0] steps whose inputs are on the device, [1] CTAs done with
// their share of the output (never reset), [2] command, [3] T, [4] output mode.
// status[0] error codes: 1 watchdog timeout inside a step, 2 the host published no step for idle_ns.
#define MK_SERVE_HDR 16

// Bounded wait (nanosleep back-off) until *p >= target; sys: system-scope acquire (host memory).
// Gives up after spin_limit spins, or after deadline_ns of %globaltimer when deadline_ns > 0 (code 2).
__device__ __noinline__ bool mk_wait_word(const unsigned long long* p, unsigned long long target, bool sys,
                                          int* status, int* dump, long long spin_limit, long long idle_ns,
                                          int event, int it) {
  unsigned long long v = sys ? mk_ld_acquire_sys(p) : mk_ld_acquire(p);
  long long spins = 0;
  unsigned ns = 32;
  const unsigned long long t_start = idle_ns > 0 ? mk_globaltimer() : 0;
  while (v < target) {
    __nanosleep(ns);
    ns = ns < 256 ? ns + 32 : 256;
    v = sys ? mk_ld_acquire_sys(p) : mk_ld_acquire(p);
    ++spins;
    if ((spins & 255) == 0 || (idle_ns <= 0 && spins > spin_limit)) {
      const bool aborted = *(volatile int*)(status + 1) != 0;
      const bool late = idle_ns > 0 ? (long long)(mk_globaltimer() - t_start) > idle_ns : spins > spin_limit;
      if (aborted || late) {
        mk_give_up(status, dump, aborted, idle_ns > 0 ? 2 : 1, -1, event, it, target, v, it - 1, late);
        return false;
      }
    }
  }
  return true;
}

extern "C" __global__ void __launch_bounds__(MK_NT, 1)
mk_megakernel_serve(const MkTask* __restrict__ tasks, const int* __restrict__ list_off, const int* __restrict__ list,
                    unsigned long long* counters, int* status, int* dump, unsigned long long* trace, int trace_cap,
                    long long spin_limit, int* jit_tickets, const int* ring, int nslots, int slot_ints, int* io,
                    int io_n, unsigned long long* sctl, int final_ev, int final_trig, const void* logits,
                    int logits_f32, int V, int logits_ld, void* out, unsigned long long* out_done,
                    long long idle_ns, int smp_off, int* kpages, const int* kcfg) {
  extern __shared__ __align__(16) char smem[];
  __shared__ MkTask s_task;
  __shared__ int s_jit, s_cmd, s_B, s_mode, s_ok;
  __shared__ float s_max[MK_NWARP];
  __shared__ int s_arg[MK_NWARP];
  const int sm = blockIdx.x, nsm = gridDim.x - (MK_SCHED_WARPS ? 1 : 0);  // workers
#if MK_SCHED_WARPS
  if (sm == nsm) {  // the scheduler CTA: per step, once its inputs are on the device, its events of the step
    const int w = threadIdx.x >> 5;
    if (w >= MK_SCHED_WARPS) return;
    unsigned cursor = 0;
    for (int it = 1;; ++it) {
      int go = 0;
      if ((threadIdx.x & 31) == 0)
        go = mk_wait_word(sctl, (unsigned long long)it, false, status, dump, spin_limit, idle_ns + 1000000000ll,
                          -2, it) && __ldcg(sctl + 2) == 0;
      if (!__shfl_sync(0xffffffffu, go, 0)) return;
      if (!mk_schedule(jit_tickets, w, cursor, jit_tickets[jit_tickets[5] + w], status, dump, spin_limit)) return;
    }
  }
#endif
  const int beg = list_off[sm], end = list_off[sm + 1];
  int ntrace = 0;
  for (int it = 1;; ++it) {
    // 1. CTA 0 takes step `it` from the host ring and copies its inputs to the device io block
    if (sm == 0) {
      const int* slot = ring + (size_t)((it - 1) % nslots) * slot_ints;
      if (threadIdx.x == 0) {
        s_ok = mk_wait_word((const unsigned long long*)slot, (unsigned long long)it, true, status, dump,
                            spin_limit, idle_ns, -1, it);
        s_cmd = __ldcv(slot + 2); s_B = __ldcv(slot + 3); s_mode = __ldcv(slot + 4);
      }
      __syncthreads();
      if (!s_ok) return;
      if (s_cmd == 0) {
        const uint4* src = (const uint4*)(slot + MK_SERVE_HDR);
        const int n4 = io_n >> 2;
        for (int i = threadIdx.x; i < n4; i += MK_NT) ((uint4*)io)[i] = __ldcv(src + i);
        for (int i = (n4 << 2) + threadIdx.x; i < io_n; i += MK_NT) io[i] = __ldcv(slot + MK_SERVE_HDR + i);
      }
      __syncthreads();
      // in-kernel KV pages (kpages != 0; mk_pages.cuh): kcfg = R, P, pages per seq, page size, offsets of the
      // released slots (ring slot words; their number in header word 5), page table, seq ids, positions (io)
      if (s_cmd == 0 && kpages != nullptr && threadIdx.x == 0) {
        int* rel = (int*)smem;
        const int nrel = min(__ldcv(slot + 5), kcfg[0]);
        for (int r = 0; r < nrel; ++r) rel[r] = __ldcv(slot + kcfg[4] + r);
        if (!mk_pages_step(kpages, kcfg[0], kcfg[1], io + kcfg[5], kcfg[2], kcfg[3], rel, nrel, io + kcfg[6],
                           io + kcfg[7], s_B)) {
          if (atomicCAS(status, 0, MK_PAGES_EMPTY) == 0) status[2] = 0;
          *(volatile int*)(status + 1) = 1;
          s_ok = 0;
        }
      }
      __syncthreads();
      if (!s_ok) return;
      if (threadIdx.x == 0) {
        sctl[2] = (unsigned long long)s_cmd; sctl[3] = (unsigned long long)s_B; sctl[4] = (unsigned long long)s_mode;
        __threadfence();
        mk_red_release(sctl, 1ull);
      }
    }
    // 2. every CTA: wait until step `it`'s inputs are on the device
    if (threadIdx.x == 0) {
      s_ok = mk_wait_word(sctl, (unsigned long long)it, false, status, dump, spin_limit, idle_ns + 1000000000ll,
                          -2, it);
      s_cmd = (int)__ldcg(sctl + 2); s_B = (int)__ldcg(sctl + 3); s_mode = (int)__ldcg(sctl + 4);
    }
    __syncthreads();
    if (!s_ok || s_cmd != 0) return;  // aborting, or "stop"
    const int B = s_B, mode = s_mode;
    // 3. the step's tasks
    if (!mk_walk(tasks, list, beg, end, counters, status, dump, trace, trace_cap, ntrace, it, B, spin_limit,
                 jit_tickets, 1, smem, s_task, s_jit))
      return;
    // 4. the output, once the final op (every op is its ancestor) is done: each CTA copies its share
    if (threadIdx.x == 0)
      s_ok = mk_wait_word(counters + final_ev, (unsigned long long)final_trig * it, false, status, dump,
                          spin_limit, 0, final_ev, it);
    __syncthreads();
    if (!s_ok) return;
    if (mode == 0) {  // logits rows [B][V] -> f32, the flat range split evenly over the CTAs
      const long long n = (long long)B * V, per = (n + nsm - 1) / nsm;
      const long long lo = per * sm, hi = min(n, lo + per);
      float* o = (float*)out;
      for (long long e = lo + threadIdx.x; e < hi; e += MK_NT) {
        const long long r = e / V, c = e - r * V;
        float v;
        if (logits_f32) v = __ldcg((const float*)logits + r * logits_ld + c);
        else v = mk_ld_bf16((const __nv_bfloat16*)logits + r * logits_ld + c);
        o[e] = v;
      }
    } else if (mode == 2) {  // sample row sm with its request's parameters (ring slot words smp_off + 8 sm)
      if (sm < B) {
        const int* prm = ring + (size_t)((it - 1) % nslots) * slot_ints + smp_off + sm * 8;
        int w[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) w[j] = __ldcv(prm + j);
        const int token = mk_sample_row((const char*)logits + (size_t)sm * logits_ld * (logits_f32 ? 4 : 2),
                                        logits_f32, V, __longlong_as_double((long long)mk_smp_join(w[0], w[1])),
                                        w[2], __longlong_as_double((long long)mk_smp_join(w[3], w[4])),
                                        mk_smp_join(w[5], w[6]), w[7], smem);
        if (threadIdx.x == 0) ((int*)out)[sm] = token;
      }
    } else if (sm < B) {  // argmax of row sm (first index of the maximum, as numpy)
      float best = MK_NEG_INF;
      int arg = 0x7fffffff;
      for (int c = threadIdx.x; c < V; c += MK_NT) {
        float v;
        if (logits_f32) v = __ldcg((const float*)logits + (long long)sm * logits_ld + c);
        else v = mk_ld_bf16((const __nv_bfloat16*)logits + (long long)sm * logits_ld + c);
        if (v > best || (v == best && c < arg)) { best = v; arg = c; }
      }
      mk_warp_argmax(best, arg);
      if ((threadIdx.x & 31) == 0) { s_max[threadIdx.x >> 5] = best; s_arg[threadIdx.x >> 5] = arg; }
      __syncthreads();
      if (threadIdx.x == 0) {
        best = s_max[0]; arg = s_arg[0];
        for (int w = 1; w < MK_NWARP; ++w)
          if (s_max[w] > best || (s_max[w] == best && s_arg[w] < arg)) { best = s_max[w]; arg = s_arg[w]; }
        ((int*)out)[sm] = arg == 0x7fffffff ? 0 : arg;
      }
    }
    __threadfence_system();  // every writer: its share of the output is visible to the host first
    __syncthreads();
    if (threadIdx.x == 0) mk_red_release(sctl + 1, 1ull);
    // 5. CTA 0 publishes the step's output once every CTA has written its share
    if (sm == 0) {
      if (threadIdx.x == 0) {
        s_ok = mk_wait_word(sctl + 1, (unsigned long long)nsm * it, false, status, dump, spin_limit, 0, -3, it);
        if (s_ok) {
          __threadfence_system();
          mk_st_release_sys(out_done, (unsigned long long)it);
        }
      }
      __syncthreads();
      if (!s_ok) return;
    }
  }
}
