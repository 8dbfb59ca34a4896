// mpkir megakernel: tensor-parallel collective task bodies over CUDA peer memory (no NVSHMEM, no NVLink
// multicast).  Same contract as mk_tasks.cuh: run by all MK_NT threads of one CTA, pointers pre-offset to
// the task's tile, no blockIdx; needs mk_runtime.cuh (MkTask, mk_block_wait, mk_wctx).
//
// Memory: every rank's symmetric buffers (the collectives' inputs) and event counters are mapped into the
// other ranks' address spaces (cudaIpcGetMemHandle / cudaIpcOpenMemHandle, or cudaDeviceEnablePeerAccess
// in one process).  A symmetric buffer has one or two slots (runtime/multi_sim.py: slot_plan); with two,
// iteration `it` uses slot (it & 1): a peer can still be reading iteration `it` while this rank writes
// `it + 1`, never `it + 2`.  One slot: a[21] = 0 (a transformer step needs no second slot).
//
// Flags: the producers of a tile signal their (never reset) event counter with a SYSTEM-scope release add
// (mk_red_release_sys, after the CTA barrier); a collective task waits for its local event as usual
// (mk_block_wait) and then, in thread 0, for the SAME event's counter on every peer it reads with a
// system-scope acquire load (mk_wait_peers) until counter >= triggers * it; a CTA barrier then orders the
// other threads' peer loads after it.  Peer data is loaded with ld.global.cv (no stale L1 lines).
// Layout of the parameters: codegen/allreduce.py.
#pragma once

#ifndef MK_MAX_RANKS
#define MK_MAX_RANKS 8
#endif

// mk_ld_acquire_sys / mk_red_release_sys (system-scope acquire load / release add) come from mk_runtime.cuh.

// One per process, in device memory, filled by the host once the peers' allocations are mapped.
struct MkPeers {
  unsigned long long* counters[MK_MAX_RANKS];  // rank q's event counters, as mapped in this process
  int rank, world;
};

// Thread 0: wait until counter[ev] >= target on every rank in `mask` (bit q: rank q), bounded like mk_wait.
__device__ __noinline__ bool mk_wait_peers(const MkPeers* P, unsigned mask, int ev, unsigned long long target) {
  for (int q = 0; q < P->world; ++q) {
    if (!((mask >> q) & 1u)) continue;
    const unsigned long long* c = P->counters[q] + ev;
    unsigned long long v = mk_ld_acquire_sys(c);
    long long spins = 0;
    unsigned ns = 20;
    while (v < target) {
      __nanosleep(ns);
      ns = ns < 200 ? ns + 20 : 200;
      v = mk_ld_acquire_sys(c);
      if ((++spins & 255) == 0 || spins > mk_wctx.spin_limit) {
        const bool aborted = *(volatile int*)(mk_wctx.status + 1) != 0;
        if (aborted || spins > mk_wctx.spin_limit) {
          if (!aborted && atomicCAS(mk_wctx.status, 0, 1) == 0) mk_wctx.status[2] = -1 - q;  // peer q
          *(volatile int*)(mk_wctx.status + 1) = 1;
          return false;
        }
      }
    }
  }
  return true;
}

// Block-wide: local event (mk_block_wait), then the peers' flags of event a[19]; false when aborting.
__device__ __forceinline__ bool mk_block_wait_peers(const MkTask& t, int it, unsigned mask) {
  if (!mk_block_wait(t)) return false;
  __shared__ int ok;
  if (threadIdx.x == 0) {
    const MkPeers* P = (const MkPeers*)t.p[9];
    const unsigned long long target = (unsigned long long)t.a[20] * (unsigned long long)it;
    ok = mk_wait_peers(P, mask & ~(1u << P->rank), t.a[19], target);
  }
  __syncthreads();
  return ok;
}

__device__ __forceinline__ uint4 mk_ld_peer16(const void* p) { return __ldcv((const uint4*)p); }

// ---------------------------------------------------------------- allreduce (one tile, one-shot pull)
// p[q] (q < world): rank q's partial tile, slot 0 (slot 1 at + a[21] elements); p[8] this rank's output
// tile; p[9] MkPeers*; p[10] (optional, bf16 only) a residual tile added after the reduction (the fused
// `add`: out = bf16(bf16(sum) + residual), the reference rounding points).  a16 cols (multiple of 8), a17 row
// stride (elements, same on every rank),
// a19 event of the tile's producers, a20 its triggers per iteration, a21 slot stride (elements).
// Rows: the B live tokens.  Sum in float32 in rank order 0..N-1: every rank writes the same bits.
__device__ void mk_allreduce_bf16(const MkTask& t, int it, int B, char* smem) {
  const MkPeers* P = (const MkPeers*)t.p[9];
  if (!mk_block_wait_peers(t, it, (1u << P->world) - 1u)) return;
  const int cols = t.a[16], stride = t.a[17], world = P->world;
  const size_t slot = (size_t)(it & 1) * (size_t)t.a[21];
  const int vecs = cols / 8;
  for (int i = threadIdx.x; i < B * vecs; i += MK_NT) {
    const int r = i / vecs, c = (i % vecs) * 8;
    const size_t off = slot + (size_t)r * stride + c;
    float acc[8], f[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = 0.f;
    for (int q = 0; q < world; ++q) {
      mk_unpack8(mk_ld_peer16((const __nv_bfloat16*)t.p[q] + off), f);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += f[k];
    }
    if (t.p[10]) {
      mk_unpack8(mk_ld_act16((const __nv_bfloat16*)t.p[10] + (size_t)r * stride + c), f);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = mk_bf16_round(acc[k]) + f[k];
    }
    __align__(16) __nv_bfloat16 o[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = __float2bfloat16_rn(acc[k]);
    *(uint4*)((__nv_bfloat16*)t.p[8] + (size_t)r * stride + c) = *(const uint4*)o;
  }
}

// Same for float32 storage (a16 cols multiple of 4).
__device__ void mk_allreduce_f32(const MkTask& t, int it, int B, char* smem) {
  const MkPeers* P = (const MkPeers*)t.p[9];
  if (!mk_block_wait_peers(t, it, (1u << P->world) - 1u)) return;
  const int cols = t.a[16], stride = t.a[17], world = P->world;
  const size_t slot = (size_t)(it & 1) * (size_t)t.a[21];
  const int vecs = cols / 4;
  for (int i = threadIdx.x; i < B * vecs; i += MK_NT) {
    const int r = i / vecs, c = (i % vecs) * 4;
    const size_t off = slot + (size_t)r * stride + c;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int q = 0; q < world; ++q) {
      const float4 v = __ldcv((const float4*)((const float*)t.p[q] + off));
      acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
    }
    *(float4*)((float*)t.p[8] + (size_t)r * stride + c) = acc;
  }
}

// ---------------------------------------------------------------- vocabulary-parallel argmax: local pairs
// p[0] this rank's logits [rows, cols] (bf16, row stride a17 elements); p[8] its pair buffer (int2[rows]:
// max as float bits, global index; slot 1 at + a[21] pairs); a16 cols, a18 global index of column 0.
// First occurrence wins inside the rank (like NumPy's argmax); the merge keeps it across ranks.
__device__ __forceinline__ void mk_argmax_better(float& v, int& i, float vo, int io) {
  if (vo > v || (vo == v && io < i)) { v = vo; i = io; }
}
__device__ void mk_argmax_pairs_bf16(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int cols = t.a[16], stride = t.a[17], offset = t.a[18];
  int2* out = (int2*)t.p[8] + (size_t)(it & 1) * (size_t)t.a[21];
  float* rv = (float*)smem;
  int* ri = (int*)(rv + MK_NWARP);
  for (int r = 0; r < B; ++r) {
    const __nv_bfloat16* x = (const __nv_bfloat16*)t.p[0] + (size_t)r * stride;
    float v = MK_NEG_INF;
    int i = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += MK_NT) mk_argmax_better(v, i, mk_ld_bf16(x + c), c);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float vo = __shfl_xor_sync(0xffffffffu, v, o);
      const int io = __shfl_xor_sync(0xffffffffu, i, o);
      mk_argmax_better(v, i, vo, io);
    }
    if ((threadIdx.x & 31) == 0) { rv[threadIdx.x >> 5] = v; ri[threadIdx.x >> 5] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < MK_NWARP; ++w) mk_argmax_better(v, i, rv[w], ri[w]);
      out[r] = make_int2(__float_as_int(v), i + offset);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- vocabulary-parallel argmax merge
// p[q]: rank q's (max as float bits, global index) pairs of this row tile (int2[rows], slot 1 at + a[21]
// pairs); p[8] i32 output rows; p[9] MkPeers*; a16 rows; p[10] (optional) the token history [steps][a18]:
// row it-1 gets the tokens too (the next step's embedding reads them).  Rank order, strictly greater wins:
// ties keep the lowest global index.
__device__ void mk_argmax_merge_peers(const MkTask& t, int it, int B, char* smem) {
  const MkPeers* P = (const MkPeers*)t.p[9];
  if (!mk_block_wait_peers(t, it, (1u << P->world) - 1u)) return;
  const size_t slot = (size_t)(it & 1) * (size_t)t.a[21];
  const int rows = min(t.a[16], B);
  for (int r = threadIdx.x; r < rows; r += MK_NT) {
    int2 best = __ldcv((const int2*)t.p[0] + slot + r);
    for (int q = 1; q < P->world; ++q) {
      const int2 v = __ldcv((const int2*)t.p[q] + slot + r);
      if (__int_as_float(v.x) > __int_as_float(best.x)) best = v;
    }
    ((int*)t.p[8])[r] = best.y;
    if (t.p[10]) ((int*)t.p[10])[(size_t)(it - 1) * t.a[18] + r] = best.y;
  }
}

// ---------------------------------------------------------------- allgather: one source rank's block
// p[0]: source rank a22's x (mapped; slot 1 at + a[21] bytes); p[8] this rank's block of the output;
// p[9] MkPeers*; a16 bytes per row, a17 source row stride (bytes), a18 output row stride (bytes).
__device__ void mk_allgather_peer(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait_peers(t, it, 1u << t.a[22])) return;
  const int row_bytes = t.a[16], src_stride = t.a[17], dst_stride = t.a[18];
  const char* src = (const char*)t.p[0] + (size_t)(it & 1) * (size_t)t.a[21];
  const int vecs = row_bytes / 16;
  for (int i = threadIdx.x; i < B * vecs; i += MK_NT) {
    const int r = i / vecs, c = (i % vecs) * 16;
    *(uint4*)((char*)t.p[8] + (size_t)r * dst_stride + c) = mk_ld_peer16(src + (size_t)r * src_stride + c);
  }
}
