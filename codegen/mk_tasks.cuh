// mpkir megakernel: task bodies. Each is a __device__ function run by all MK_NT threads of one CTA,
// with pre-offset pointers (no blockIdx); bf16 storage, f32 accumulation (f64 in an exact build, below).
// Parameters: see codegen/lower.py.
#pragma once

// Accumulation: float, or double in an exact build (MK_EXACT, lower(numerics="exact")): the CUDA-core bodies
// then sum, exponentiate and take square roots in float64 and round (to float32, then bf16) only where the IR
// rounds, so their results are those of any float64 implementation of the same rounding points, summation
// order aside (which moves a value by ~1e-16, far below a bf16 rounding step). The tensor-core and bulk
// linears stay float32 (an exact plan does not use them).
#ifdef MK_EXACT
typedef double mk_acc;
#else
typedef float mk_acc;
#endif
__device__ __forceinline__ float mk_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mk_fma(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float mk_exp(float x) { return __expf(x); }
__device__ __forceinline__ double mk_exp(double x) { return exp(x); }
__device__ __forceinline__ float mk_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double mk_rsqrt(double x) { return 1.0 / sqrt(x); }
__device__ __forceinline__ float mk_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double mk_max(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------- embedding (+ step advance)
// p0 table [V,H], p1 out [B,H], p2 tokens0 [B], p3 token history [steps,maxB], p4 live positions [B],
// p5 positions0 [B]; a16 H, a17 token b, a18 maxB, a19 vocab
__device__ void mk_embedding(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int b = t.a[17];
  if (b >= B) return;
  const int H = t.a[16], maxB = t.a[18];
  int tok = it == 1 ? mk_ld_i32((const int*)t.p[2] + b) : mk_ld_i32((const int*)t.p[3] + (it - 2) * maxB + b);
  tok = min(max(tok, 0), t.a[19] - 1);
  if (threadIdx.x == 0) ((int*)t.p[4])[b] = mk_ld_i32((const int*)t.p[5] + b) + it - 1;
  const uint4* src = (const uint4*)((const __nv_bfloat16*)t.p[0] + (size_t)tok * H);
  uint4* dst = (uint4*)((__nv_bfloat16*)t.p[1] + (size_t)b * H);
  for (int i = threadIdx.x; i < H / 8; i += MK_NT) dst[i] = mk_ld_weight(src + i);
}

// ---------------------------------------------------------------- rmsnorm (standalone)
// p0 x [B,H] (stride a18), p1 w [H], p2 out [B,H]; a16 H, a17 eps bits, a18 x stride
__device__ void mk_rmsnorm(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int H = t.a[16], xs = t.a[18];
  const float eps = mk_af(t, 17);
  mk_acc* red = (mk_acc*)smem;
  for (int b = 0; b < B; ++b) {
    const __nv_bfloat16* x = (const __nv_bfloat16*)t.p[0] + (size_t)b * xs;
    mk_acc s = 0.f;
    for (int i = threadIdx.x; i < H; i += MK_NT) { mk_acc v = mk_ld_bf16(x + i); s += v * v; }
    s = mk_warp_sum(s);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    mk_acc tot = 0.f;
    for (int w = 0; w < MK_NWARP; ++w) tot += red[w];
    const mk_acc r = mk_rsqrt(tot / H + eps);
    for (int i = threadIdx.x; i < H; i += MK_NT) {
      mk_acc v = mk_ld_bf16(x + i) * r * __bfloat162float(((const __nv_bfloat16*)t.p[1])[i]);
      ((__nv_bfloat16*)t.p[2])[(size_t)b * H + i] = __float2bfloat16_rn((float)v);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- elementwise: add / silu_mul
// p0 a, p1 b, p2 out, all [B, n] with the same row stride a17; a16 n (columns), a18 op (0 add, 1 silu_mul)
__device__ void mk_eltwise(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int n = t.a[16], st = t.a[17], op = t.a[18];
  for (int i = threadIdx.x; i < B * n; i += MK_NT) {
    const int b = i / n, c = i % n;
    const size_t o = (size_t)b * st + c;
    mk_acc x = mk_ld_bf16((const __nv_bfloat16*)t.p[0] + o), y = mk_ld_bf16((const __nv_bfloat16*)t.p[1] + o);
    mk_acc r = op == 0 ? x + y : (x / ((mk_acc)1.f + mk_exp(-x))) * y;
    ((__nv_bfloat16*)t.p[2])[o] = __float2bfloat16_rn((float)r);
  }
}

// ---------------------------------------------------------------- linear tile (GEMV, small batch)
// Rows [n0, n0+R) of out[b, n] = x[b,:] . W[n,:]  with a prologue that stages x (bf16) in shared memory:
//   mode 0: x as is; 1: rmsnorm(x) * p4 (fused rmsnorm, eps a21); 2: silu(x) * p5 (fused silu_mul)
// and an epilogue: flag 1: out = residual p3 + out; flag 2: per-token (max, argmax) of the tile -> p6.
// p0 x [B, K] (stride a19), p1 W (row n0), p2 out (col n0; stride a18), p3 residual (col n0; stride a18),
// p4 norm weight [K], p5 up [B, K] (stride a19), p6 argmax partials {float, int}[B] of this tile
// a16 K, a17 R, a18 out stride, a19 x stride, a20 mode, a21 eps bits, a22 epilogue flags, a23 n0
// Stage x[b0 .. b0+nb) (with the prologue transform) into shared memory rows of XST elements.
// A: the accumulation type of the rmsnorm and silu prologues (mk_acc for mk_linear, float for the others).
template <class A>
__device__ __forceinline__ void mk_stage_x(const MkTask& t, int b0, int nb, __nv_bfloat16* xs, int XST, A* red) {
  const int K = t.a[16], XS = t.a[19], mode = t.a[20];
  const float eps = mk_af(t, 21);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nchunk = K / 8;
  const int K_ = XST;
    // ---- prologue: stage x[b0 .. b0+nb) in shared memory
  if (mode == 1) {  // block-wide sum of squares per token, then normalise in parallel
    A ss[MK_TILE_B];
#pragma unroll
    for (int b = 0; b < MK_TILE_B; ++b) ss[b] = 0.f;
    for (int c = threadIdx.x; c < nchunk; c += MK_NT) {
#pragma unroll
      for (int b = 0; b < MK_TILE_B; ++b) {
        if (b < nb) {
          float f[8];
          mk_unpack8(mk_ld_act16((const __nv_bfloat16*)t.p[0] + (size_t)(b0 + b) * XS + c * 8), f);
#pragma unroll
          for (int j = 0; j < 8; ++j) ss[b] += (A)f[j] * f[j];
        }
      }
    }
#pragma unroll
    for (int b = 0; b < MK_TILE_B; ++b) {
      const A v = mk_warp_sum(ss[b]);
      if (lane == 0) red[warp * MK_TILE_B + b] = v;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nb * nchunk; i += MK_NT) {
      const int b = i / nchunk, c = i % nchunk;
      A tot = 0.f;
      for (int w = 0; w < MK_NWARP; ++w) tot += red[w * MK_TILE_B + b];
      const A r = mk_rsqrt(tot / K + eps);
      float f[8], g[8];
      mk_unpack8(mk_ld_act16((const __nv_bfloat16*)t.p[0] + (size_t)(b0 + b) * XS + c * 8), f);
      mk_unpack8(mk_ld_weight((const __nv_bfloat16*)t.p[4] + c * 8), g);
      __align__(16) __nv_bfloat16 o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = __float2bfloat16_rn((float)(f[j] * r * g[j]));
      *(uint4*)(xs + (size_t)b * K_ + c * 8) = *(uint4*)o;
    }
  } else {
    for (int i = threadIdx.x; i < nb * nchunk; i += MK_NT) {
      const int b = i / nchunk, c = i % nchunk;
      uint4 v = mk_ld_act16((const __nv_bfloat16*)t.p[0] + (size_t)(b0 + b) * XS + c * 8);
      if (mode == 2) {
        float g[8], u[8];
        mk_unpack8(v, g);
        mk_unpack8(mk_ld_act16((const __nv_bfloat16*)t.p[5] + (size_t)(b0 + b) * XS + c * 8), u);
        __align__(16) __nv_bfloat16 o[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const A gj = g[j];
          o[j] = __float2bfloat16_rn((float)((gj / ((A)1.f + mk_exp(-gj))) * u[j]));
        }
        v = *(uint4*)o;
      }
      *(uint4*)(xs + (size_t)b * K_ + c * 8) = v;
    }
  }
}

// Output element o of a linear tile (a25: float32 output, unrounded; else bf16 with the residual epilogue).
template <class A>
__device__ __forceinline__ void mk_store_out(const MkTask& t, size_t o, A acc) {
  if (t.a[25]) { ((float*)t.p[2])[o] = (float)acc; return; }
  float v = mk_bf16_round((float)acc);
  if (t.a[22] & 1) v = mk_ld_bf16((const __nv_bfloat16*)t.p[3] + o) + v;
  ((__nv_bfloat16*)t.p[2])[o] = __float2bfloat16_rn(v);
}
__device__ __forceinline__ float mk_load_out(const MkTask& t, size_t o) {
  return t.a[25] ? __ldcg((const float*)t.p[2] + o) : mk_ld_bf16((const __nv_bfloat16*)t.p[2] + o);
}

// The warp's (max, first index): larger values win, equal values keep the lower index (as numpy's argmax).
__device__ __forceinline__ void mk_warp_argmax(float& best, int& bi) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
  }
}

// Stage 1 of argmax (epilogue flag 2): per token b0 .. b0+nb, the (max, first index) of this tile's R outputs
// (as the tile wrote them) into its partials p6; a23 is the tile's first column.
__device__ __forceinline__ void mk_tile_argmax(const MkTask& t, int b0, int nb) {
  const int R = t.a[17], NS = t.a[18];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int b = warp; b < nb; b += MK_NWARP) {
    float best = MK_NEG_INF;
    int bi = 0x7fffffff;
    for (int r = lane; r < R; r += 32) {
      float v = mk_load_out(t, (size_t)(b0 + b) * NS + r);
      if (v > best || (v == best && r < bi)) { best = v; bi = r; }
    }
    mk_warp_argmax(best, bi);
    if (lane == 0) {
      ((float*)t.p[6])[2 * (b0 + b)] = best;
      ((int*)t.p[6])[2 * (b0 + b) + 1] = bi + t.a[23];
    }
  }
}

// U 16-byte weight loads of row r from chunk c on, 32 chunks apart (zeros at chunks >= c1 and rows >= R).
template <int U>
__device__ __forceinline__ void mk_gemv_load(const __nv_bfloat16* W, int K, int R, int r, int c, int c1,
                                             uint4 (&w)[U]) {
  const __nv_bfloat16* wr = W + (size_t)r * K;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int cc = c + 32 * u;
    w[u] = (r < R && cc < c1) ? mk_ld_weight(wr + cc * 8) : make_uint4(0, 0, 0, 0);
  }
}

// P = 1 double-buffers the weight stream: the loads of a warp's next (row, K iteration) are issued before
// the current one's FMAs and warp sums (same arithmetic as P = 0).
template <int U, int P>
__device__ void mk_linear(const MkTask& t, int it, int B, char* smem) {
  const int K = t.a[16], R = t.a[17], NS = t.a[18], epi = t.a[22];
  __nv_bfloat16* xs = (__nv_bfloat16*)smem;                           // [MK_TILE_B][K]
  mk_acc* part = (mk_acc*)(smem + (size_t)MK_TILE_B * K * 2);        // [MK_NWARP][MK_TILE_B]
  mk_acc* red = part + MK_NWARP * MK_TILE_B;                          // [MK_NWARP][MK_TILE_B]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nchunk = K / 8;
  const int KS = R >= MK_NWARP ? 1 : MK_NWARP / R;                   // warps per row (in-CTA split-K)
  const int kseg = warp % KS, rgrp = warp / KS, rstep = MK_NWARP / KS;
  const int cps = (nchunk + KS - 1) / KS;
  const int c0 = kseg * cps, c1 = min(nchunk, c0 + cps);
  const int cstep = 32 * U;
  const __nv_bfloat16* W = (const __nv_bfloat16*)t.p[1];
  // issue the first row pass of weight loads before the dependency wait (weights never depend on it)
  uint4 w[U], wn[U] = {};
  mk_gemv_load<U>(W, K, R, rgrp, c0 + lane, c1, w);
  bool have = true;  // w holds the warp's first (row, K iteration)
  if (!mk_block_wait(t)) return;
  for (int b0 = 0; b0 < B; b0 += MK_TILE_B) {
    const int nb = min(MK_TILE_B, B - b0);
    mk_stage_x(t, b0, nb, xs, K, red);
    __syncthreads();
    // ---- main loop: each warp streams rows (or a K-segment of one row) with U 16-byte loads in flight
    for (int r = rgrp; r < R; r += rstep) {
      mk_acc acc[MK_TILE_B];
#pragma unroll
      for (int b = 0; b < MK_TILE_B; ++b) acc[b] = 0.f;
      for (int c = c0 + lane; c < c1; c += cstep) {
        if (!have) mk_gemv_load<U>(W, K, R, r, c, c1, w);
        have = false;
        if (P & 1) {  // the next (row, K iteration) of this warp, in this pass or the next token pass's first
          const bool row_end = c + cstep >= c1;
          const int nr = row_end ? r + rstep : r, nc = row_end ? c0 + lane : c + cstep;
          if (nr < R) {
            mk_gemv_load<U>(W, K, R, nr, nc, c1, wn);
          } else if (b0 + MK_TILE_B < B) {
            mk_gemv_load<U>(W, K, R, rgrp, c0 + lane, c1, wn);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int cc = c + 32 * u;
          if (cc < c1) {
            float wf[8];
            mk_unpack8(w[u], wf);
#pragma unroll
            for (int b = 0; b < MK_TILE_B; ++b) {
              if (b < nb) {
                float xf[8];
                mk_unpack8(*(const uint4*)(xs + (size_t)b * K + cc * 8), xf);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[b] = mk_fma((mk_acc)wf[j], (mk_acc)xf[j], acc[b]);
              }
            }
          }
        }
        if (P & 1) {
#pragma unroll
          for (int u = 0; u < U; ++u) w[u] = wn[u];
          have = true;
        }
      }
#pragma unroll
      for (int b = 0; b < MK_TILE_B; ++b)
        if (b < nb) acc[b] = mk_warp_sum(acc[b]);  // warp-uniform: no shuffles for empty token slots
      if (KS == 1) {
        if (lane < nb) {
          mk_acc v = acc[0];
#pragma unroll
          for (int b = 1; b < MK_TILE_B; ++b) if (lane == b) v = acc[b];
          mk_store_out(t, (size_t)(b0 + lane) * NS + r, v);
        }
      } else if (lane == 0) {
#pragma unroll
        for (int b = 0; b < MK_TILE_B; ++b) part[warp * MK_TILE_B + b] = acc[b];
      }
    }
    __syncthreads();
    if (KS > 1) {
      for (int i = threadIdx.x; i < R * nb; i += MK_NT) {
        const int r = i / nb, b = i % nb;
        mk_acc v = 0.f;
        for (int k = 0; k < KS; ++k) v += part[(r * KS + k) * MK_TILE_B + b];
        mk_store_out(t, (size_t)(b0 + b) * NS + r, v);
      }
      __syncthreads();
    }
    if (epi & 2) mk_tile_argmax(t, b0, nb);
    __syncthreads();
  }
}

// ---------------------------------------------------------------- linear tile, bulk-copied weight stream
// Same parameters and semantics as mk_linear (CUDA cores, up to TB tokens per pass), for K % 256 == 0. The
// tile's R rows are one contiguous range of W: they stream through a ring of a27 stages of a26 rows each in
// shared memory (mk_bulk_load, one mbarrier per stage), and the first a27 stages are issued before the
// dependency wait (weights never depend on it). Thread t takes chunks t, t + MK_NT, .. (16 bytes each) of a
// stage; a warp's 32 chunks are one 256-column segment of one row, whose dot product goes to that (row,
// segment)'s partial; each output sums its row's partials in segment order.
// Shared memory: ring [a27][a26 * K] bf16, x [TB][K] bf16, partials [R][TB][K / 256] f32, rmsnorm reduction,
// then the a27 barriers (bulk_smem in codegen/lower.py).
template <int TB>
__device__ void mk_linear_bulk(const MkTask& t, int it, int B, char* smem) {
  const int K = t.a[16], R = t.a[17], NS = t.a[18], epi = t.a[22], RS = t.a[26], NSTG = t.a[27];
  const int KC = K / 8, NSEG = K / 256, SB = RS * K * 2;
  const int lane = threadIdx.x & 31;
  __nv_bfloat16* xs = (__nv_bfloat16*)(smem + (size_t)NSTG * SB);
  float* part = (float*)(xs + (size_t)TB * K);
  float* red = part + (size_t)R * TB * NSEG;
  const size_t bar_off = ((size_t)((char*)(red + MK_NWARP * MK_TILE_B) - smem) + 7) & ~(size_t)7;
  unsigned long long* bar = (unsigned long long*)(smem + bar_off);
  const char* W = (const char*)t.p[1];
  const int nst = (R + RS - 1) / RS, total = nst * ((B + TB - 1) / TB);
  auto issue = [&](int g) {  // stage g (of all token passes) into its ring slot
    const int slot = g % NSTG, st = g % nst;
    const unsigned bytes = (unsigned)(min(RS, R - st * RS) * K * 2);
    mk_bulk_load(smem + (size_t)slot * SB, W + (size_t)st * SB, bytes, bar + slot);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < NSTG; ++s) mk_mbar_init(bar + s);
    mk_bulk_fence();
    for (int g = 0; g < min(NSTG, total); ++g) issue(g);
  }
  if (!mk_block_wait(t)) {  // aborting: the issued copies land before the CTA leaves
    if (threadIdx.x == 0)
      for (int g = 0; g < min(NSTG, total); ++g) mk_mbar_wait(bar + g, 0u);
    return;
  }
  for (int b0 = 0, g = 0; b0 < B; b0 += TB) {
    const int nb = min(TB, B - b0);
    mk_stage_x(t, b0, nb, xs, K, red);
    __syncthreads();
    for (int st = 0; st < nst; ++st, ++g) {
      const int slot = g % NSTG;
      mk_mbar_wait(bar + slot, (unsigned)(g / NSTG) & 1u);
      const uint4* ws = (const uint4*)(smem + (size_t)slot * SB);
      const int nch = min(RS, R - st * RS) * KC;  // a multiple of 32: warp-uniform trip counts
      for (int j = threadIdx.x; j < nch; j += MK_NT) {
        const int rl = j / KC, c = j - rl * KC;
        float wf[8], acc[TB];
        mk_unpack8(ws[j], wf);
#pragma unroll
        for (int b = 0; b < TB; ++b) {
          acc[b] = 0.f;
          if (b < nb) {
            float xf[8];
            mk_unpack8(*(const uint4*)(xs + (size_t)b * K + c * 8), xf);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[b] = fmaf(wf[e], xf[e], acc[b]);
          }
        }
#pragma unroll
        for (int b = 0; b < TB; ++b) {
          if (b < nb) {
            const float v = mk_warp_sum(acc[b]);
            if (lane == 0) part[((size_t)(st * RS + rl) * TB + b) * NSEG + c / 32] = v;
          }
        }
      }
      __syncthreads();  // the slot is consumed: refill it
      if (threadIdx.x == 0 && g + NSTG < total) issue(g + NSTG);
    }
    for (int i = threadIdx.x; i < R * nb; i += MK_NT) {
      const int r = i / nb, b = i - r * nb;
      const float* pp = part + ((size_t)r * TB + b) * NSEG;
      float v = 0.f;
      for (int s = 0; s < NSEG; ++s) v += pp[s];
      mk_store_out(t, (size_t)(b0 + b) * NS + r, v);
    }
    __syncthreads();
    if (epi & 2) mk_tile_argmax(t, b0, nb);
    __syncthreads();
  }
  if (threadIdx.x == 0)  // the memory goes back to other bodies
    for (int s = 0; s < NSTG; ++s) mk_mbar_inval(bar + s);
}

// ---------------------------------------------------------------- argmax stage 2
// p0 partials {float,int}[ntiles][maxB], p1 out i32 [B], p2 token history [steps][maxB]
// a16 ntiles, a17 token b, a18 maxB
__device__ void mk_argmax_final(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int b = t.a[17];
  if (b >= B) return;
  const int nt = t.a[16], maxB = t.a[18];
  float best = MK_NEG_INF;
  int bi = 0x7fffffff;
  const float* pf = (const float*)t.p[0];
  for (int i = threadIdx.x; i < nt; i += MK_NT) {
    float v = __ldcg(pf + 2 * ((size_t)i * maxB + b));
    int ix = __ldcg((const int*)pf + 2 * ((size_t)i * maxB + b) + 1);
    if (v > best || (v == best && ix < bi)) { best = v; bi = ix; }
  }
  mk_warp_argmax(best, bi);
  float* sv = (float*)smem;
  int* si = (int*)(sv + MK_NWARP);
  if ((threadIdx.x & 31) == 0) { sv[threadIdx.x >> 5] = best; si[threadIdx.x >> 5] = bi; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < MK_NWARP; ++w)
      if (sv[w] > best || (sv[w] == best && si[w] < bi)) { best = sv[w]; bi = si[w]; }
    ((int*)t.p[1])[b] = bi;
    ((int*)t.p[2])[(size_t)(it - 1) * maxB + b] = bi;
  }
}

// ---------------------------------------------------------------- k/v cache append
// Where token b's k row (all Hkv heads, D each) and v row go in the paged caches [P, page, Hkv, D]:
// p3 positions [B], p7 page table [R, pps], p8 seq ids [B]; a23 page size, a24 pps. -1: padding (no write).
__device__ __forceinline__ long long mk_kv_slot(const MkTask& t, int b, int HD) {
  const int seq = mk_ld_i32((const int*)t.p[8] + b);
  if (seq < 0) return -1;
  const int pos = mk_ld_i32((const int*)t.p[3] + b), PG = t.a[23];
  const int page = mk_ld_i32((const int*)t.p[7] + (size_t)seq * t.a[24] + pos / PG);
  return ((long long)page * PG + pos % PG) * HD;
}
// standalone append (when k comes from no rope task): p0 k [B,Hkv,D], p4 v [B,Hkv,D], p5 k cache, p6 v cache;
// a16 Hkv, a17 D, a21 b
__device__ void mk_kv_append(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int b = t.a[21];
  if (b >= B) return;
  const int HD = t.a[16] * t.a[17];
  const long long o = mk_kv_slot(t, b, HD);
  if (o < 0) return;
  const __nv_bfloat16* k = (const __nv_bfloat16*)t.p[0] + (size_t)b * HD;
  const __nv_bfloat16* v = (const __nv_bfloat16*)t.p[4] + (size_t)b * HD;
  for (int i = threadIdx.x; i < HD; i += MK_NT) {
    ((__nv_bfloat16*)t.p[5])[o + i] = __float2bfloat16_rn(mk_ld_bf16(k + i));
    ((__nv_bfloat16*)t.p[6])[o + i] = __float2bfloat16_rn(mk_ld_bf16(v + i));
  }
}

// ---------------------------------------------------------------- per-head rmsnorm and/or rope (neox)
// one token, all heads of one tensor. p0 x [B,H,D], p1 norm weight [D] (flag 1), p2 out [B,H,D],
// p3 positions [B], p9 inverse frequencies f32 [rd/2] (0: computed from theta); a16 H, a17 D, a18 eps bits,
// a19 theta bits, a20 flags (1 norm, 2 rope, 4 append the result as k and p4's row as v to the caches, see
// mk_kv_slot), a21 b, a22 rotary dim.
// Rope angles as the IR defines them (and HuggingFace computes them): inv_freq = f32(theta^(-2i/rd)), with
// any llama3 scaling applied (the host's table), angle = f32(pos) * inv_freq in f32, cos/sin of that angle.
template <int D>
__device__ void mk_head_norm_rope(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int b = t.a[21];
  if (b >= B) return;
  const int H = t.a[16], flags = t.a[20], RD = t.a[22];
  const float eps = mk_af(t, 18);
  const double theta = (double)mk_af(t, 19);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  mk_acc* buf = (mk_acc*)smem + warp * D;
  const int pos = mk_ld_i32((const int*)t.p[3] + b);
  const long long kvo = (flags & 4) ? mk_kv_slot(t, b, H * D) : -1;
  for (int h = warp; h < H; h += MK_NWARP) {
    const __nv_bfloat16* x = (const __nv_bfloat16*)t.p[0] + ((size_t)b * H + h) * D;
    mk_acc s = 0.f;
    for (int i = lane; i < D; i += 32) { mk_acc v = mk_ld_bf16(x + i); buf[i] = v; s += v * v; }
    s = mk_warp_sum(s);
    if (flags & 1) {
      const mk_acc r = mk_rsqrt(s / D + eps);
      for (int i = lane; i < D; i += 32)
        buf[i] = mk_bf16_round((float)(buf[i] * r * __bfloat162float(((const __nv_bfloat16*)t.p[1])[i])));
    }
    __syncwarp();
    __nv_bfloat16* o = (__nv_bfloat16*)t.p[2] + ((size_t)b * H + h) * D;
    if (flags & 2) {
      const int half = RD / 2;
      for (int i = lane; i < half; i += 32) {
        const float inv = t.p[9] ? __ldg((const float*)t.p[9] + i) : (float)(1.0 / pow(theta, 2.0 * i / RD));
        const float ang = __fmul_rn((float)pos, inv);
        double sn, cs;
        sincos((double)ang, &sn, &cs);
        const double a0 = buf[i], a1 = buf[i + half];  // float64 like the reference, one f32 rounding
        buf[i] = (float)(a0 * cs - a1 * sn);
        buf[i + half] = (float)(a1 * cs + a0 * sn);
      }
      __syncwarp();
    }
    for (int i = lane; i < D; i += 32) {
      const __nv_bfloat16 r = __float2bfloat16_rn((float)buf[i]);
      o[i] = r;
      if (kvo >= 0) {
        ((__nv_bfloat16*)t.p[5])[kvo + h * D + i] = r;
        ((__nv_bfloat16*)t.p[6])[kvo + h * D + i] =
            __float2bfloat16_rn(mk_ld_bf16((const __nv_bfloat16*)t.p[4] + ((size_t)b * H + h) * D + i));
      }
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- paged decode attention (split-KV)
// One (token b, kv head, split s): the G query heads of the group attend to positions of this split.
// p0 q [B,Hq,D], p1 k [B,Hkv,D], p2 v [B,Hkv,D], p3 k_cache [P,page,Hkv,D], p4 v_cache, p5 page_table
// [R,pps], p6 positions [B], p7 seq_ids [B], p8 out: bf16 [B,Hq,D] (S == 1) or f32 partials
// [B,Hkv,S][G][D+2] (m, l, acc); a16 b, a17 kvh, a18 s, a19 S, a20 Hkv, a21 page, a22 pps, a23 scale bits
template <int D, int G>
__device__ void mk_attention(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int b = t.a[16];
  if (b >= B) return;
  const int kvh = t.a[17], s = t.a[18], S = t.a[19], Hkv = t.a[20], PG = t.a[21], PPS = t.a[22];
  const float scale = mk_af(t, 23);
  constexpr int LPP = D / 8;        // lanes per position (16 bytes each)
  constexpr int PPW = 32 / LPP;     // positions per warp step
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane / LPP, gl = lane % LPP;
  const int seq = mk_ld_i32((const int*)t.p[7] + b);
  const int pos = mk_ld_i32((const int*)t.p[6] + b);
  const int Hq = Hkv * G;
  const __nv_bfloat16* kn = (const __nv_bfloat16*)t.p[1] + ((size_t)b * Hkv + kvh) * D;
  const __nv_bfloat16* vn = (const __nv_bfloat16*)t.p[2] + ((size_t)b * Hkv + kvh) * D;
  __nv_bfloat16* kc = (__nv_bfloat16*)t.p[3];
  __nv_bfloat16* vc = (__nv_bfloat16*)t.p[4];
  const int* ptab = (const int*)t.p[5];
  if (t.a[24] && s == 0 && seq >= 0) {  // append k, v here (a24; normally a rope or append task did)
    const int page = mk_ld_i32(ptab + (size_t)seq * PPS + pos / PG);
    const size_t o = (((size_t)page * PG + pos % PG) * Hkv + kvh) * D;
    for (int i = threadIdx.x; i < D; i += MK_NT) {
      kc[o + i] = __float2bfloat16_rn(mk_ld_bf16(kn + i));
      vc[o + i] = __float2bfloat16_rn(mk_ld_bf16(vn + i));
    }
  }
  const int L = seq >= 0 ? pos + 1 : 0;
  const int chunk = (L + S - 1) / S;
  const int p0 = s * chunk, p1 = min(L, p0 + chunk);
  // q (scaled) for this lane's 8 elements of each head of the group
  mk_acc q[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    mk_unpack8(mk_ld_act16((const __nv_bfloat16*)t.p[0] + ((size_t)b * Hq + kvh * G + g) * D + gl * 8), q[g]);
#pragma unroll
    for (int j = 0; j < 8; ++j) q[g][j] *= scale;
  }
  mk_acc m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = MK_NEG_INF; l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
  }
  for (int pb = p0 + warp * PPW; pb < p1; pb += MK_NWARP * PPW) {
    const int p = pb + grp;
    const bool ok = p < p1;
    float kf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, vf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (ok) {
      if (p == pos) {
        mk_unpack8(mk_ld_act16(kn + gl * 8), kf);
        mk_unpack8(mk_ld_act16(vn + gl * 8), vf);
      } else {
        const int page = mk_ld_i32(ptab + (size_t)seq * PPS + p / PG);
        const size_t o = (((size_t)page * PG + p % PG) * Hkv + kvh) * D + gl * 8;
        mk_unpack8(mk_ld_act16(kc + o), kf);
        mk_unpack8(mk_ld_act16(vc + o), vf);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      mk_acc d = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) d = mk_fma(q[g][j], (mk_acc)kf[j], d);
#pragma unroll
      for (int o = LPP / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      if (ok) {
        const mk_acc mn = mk_max(m[g], d);
        const mk_acc corr = mk_exp(m[g] - mn), pe = mk_exp(d - mn);
        l[g] = l[g] * corr + pe;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = acc[g][j] * corr + pe * vf[j];
        m[g] = mn;
      }
    }
  }
  // combine the NWARP*PPW partial states in shared memory
  constexpr int NP = MK_NWARP * PPW;
  mk_acc* sm_m = (mk_acc*)smem;             // [NP][G]
  mk_acc* sm_l = sm_m + NP * G;             // [NP][G]
  mk_acc* sm_a = sm_l + NP * G;             // [NP][G][D]
  const int pi = warp * PPW + grp;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (gl == 0) { sm_m[pi * G + g] = m[g]; sm_l[pi * G + g] = l[g]; }
#pragma unroll
    for (int j = 0; j < 8; ++j) sm_a[(pi * G + g) * D + gl * 8 + j] = acc[g][j];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += MK_NT) {
    const int g = i / D, d = i % D;
    mk_acc M = MK_NEG_INF;
    for (int k = 0; k < NP; ++k) M = mk_max(M, sm_m[k * G + g]);
    mk_acc Ls = 0.f, A = 0.f;
    if (M != MK_NEG_INF) {
      for (int k = 0; k < NP; ++k) {
        const mk_acc mk = sm_m[k * G + g];
        if (mk == MK_NEG_INF) continue;
        const mk_acc e = mk_exp(mk - M);
        Ls += sm_l[k * G + g] * e;
        A += sm_a[(k * G + g) * D + d] * e;
      }
    }
    if (S == 1) {
      ((__nv_bfloat16*)t.p[8])[((size_t)b * Hq + kvh * G + g) * D + d] =
          __float2bfloat16_rn((float)(Ls > 0.f ? A / Ls : (mk_acc)0.f));
    } else {
      mk_acc* pp = (mk_acc*)t.p[8] + (((size_t)b * Hkv + kvh) * S + s) * G * (D + 2) + g * (D + 2);
      if (d == 0) { pp[0] = M; pp[1] = Ls; }
      pp[2 + d] = A;
    }
  }
}

// merge of the S splits of one (token, kv head): p0 partials, p1 out bf16 [B,Hq,D], p2 seq_ids
// a16 b, a17 kvh, a18 S, a19 Hkv, a20 G, a21 D
__device__ void mk_attention_merge(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int b = t.a[16];
  if (b >= B) return;
  const int kvh = t.a[17], S = t.a[18], Hkv = t.a[19], G = t.a[20], D = t.a[21];
  const mk_acc* pp = (const mk_acc*)t.p[0] + ((size_t)b * Hkv + kvh) * S * G * (D + 2);
  for (int i = threadIdx.x; i < G * D; i += MK_NT) {
    const int g = i / D, d = i % D;
    mk_acc M = MK_NEG_INF;
    for (int s = 0; s < S; ++s) M = mk_max(M, __ldcg(pp + (s * G + g) * (D + 2)));
    mk_acc Ls = 0.f, A = 0.f;
    if (M != MK_NEG_INF) {
      for (int s = 0; s < S; ++s) {
        const mk_acc* q = pp + (s * G + g) * (D + 2);
        const mk_acc mk = __ldcg(q);
        if (mk == MK_NEG_INF) continue;
        const mk_acc e = mk_exp(mk - M);
        Ls += __ldcg(q + 1) * e;
        A += __ldcg(q + 2 + d) * e;
      }
    }
    ((__nv_bfloat16*)t.p[1])[((size_t)b * Hkv * G + kvh * G + g) * D + d] =
        __float2bfloat16_rn((float)(Ls > 0.f ? A / Ls : (mk_acc)0.f));
  }
}

// ---------------------------------------------------------------- linear tile on tensor cores (K % 32 == 0)
// Same parameters and semantics as mk_linear. Each warp owns 16-row blocks of W and a K range; per 32-wide
// K block a thread loads 16 bytes of row g and of row g+8 (g = lane/4) and 16 bytes of token g's x from shared
// memory; two mma.m16n8k16 (bf16 in, f32 accumulate) consume them (K is permuted identically for W and x,
// so the dot products are unchanged). The 8 mma columns are 8 tokens: batch 1..8 costs the same.
#ifndef MK_CPU_EMULATION  // (mpkir/testing/cta.py emulates the warp's mma on the CPU)
__device__ __forceinline__ void mk_mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                            unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

// 16*U bytes of W rows r0 and r0+8 at K block kb, thread quad tq's slice (zeros past the tile's R rows)
template <int U>
__device__ __forceinline__ void mk_mma_load_kb(const __nv_bfloat16* W, int K, int R, int r0, int tq, int kb,
                                               uint4 (&wa)[U], uint4 (&wb)[U]) {
  const __nv_bfloat16* w0 = W + (size_t)r0 * K + tq * 8 * U + kb * 32 * U;
  const __nv_bfloat16* w1 = w0 + (size_t)8 * K;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    wa[u] = r0 < R ? mk_ld_weight(w0 + 8 * u) : make_uint4(0, 0, 0, 0);
    wb[u] = r0 + 8 < R ? mk_ld_weight(w1 + 8 * u) : make_uint4(0, 0, 0, 0);
  }
}

// P bit 1 double-buffers the weight stream (each K block's loads issued before the previous block's mma);
// P bit 2 loads the warp's first K block before the dependency wait. Same arithmetic for every P.
template <int U, int NG, int P>
__device__ void mk_linear_mma(const MkTask& t, int it, int B, char* smem) {
  // Each warp owns 16-row blocks of W (the mma's M) and a K range; tokens are the mma's N (8 columns).
  // Per 32*U-wide K block, thread (g = lane/4, tq = lane%4) streams 16*U contiguous bytes of rows g and g+8
  // and reads token g's x at the same K offsets from shared memory (K is permuted identically for W and x,
  // so the dot products are unchanged). Two accumulator sets keep two independent mma chains in flight.
  // NG groups of 8 tokens share each weight load (a pass covers 8*NG tokens: W is read ceil(B/(8 NG)) times).
  const int K = t.a[16], R = t.a[17], NS = t.a[18], epi = t.a[22];
  constexpr int TB = MK_TILE_B * NG;
  const int XST = K + 32;                                             // padded rows: no bank conflicts
  __nv_bfloat16* xs = (__nv_bfloat16*)smem;                           // [TB][XST]
  float* part = (float*)(smem + (size_t)TB * XST * 2);               // [NG][MK_NWARP][16 rows][8 tokens]
  float* red = part + NG * MK_NWARP * 128;                            // [MK_NWARP][MK_TILE_B]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int nrb = (R + 15) / 16, nkb = K / (32 * U);
  const int KS = nrb >= MK_NWARP ? 1 : MK_NWARP / nrb;
  const int kseg = warp % KS, rb0 = warp / KS, rbstep = MK_NWARP / KS;
  const int kps = (nkb + KS - 1) / KS;
  const int kb0 = kseg * kps, kb1 = min(nkb, kb0 + kps);
  const __nv_bfloat16* W = (const __nv_bfloat16*)t.p[1];
  uint4 pa[U], pb[U];
  bool pre = (P & 2) && rb0 < nrb && kb0 < kb1;
  if (pre) mk_mma_load_kb<U>(W, K, R, rb0 * 16 + g, tq, kb0, pa, pb);
  if (!mk_block_wait(t)) return;
  for (int b0 = 0; b0 < B; b0 += TB) {
    const int nbt = min(TB, B - b0);
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) {
      const int nb = min(MK_TILE_B, nbt - gi * MK_TILE_B);
      if (nb > 0) mk_stage_x(t, b0 + gi * MK_TILE_B, nb, xs + (size_t)gi * MK_TILE_B * XST, XST, red);
      __syncthreads();
    }
    for (int rb = rb0; rb < nrb; rb += rbstep) {
      const __nv_bfloat16* xr = xs + (size_t)g * XST + tq * 8 * U;
      float c[NG][4], d[NG][4];
#pragma unroll
      for (int gi = 0; gi < NG; ++gi)
#pragma unroll
        for (int q = 0; q < 4; ++q) c[gi][q] = d[gi][q] = 0.f;
      uint4 wa[U], wb[U], nxa[U], nxb[U];
      bool have = false;  // wa/wb already hold K block kb0
      if (kb0 < kb1 && (pre || (P & 1))) {
        if (pre) {
#pragma unroll
          for (int u = 0; u < U; ++u) wa[u] = pa[u], wb[u] = pb[u];
          pre = false;
        } else {
          mk_mma_load_kb<U>(W, K, R, rb * 16 + g, tq, kb0, wa, wb);
        }
        have = true;
      }
      for (int kb = kb0; kb < kb1; ++kb) {
        if (P & 1) {
          if (kb + 1 < kb1) mk_mma_load_kb<U>(W, K, R, rb * 16 + g, tq, kb + 1, nxa, nxb);
        } else if (!have) {
          mk_mma_load_kb<U>(W, K, R, rb * 16 + g, tq, kb, wa, wb);
        }
        have = false;
#pragma unroll
        for (int gi = 0; gi < NG; ++gi) {
          if (gi * MK_TILE_B >= nbt) break;  // block-uniform: empty token groups of the last pass
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const uint4 xv = *(const uint4*)(xr + (size_t)gi * MK_TILE_B * XST + kb * 32 * U + 8 * u);
            // each mma sums only its 16 products (the tensor core's internal f32 accumulation does not
            // round to nearest); the running sums are ordinary f32 adds, like the CUDA-core GEMV's
            float tc[4] = {0.f, 0.f, 0.f, 0.f}, td[4] = {0.f, 0.f, 0.f, 0.f};
            mk_mma_bf16(tc, wa[u].x, wb[u].x, wa[u].y, wb[u].y, xv.x, xv.y);
            mk_mma_bf16(td, wa[u].z, wb[u].z, wa[u].w, wb[u].w, xv.z, xv.w);
#pragma unroll
            for (int q = 0; q < 4; ++q) { c[gi][q] += tc[q]; d[gi][q] += td[q]; }
          }
        }
        if (P & 1) {
#pragma unroll
          for (int u = 0; u < U; ++u) wa[u] = nxa[u], wb[u] = nxb[u];
        }
      }
      // c[gi][0], c[gi][1]: row g, tokens 8gi + 2tq, +1; c[gi][2], c[gi][3]: row g+8
#pragma unroll
      for (int gi = 0; gi < NG; ++gi) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float v = c[gi][q] + d[gi][q];
          const int rr = g + (q >> 1) * 8, n = gi * MK_TILE_B + 2 * tq + (q & 1);
          if (KS == 1) {
            if (rb * 16 + rr < R && n < nbt) mk_store_out(t, (size_t)(b0 + n) * NS + rb * 16 + rr, v);
          } else {
            part[(gi * MK_NWARP + warp) * 128 + rr * 8 + 2 * tq + (q & 1)] = v;
          }
        }
      }
    }
    __syncthreads();
    if (KS > 1) {
      for (int i = threadIdx.x; i < R * nbt; i += MK_NT) {
        const int r = i / nbt, n = i % nbt, rb = r / 16, gi = n / MK_TILE_B;
        float v = 0.f;
        for (int k = 0; k < KS; ++k) v += part[(gi * MK_NWARP + rb * KS + k) * 128 + (r % 16) * 8 + n % MK_TILE_B];
        mk_store_out(t, (size_t)(b0 + n) * NS + r, v);
      }
      __syncthreads();
    }
    if (epi & 2) mk_tile_argmax(t, b0, nbt);
    __syncthreads();
  }
}
