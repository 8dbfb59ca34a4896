// mpkir megakernel: the `sample` operator as a task body (one task per token row; semantics of
// mpkir/ops/sampling.py), and mk_sample_row, which the serving kernel also calls for per-request sampling. Written for any power-of-two MK_NT with block-wide steps only (shared-memory trees,
// shared-memory atomics, __syncthreads; no warp intrinsics), so tests run the same text as C++ on the CPU with
// MK_NT threads (mpkir/testing/cta.py).
//
// p0 logits [rows, a20] (bf16, or f32 when a19), p1 sampled tokens [maxB], p2 token history [steps, maxB],
// p3 positions [maxB] (i32); a16 V, a17 row b, a18 maxB, a19 f32 logits, a20 row stride (elements),
// a21/a22 temperature (float64 bits, lo/hi), a23 top_k, a24/a25 top_p (float64 bits), a26/a27 seed (u64).
//
// Exactly the reference, but: the top-p masses are summed in 2^-38 fixed point (so every run sums the same
// bits; the reference sums float64 in sorted order), and log is the device's. Both only matter where a
// token's cumulative probability or Gumbel score ties another's to ~1e-12.
#pragma once

#define MK_SMP_FX 274877906944.0  // 2^38: fixed-point unit of exp(z - zmax) in (0, 1]
#define MK_SMP_NEG_INF (__longlong_as_double(0xfff0000000000000ll))
#define MK_SMP_SMEM (MK_NT * 8 + MK_NT * 4 + 256 * 8 + 256 * 4 + 64)

__device__ __forceinline__ unsigned mk_smp_key(float v) {  // order-preserving, -0 == +0
  const unsigned u = __float_as_uint(v == 0.f ? 0.f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long mk_smp_mix(unsigned long long x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
__device__ __forceinline__ unsigned long long mk_smp_join(int lo, int hi) {
  return (unsigned long long)(unsigned)lo | ((unsigned long long)(unsigned)hi << 32);
}
__device__ __forceinline__ unsigned long long mk_smp_u64(const MkTask& t, int i) {
  return mk_smp_join(t.a[i], t.a[i + 1]);
}
__device__ __forceinline__ double mk_smp_f64(const MkTask& t, int i) {
  return __longlong_as_double((long long)mk_smp_u64(t, i));
}
__device__ __forceinline__ float mk_smp_logit(const void* row, int f32, int i) {
  if (f32) return __ldcg((const float*)row + i);
  return __uint_as_float((unsigned)__ldcg((const unsigned short*)row + i) << 16);
}

// Block-wide: (value, index) with the largest value, the smallest index on ties (every thread gets it).
__device__ __forceinline__ void mk_smp_argmax(double& v, int& i, double* sv, int* si) {
  sv[threadIdx.x] = v;
  si[threadIdx.x] = i;
  __syncthreads();
  for (int w = MK_NT / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      const double ov = sv[threadIdx.x + w];
      const int oi = si[threadIdx.x + w];
      if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
        sv[threadIdx.x] = ov;
        si[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  v = sv[0];
  i = si[0];
  __syncthreads();
}

// Block-wide sum of u64 (a fixed order: the same bits every run).
__device__ __forceinline__ unsigned long long mk_smp_sum(unsigned long long v, unsigned long long* s) {
  s[threadIdx.x] = v;
  __syncthreads();
  for (int w = MK_NT / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  v = s[0];
  __syncthreads();
  return v;
}

// Radix select (4 passes of 8 bits): the n-th largest key (1-based) among the entries i < V for which
// key(i, k) is true. Returns it; *rank = its rank among the entries with that key (1-based), *count = their
// number. Callers ask for n <= the number of entries.
template <class KeyOf>
__device__ unsigned mk_smp_nth(int V, int n, KeyOf key, int* hist, int* sh, int* rank, int* count) {
  unsigned prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += MK_NT) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < V; i += MK_NT) {
      unsigned k;
      if (key(i, k) && (k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int b = 255;
      while (b > 0 && hist[b] < n) n -= hist[b--];
      sh[0] = b;
      sh[1] = n;
      sh[2] = hist[b];
    }
    __syncthreads();
    prefix |= (unsigned)sh[0] << shift;
    mask |= 255u << shift;
    n = sh[1];
    *count = sh[2];
    __syncthreads();
  }
  *rank = n;
  return prefix;
}

// One row: the sampled token (every thread returns it). temperature <= 0: the first index of the maximum.
__device__ int mk_sample_row(const void* row, int f32, int V, double temp, int top_k, double top_p,
                             unsigned long long seed, int pos, char* smem) {
  double* sv = (double*)smem;                                          // [MK_NT]
  int* si = (int*)(sv + MK_NT);                                        // [MK_NT]
  unsigned long long* hm = (unsigned long long*)(si + MK_NT);         // [256] masses (fixed point)
  int* hc = (int*)(hm + 256);                                          // [256] counts
  int* sh = hc + 256;                                                  // scalars
  unsigned long long* su = (unsigned long long*)sv;                    // sums reuse sv
  // 1. the maximum (its first index: the greedy token)
  double best = MK_SMP_NEG_INF;
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < V; i += MK_NT) {
    const double v = (double)mk_smp_logit(row, f32, i);
    if (v > best) { best = v; bi = i; }
  }
  mk_smp_argmax(best, bi, sv, si);
  int token = bi;
  if (temp > 0.0) {
    const double zmax = best / temp;
    // kept: key > kkey, or key == kkey and index <= kidx (everything at first)
    unsigned kkey = 0;
    int kidx = V;
    int rank, count;
    // 2. top-k: the k-th largest value, and how many of the entries equal to it stay (lowest indices first)
    if (top_k > 0 && top_k < V) {
      kkey = mk_smp_nth(V, top_k, [&](int i, unsigned& k) { k = mk_smp_key(mk_smp_logit(row, f32, i)); return true; },
                        hc, sh, &rank, &count);
      if (rank < count) {
        const unsigned kk = kkey;
        kidx = (int)~mk_smp_nth(V, rank, [&](int i, unsigned& k) {
          if (mk_smp_key(mk_smp_logit(row, f32, i)) != kk) return false;
          k = ~(unsigned)i;  // the largest ~i is the smallest index
          return true;
        }, hc, sh, &rank, &count);
      }
    }
    // 3. top-p: walk the kept entries in descending order; keep one while the mass before it is < top_p
    if (top_p < 1.0) {
      unsigned long long s = 0;
      for (int i = threadIdx.x; i < V; i += MK_NT) {
        const float v = mk_smp_logit(row, f32, i);
        const unsigned k = mk_smp_key(v);
        if (k > kkey || (k == kkey && i <= kidx))
          s += (unsigned long long)(exp((double)v / temp - zmax) * MK_SMP_FX + 0.5);
      }
      const double P = top_p * (double)mk_smp_sum(s, su);
      unsigned prefix = 0, mask = 0;
      unsigned long long above = 0;  // mass of the kept entries with a larger key than the current range
      for (int shift = 24; shift >= 0; shift -= 8) {
        for (int j = threadIdx.x; j < 256; j += MK_NT) { hm[j] = 0; hc[j] = 0; }
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += MK_NT) {
          const float v = mk_smp_logit(row, f32, i);
          const unsigned k = mk_smp_key(v);
          if ((k > kkey || (k == kkey && i <= kidx)) && (k & mask) == prefix) {
            const int bin = (k >> shift) & 255;
            atomicAdd(&hm[bin], (unsigned long long)(exp((double)v / temp - zmax) * MK_SMP_FX + 0.5));
            atomicAdd(&hc[bin], 1);
          }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          int sel = -1, lowest = 0;
          for (int j = 255; j >= 0; --j) {
            if (!hc[j]) continue;
            lowest = j;
            if ((double)(above + hm[j]) >= P) { sel = j; break; }
            above += hm[j];
          }
          if (sel < 0) { sel = lowest; above -= hm[lowest]; }  // (rounding) the whole range stays
          sh[0] = sel;
          sh[1] = hc[sel];
          su[0] = above;
          su[1] = hm[sel];
        }
        __syncthreads();
        prefix |= (unsigned)sh[0] << shift;
        mask |= 255u << shift;
        above = su[0];
        __syncthreads();
      }
      // the entries with the boundary key (all the same mass e): keep the first n by index
      if (threadIdx.x == 0) {
        const int ceq = sh[1];
        const unsigned long long e = su[1] / (unsigned long long)ceq;
        int n = 1;
        while (n < ceq && (double)(above + (unsigned long long)n * e) < P) ++n;
        sh[3] = n;
        sh[4] = ceq;
      }
      __syncthreads();
      const int n = sh[3], ceq = sh[4];
      __syncthreads();
      if (n < ceq) {
        const unsigned kk = prefix, ok = kkey;
        const int oi = kidx;
        kidx = (int)~mk_smp_nth(V, n, [&](int i, unsigned& k) {
          const unsigned kv = mk_smp_key(mk_smp_logit(row, f32, i));
          if (kv != kk || !(kv > ok || (kv == ok && i <= oi))) return false;
          k = ~(unsigned)i;
          return true;
        }, hc, sh, &rank, &count);
      } else if (prefix != kkey) {
        kidx = V;
      }
      kkey = prefix;
    }
    // 4. Gumbel-max over the kept entries: z + g, g = -log(-log(u)), u from splitmix64(seed, position, index)
    const unsigned long long key = mk_smp_mix(mk_smp_mix(seed) ^ (unsigned long long)(unsigned)pos);
    best = MK_SMP_NEG_INF;
    bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += MK_NT) {
      const float v = mk_smp_logit(row, f32, i);
      const unsigned k = mk_smp_key(v);
      if (!(k > kkey || (k == kkey && i <= kidx))) continue;
      const unsigned long long h = mk_smp_mix(key ^ (unsigned long long)i);
      const double u = ((double)(h >> 11) + 0.5) * 1.1102230246251565e-16;  // 2^-53
      const double score = (double)v / temp - log(-log(u));
      if (score > best) { best = score; bi = i; }
    }
    mk_smp_argmax(best, bi, sv, si);
    token = bi;
  }
  return token;
}

__device__ void mk_sample(const MkTask& t, int it, int B, char* smem) {
  if (!mk_block_wait(t)) return;
  const int b = t.a[17];
  if (b >= B) return;
  const int f32 = t.a[19];
  const void* row = (const char*)t.p[0] + (size_t)b * t.a[20] * (f32 ? 4 : 2);
  const int token = mk_sample_row(row, f32, t.a[16], mk_smp_f64(t, 21), t.a[23], mk_smp_f64(t, 24),
                                  mk_smp_u64(t, 26), __ldcg((const int*)t.p[3] + b), smem);
  if (threadIdx.x == 0) {
    ((int*)t.p[1])[b] = token;
    ((int*)t.p[2])[(size_t)(it - 1) * t.a[18] + b] = token;
  }
}
