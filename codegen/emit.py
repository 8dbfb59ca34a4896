"""Write the megakernel of a :class:`~mpkir.codegen.lower.Plan` as one self-contained CUDA C++ source."""

from __future__ import annotations

from importlib import resources

from mpkir.codegen.lower import NT, Plan

_HEADERS = ("mk_runtime.cuh", "mk_tasks.cuh")


def _read(name: str) -> str:
    return resources.files("mpkir.codegen").joinpath(name).read_text(encoding="utf-8")


def _strip_once(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.strip() != "#pragma once")


def emit_cuda(plan: Plan) -> str:
    """The whole program as CUDA C++: runtime, the task bodies, a dispatch over the plan's variants."""
    out = [
        f"// mpkir megakernel for model '{plan.model}': {len(plan.ops)} ops, "
        f"{plan.num_sms} workers x {NT} threads, {plan.smem_bytes} B dynamic shared memory",
        f"#define MK_NT {NT}",
    ]
    for h in _HEADERS:
        out.append(f"// ---- {h}")
        out.append(_strip_once(_read(h)))
    out.append("// ---- dispatch over the task variants this program uses")
    out.append("__device__ __forceinline__ void mk_dispatch(const MkTask& t, int it, int B, char* smem) {")
    out.append("  switch (t.a[0]) {")
    for i, v in enumerate(plan.variants):
        out.append(f"    case {i}: {v}(t, it, B, smem); break;")
    out.append("    default: break;")
    out.append("  }")
    out.append("}")
    out.append("// ---- mk_kernel.cuh")
    out.append(_strip_once(_read("mk_kernel.cuh")))
    return "\n".join(out) + "\n"
