"""Device benchmark of the superoptimizer's found programs as megakernel task bodies (issue 5).

For every program in ``bench/superopt_programs.json`` (the search's winners at the examples' real sizes,
written here by ``--export``), this builds the generic task body (passes/superopt/cuda.py) with its
``MkTask`` adapter and a persistent mini kernel of the megakernel's task contract (codegen/mk_runtime.cuh,
512 threads, one CTA per SM walking the task list), and

* checks it against a NumPy float64 reference of the subgraph on fresh random bf16 inputs, outputs
  poisoned (NaN) first: relative error ||out - ref|| / ||ref|| < 1e-2;
* times it (CUDA events, L2 flushed before every run) against the unfused equivalent: one simple
  hand-written CUDA kernel per operator of the subgraph (and PyTorch eager when torch with CUDA imports),
  and against the HBM floor (compulsory bytes / 3.0e12 B/s).

Run on one H100 (needs CuPy + numpy + mpkir; no z3):
    python bench/superopt_bench.py --out superopt_h100.json
``--dry-run`` does everything but the GPU: emit, ``nvcc -gencode arch=compute_90a,code=sm_90a`` compile,
and the emitted bodies run as C++ on the CPU at the real sizes (where cheap) against float64.
``--export`` (needs z3; not on the device) re-runs the search on the examples and rewrites the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "bench" / "superopt_programs.json"
HBM_BW = 3.0e12
EXAMPLES = ("qwen3_0_6b", "llama3_2_1b")


def _bootstrap() -> None:
    """Map mpkir.passes / mpkir.codegen onto the checkout when mpkir is not pip-installed (package-dir)."""
    try:
        import mpkir.passes.superopt.cuda

        return
    except ImportError:
        pass
    import importlib.util

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import mpkir

    for name, sub in (
        ("mpkir.passes", "passes"),
        ("mpkir.passes.superopt", "passes/superopt"),
        ("mpkir.codegen", "codegen"),
    ):
        spec = importlib.util.spec_from_file_location(
            name, ROOT / sub / "__init__.py", submodule_search_locations=[str(ROOT / sub)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    assert mpkir


_bootstrap()


def _sg(e):
    from mpkir.passes.superopt.targets import Subgraph

    return Subgraph(
        e["kind"], tuple(e["covers"]), tuple(e["dims"].items()), tuple(e["consts"].items()), e["outs"]
    )


def _write_json(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent) or ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, default=float)
        fh.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ export (search; here, not on the device)
def export(models=EXAMPLES, budget=30.0) -> list[dict]:
    from mpkir.parser import parse_file
    from mpkir.passes.superopt.partition import partition
    from mpkir.passes.superopt.program import print_fused
    from mpkir.passes.superopt.search import VERSION, cached_search
    from mpkir.verify import analyze

    out, seen = [], set()
    for name in models:
        m, _ = parse_file(str(ROOT / "examples" / f"{name}.mpk"))
        for sg in partition(m, analyze(m)):
            key = (sg.kind, sg.dims, sg.consts)
            if key in seen:
                continue
            seen.add(key)
            r = cached_search(sg, budget_s=budget)
            applied, why = r.decision
            out.append(
                {
                    "model": name,
                    "version": VERSION,
                    "kind": sg.kind,
                    "covers": list(sg.covers),
                    "dims": dict(sg.dims),
                    "consts": dict(sg.consts),
                    "outs": sg.outs,
                    "program": print_fused(r.program),
                    "choice": "; ".join(r.notes),
                    "predicted_us": r.cost["time_ns"] / 1000,
                    "unfused_predicted_us": r.baseline["time_ns"] / 1000,
                    "handwritten": {
                        "body": r.handwritten["body"],
                        "predicted_us": r.handwritten["time_ns"] / 1000,
                    },
                    "gain": r.gain,
                    "applied": applied,
                    "decision": why,
                    "proof": {
                        "finite_field": all(x["ok"] for x in r.proof["finite_field"]),
                        "z3": r.proof["z3"]["status"],
                        "float64_rel_err": r.proof.get("float64_rel_err"),
                    },
                }
            )
            print(f"exported {name} {sg.kind} {dict(sg.dims)}: {r.notes} gain {r.gain:.2f}x", flush=True)
    return out


# ------------------------------------------------------------------ reference and unfused kernels
def reference(e, ins: dict) -> np.ndarray:
    from mpkir.passes.superopt import interp
    from mpkir.passes.superopt.domains import Float
    from mpkir.passes.superopt.targets import target

    return interp.run_program(target(_sg(e)), ins, Float())["y"]


def random_inputs(e, rng) -> dict:
    from mpkir.passes.superopt.cpuexec import round_bf16
    from mpkir.passes.superopt.targets import inputs_of

    ins = {}
    for n, s in inputs_of(_sg(e)).items():
        x = rng.standard_normal(s)
        if n in ("w", "wd"):
            x *= 0.05
        if n == "g":
            x = 1.0 + 0.1 * x
        ins[n] = round_bf16(x)
    return ins


UNFUSED = r"""
#include <cuda_bf16.h>
#define NEG_INF (__int_as_float(0xff800000))
__device__ __forceinline__ float bf(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float wsum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float wmax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// one warp per row: out[r, :] = x[r, :] * rsqrt(mean(x^2) + eps) * g   (rows of length K)
extern "C" __global__ void u_rmsnorm(const __nv_bfloat16* x, const __nv_bfloat16* g, __nv_bfloat16* out,
                                     int rows, int K, float eps) {
  const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= rows) return;
  float s = 0.f;
  for (int i = lane; i < K; i += 32) { float v = bf(x + (size_t)r * K + i); s += v * v; }
  const float rs = rsqrtf(wsum(s) / K + eps);
  for (int i = lane; i < K; i += 32)
    out[(size_t)r * K + i] = __float2bfloat16(bf(x + (size_t)r * K + i) * rs * bf(g + i));
}
extern "C" __global__ void u_silu_mul(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* out,
                                      int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float x = bf(a + i);
    out[i] = __float2bfloat16(x / (1.f + __expf(-x)) * bf(b + i));
  }
}
// y[m, n] = sum_k x[m, k] w[n, k]: one warp per column n, all M rows (M <= 16), 16-byte loads of w
extern "C" __global__ void u_gemv(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y,
                                  int M, int N, int K) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  float acc[16];
  for (int m = 0; m < 16; ++m) acc[m] = 0.f;
  for (int k = lane * 8; k < K; k += 256) {
    uint4 v = *(const uint4*)(w + (size_t)n * K + k);
    const __nv_bfloat16* wv = (const __nv_bfloat16*)&v;
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 8; ++j) acc[m] += __bfloat162float(wv[j]) * bf(x + (size_t)m * K + k + j);
  }
  for (int m = 0; m < M; ++m) {
    float s = wsum(acc[m]);
    if (lane == 0) y[(size_t)m * N + n] = __float2bfloat16(s);
  }
}
// rope (neox halves): y = x * cos + rot_half(x) * sin; x [T, H, D], cos/sin [T, 1, D]
extern "C" __global__ void u_rope(const __nv_bfloat16* x, const __nv_bfloat16* c, const __nv_bfloat16* s,
                                  __nv_bfloat16* y, int T, int H, int D) {
  const int n = T * H * D;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int d = i % D, t = i / (H * D), h = D / 2;
    const float r = d < h ? -bf(x + i + h) : bf(x + i - h);
    y[i] = __float2bfloat16(bf(x + i) * bf(c + t * D + d) + r * bf(s + t * D + d));
  }
}
// scores[g, n] = scale * q[g, :] . k[n, :]   (one warp per key n, all G rows)
extern "C" __global__ void u_scores(const __nv_bfloat16* q, const __nv_bfloat16* k, float* s, int G, int N,
                                    int D, float scale) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  for (int g = 0; g < G; ++g) {
    float a = 0.f;
    for (int d = lane; d < D; d += 32) a += bf(q + g * D + d) * bf(k + (size_t)n * D + d);
    a = wsum(a);
    if (lane == 0) s[(size_t)g * N + n] = a * scale;
  }
}
// softmax over each row of s (one block per row), in place
extern "C" __global__ void u_softmax(float* s, int N) {
  __shared__ float red[32];
  float* row = s + (size_t)blockIdx.x * N;
  float m = NEG_INF;
  for (int i = threadIdx.x; i < N; i += blockDim.x) m = fmaxf(m, row[i]);
  m = wmax(m);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  m = NEG_INF;
  for (int w = 0; w < blockDim.x / 32; ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  float l = 0.f;
  for (int i = threadIdx.x; i < N; i += blockDim.x) { float p = __expf(row[i] - m); row[i] = p; l += p; }
  l = wsum(l);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = l;
  __syncthreads();
  l = 0.f;
  for (int w = 0; w < blockDim.x / 32; ++w) l += red[w];
  for (int i = threadIdx.x; i < N; i += blockDim.x) row[i] /= l;
}
// y[g, d] = sum_n p[g, n] v[n, d]   (one block per g, threads over d, split over n and reduced)
extern "C" __global__ void u_pv(const float* p, const __nv_bfloat16* v, __nv_bfloat16* y, int G, int N,
                                int D) {
  __shared__ float part[1024];
  const int g = blockIdx.x, d = threadIdx.x % D, j0 = threadIdx.x / D, nj = blockDim.x / D;
  float a = 0.f;
  for (int n = j0; n < N; n += nj) a += p[(size_t)g * N + n] * bf(v + (size_t)n * D + d);
  part[threadIdx.x] = a;
  __syncthreads();
  if (j0 == 0) {
    for (int j = 1; j < nj; ++j) a += part[j * D + d];
    y[g * D + d] = __float2bfloat16(a);
  }
}
"""


class _Gpu:
    def __init__(self, cp):
        self.cp = cp
        self.props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        self.sms = self.props["multiProcessorCount"]
        name = self.props["name"]
        self.name = name.decode() if isinstance(name, bytes) else name
        self.flush = cp.empty(256 << 20, dtype=cp.uint8)  # > 50 MB L2

    def bf16(self, x: np.ndarray):
        from mpkir.passes.superopt.cpuexec import to_bf16

        return self.cp.asarray(to_bf16(x))

    def time(self, fn, reps: int) -> float:
        """Median µs of ``fn`` over ``reps`` runs, L2 flushed before each."""
        cp = self.cp
        fn()
        cp.cuda.Device().synchronize()
        ts = []
        for _ in range(reps):
            self.flush.fill(1)
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b) * 1000)
        return float(np.median(ts))


def _task_array(body, ptrs: list[int]) -> np.ndarray:
    """MkTask[ntasks] (224 bytes each): p[0..] the body's pointers, a[16] the tile index, no waits."""
    dt = np.dtype([("p", np.int64, 12), ("a", np.int32, 32)])
    assert dt.itemsize == 224
    t = np.zeros(body.ntasks, dt)
    t["p"][:, : len(ptrs)] = ptrs
    t["a"][:, 16] = np.arange(body.ntasks)
    return t


def _unfused_fn(g, mod, e, dev: dict, out):
    """The subgraph as one kernel per operator (float32 intermediates where the op produces scores)."""
    cp = g.cp
    d = e["dims"]
    k = {
        n: mod.get_function(n)
        for n in ("u_rmsnorm", "u_silu_mul", "u_gemv", "u_rope", "u_scores", "u_softmax", "u_pv")
    }
    i32, f32 = np.int32, np.float32
    if e["kind"] == "norm_linear":
        M, K, N = d["M"], d["K"], d["N"]
        xn = cp.empty((M, K), cp.uint16)

        def fn():
            k["u_rmsnorm"](
                ((M + 7) // 8,), (256,), (dev["x"], dev["g"], xn, i32(M), i32(K), f32(e["consts"]["eps"]))
            )
            k["u_gemv"](((N + 7) // 8,), (256,), (xn, dev["w"], out, i32(M), i32(N), i32(K)))

    elif e["kind"] == "act_down":
        M, F, H = d["M"], d["F"], d["H"]
        h = cp.empty((M, F), cp.uint16)

        def fn():
            k["u_silu_mul"](((M * F + 255) // 256,), (256,), (dev["gate"], dev["up"], h, i32(M * F)))
            k["u_gemv"](((H + 7) // 8,), (256,), (h, dev["wd"], out, i32(M), i32(H), i32(F)))

    elif e["kind"] == "headnorm_rope":
        T, Hh, D = d["T"], d["Hh"], d["D"]
        xn = cp.empty((T, Hh, D), cp.uint16)
        rows = T * Hh

        def fn():
            k["u_rmsnorm"](
                ((rows + 7) // 8,),
                (256,),
                (dev["x"], dev["g"], xn, i32(rows), i32(D), f32(e["consts"]["eps"])),
            )
            k["u_rope"](
                ((rows * D + 255) // 256,), (256,), (xn, dev["cos"], dev["sin"], out, i32(T), i32(Hh), i32(D))
            )

    else:
        G, D, N = d["G"], d["D"], d["N"]
        s = cp.empty((G, N), cp.float32)

        def fn():
            k["u_scores"](
                ((N + 7) // 8,),
                (256,),
                (dev["q"], dev["k"], s, i32(G), i32(N), i32(D), f32(e["consts"]["scale"])),
            )
            k["u_softmax"]((G,), (512,), (s, i32(N)))
            k["u_pv"]((G,), (1024 // D * D,), (s, dev["v"], out, i32(G), i32(N), i32(D)))

    return fn


def _torch_fn(e, host_ins):
    try:
        import torch

        if not torch.cuda.is_available():
            return None
    except Exception:
        return None
    t = {
        n: torch.tensor(v, dtype=torch.float32, device="cuda").to(torch.bfloat16) for n, v in host_ins.items()
    }
    d, c = e["dims"], e["consts"]
    kind = e["kind"]
    F = torch.nn.functional

    def rms(x, g, eps):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * g

    if kind == "norm_linear":
        return lambda: F.linear(rms(t["x"], t["g"], c["eps"]), t["w"])
    if kind == "act_down":
        return lambda: F.linear(F.silu(t["gate"]) * t["up"], t["wd"])
    if kind == "headnorm_rope":
        h = d["D"] // 2

        def rope():
            x = rms(t["x"], t["g"], c["eps"])
            return x * t["cos"] + torch.cat([-x[..., h:], x[..., :h]], -1) * t["sin"]

        return rope
    return lambda: torch.softmax((t["q"] @ t["k"].T).float() * c["scale"], -1).to(torch.bfloat16) @ t["v"]


def build_source(entries) -> tuple[str, list]:
    from mpkir.passes.superopt.cuda import emit_task_module
    from mpkir.passes.superopt.program import parse_fused

    fs = [(f"e{i}_", parse_fused(e["program"])) for i, e in enumerate(entries)]
    src, bodies = emit_task_module(fs)
    per = []
    for i, _ in enumerate(entries):
        per.append([b for b in bodies if b.func.startswith(f"so_e{i}_")])
    return src, per


def nvcc_compile(src: str, tmp: str) -> tuple[bool, str, float]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return False, "nvcc not installed", 0.0
    cu = os.path.join(tmp, "superopt_bench.cu")
    Path(cu).write_text(src)
    t = time.monotonic()
    r = subprocess.run(
        [nvcc, "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-c", cu, "-o", cu + ".o"],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0, r.stderr[-3000:], time.monotonic() - t


def _macs(e) -> int:
    d = e["dims"]
    return {
        "norm_linear": lambda: d["M"] * d["K"] * d["N"],
        "act_down": lambda: d["M"] * d["F"] * d["H"],
        "headnorm_rope": lambda: d["T"] * d["Hh"] * d["D"],
        "decode_attention": lambda: 2 * d["G"] * d["N"] * d["D"],
    }[e["kind"]]()


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64).reshape(np.shape(b))
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def dry_run(entries, cpu_macs: int) -> list[dict]:
    from mpkir.passes.superopt.cpuexec import compiler, run_emitted
    from mpkir.passes.superopt.program import parse_fused

    rows = []
    src, per = build_source(entries)
    with tempfile.TemporaryDirectory() as tmp:
        ok, err, secs = nvcc_compile(src, tmp)
        uok, uerr, _ = nvcc_compile(UNFUSED, tmp)
    print(f"nvcc sm_90a of the unfused kernels: {'ok' if uok else 'FAILED'}")
    if not uok and "not installed" not in uerr:
        print(uerr)
    ok = ok and uok
    print(
        f"nvcc sm_90a: {'ok' if ok else 'FAILED'} ({secs:.1f}s, {len(src)} chars, "
        f"{sum(map(len, per))} bodies)"
    )
    if not ok and "not installed" not in err:
        print(err)
    rng = np.random.default_rng(int(time.time()))
    for e, bodies in zip(entries, per, strict=True):
        row = {
            "model": e["model"],
            "kind": e["kind"],
            "dims": e["dims"],
            "nvcc": ok,
            "smem": [b.smem_bytes for b in bodies],
            "tasks": [b.ntasks for b in bodies],
        }
        if compiler() and _macs(e) <= cpu_macs:
            ins = random_inputs(e, rng)
            got = run_emitted(parse_fused(e["program"]), ins)["y"]
            row["cpu_rel_err"] = rel_err(got, reference(e, ins))
        rows.append(row)
        print(
            f"{e['model']:12s} {e['kind']:16s} {json.dumps(e['dims']):40s} "
            f"tasks {row['tasks']} smem {row['smem']} "
            f"cpu rel err {row.get('cpu_rel_err', float('nan')):.2e}",
            flush=True,
        )
    return rows


def _bench_entry(g, mod, umod, e, bodies, rng, reps) -> dict:
    """Check then time one found program (its task bodies in persistent mini kernels) and its unfused ops."""
    from mpkir.passes.superopt.cpuexec import from_bf16
    from mpkir.passes.superopt.cuda import hbm_bytes
    from mpkir.passes.superopt.program import parse_fused

    cp = g.cp
    f = parse_fused(e["program"])
    ins = random_inputs(e, rng)
    ref = reference(e, ins)
    dev = {n: g.bf16(v) for n, v in ins.items()}
    bufs = dict(dev)
    launches = []
    for b in bodies:
        for q in b.params:
            if q.output:  # poisoned: a tile the body forgets to write shows up as NaN
                bufs[q.name] = (
                    cp.full(q.shape, 0x7FC0, cp.uint16)
                    if q.dtype == "bf16"
                    else cp.full(q.shape, cp.nan, cp.float32)
                )
        tasks = cp.asarray(_task_array(b, [bufs[q.name].data.ptr for q in b.params]).view(np.uint8))
        fn = mod.get_function(f"run_{b.func}")
        fn.max_dynamic_shared_size_bytes = b.smem_bytes
        launches.append((fn, min(b.ntasks, g.sms), tasks, b.ntasks, b.smem_bytes))

    def fused():
        for fn, grid, tasks, n, sm in launches:
            fn((grid,), (512,), (tasks, np.int32(n)), shared_mem=sm)

    fused()
    cp.cuda.Device().synchronize()
    err = rel_err(from_bf16(cp.asnumpy(bufs["y"])), ref)
    uout = cp.full(ref.shape, 0x7FC0, cp.uint16)
    ufn = _unfused_fn(g, umod, e, dev, uout)
    ufn()
    cp.cuda.Device().synchronize()
    uerr = rel_err(from_bf16(cp.asnumpy(uout)), ref)
    t_f = g.time(fused, reps)
    t_u = g.time(ufn, reps)
    t_t = None
    try:
        tfn = _torch_fn(e, ins)
        t_t = g.time(tfn, reps) if tfn else None
    except Exception as ex:  # torch is optional
        print(f"  (torch eager skipped: {ex!r})")
    floor = hbm_bytes(f) / HBM_BW * 1e6
    row = {
        "model": e["model"],
        "kind": e["kind"],
        "dims": e["dims"],
        "choice": e["choice"],
        "tasks": [b.ntasks for b in bodies],
        "smem": [b.smem_bytes for b in bodies],
        "rel_err": err,
        "ok": err < 1e-2,
        "unfused_rel_err": uerr,
        "found_us": t_f,
        "unfused_us": t_u,
        "torch_eager_us": t_t,
        "floor_us": floor,
        "speedup_vs_unfused": t_u / t_f,
        "predicted_us": e["predicted_us"],
        "predicted_gain": e["gain"],
        "handwritten_predicted_us": e["handwritten"]["predicted_us"],
        "applied_by_cost_model": e["applied"],
        "decision": e["decision"],
    }
    print(
        f"{e['model']:12s} {e['kind']:16s} err {err:.1e} {'ok ' if row['ok'] else 'BAD'} "
        f"found {t_f:8.1f} us  unfused {t_u:8.1f} us  "
        f"torch {t_t if t_t is None else round(t_t, 1)!s:>8} us  floor {floor:7.2f} us  "
        f"x{t_u / t_f:.2f} (predicted x{e['gain']:.2f})",
        flush=True,
    )
    return row


def device_run(entries, reps: int) -> dict:
    import cupy as cp

    g = _Gpu(cp)
    src, per = build_source(entries)
    t0 = time.monotonic()
    mod = cp.RawModule(code=src, options=("--gpu-architecture=sm_90a", "-std=c++17"), backend="nvrtc")
    umod = cp.RawModule(code=UNFUSED, options=("--gpu-architecture=sm_90a", "-std=c++17"), backend="nvrtc")
    for m, name in ((mod, f"run_{per[0][0].func}"), (umod, "u_gemv")):
        m.get_function(name)  # compiles the module (NVRTC, sm_90a; CuPy caches the binary on disk)
    print(f"{g.name}, {g.sms} SMs; NVRTC compile {time.monotonic() - t0:.1f}s", flush=True)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    rows = []
    for e, bodies in zip(entries, per, strict=True):
        try:
            row = _bench_entry(g, mod, umod, e, bodies, rng, reps)
        except Exception as ex:  # keep going: the JSON records what failed and why
            row = {"model": e["model"], "kind": e["kind"], "dims": e["dims"], "ok": False, "error": repr(ex)}
            print(f"{e['model']:12s} {e['kind']:16s} ERROR {ex!r}", flush=True)
        rows.append(row)
    return {
        "device": g.name,
        "sms": g.sms,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="superopt_bench.json", help="JSON results path")
    ap.add_argument("--programs", default=str(PROGRAMS))
    ap.add_argument("--dry-run", action="store_true", help="emit + nvcc compile + CPU check; no GPU")
    ap.add_argument("--export", action="store_true", help="re-run the search on the examples (needs z3)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--cpu-macs", type=float, default=5e7, help="dry run: CPU-check programs up to this size")
    ap.add_argument("--only", default="", help="comma-separated kinds to keep")
    a = ap.parse_args(argv)
    if a.export:
        _write_json(Path(a.programs), export())
        return 0
    entries = json.loads(Path(a.programs).read_text())
    if a.only:
        entries = [e for e in entries if e["kind"] in a.only.split(",")]
    t0 = time.monotonic()
    if a.dry_run:
        rows = dry_run(entries, int(a.cpu_macs))
        res = {"dry_run": True, "rows": rows}
        bad = [r for r in rows if not r["nvcc"] or r.get("cpu_rel_err", 0.0) >= 1e-2]
    else:
        res = device_run(entries, a.reps)
        bad = [r for r in res["rows"] if not r["ok"]]
    res["seconds"] = time.monotonic() - t0
    _write_json(Path(a.out), res)
    print(f"wrote {a.out} ({res['seconds']:.1f}s); {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
