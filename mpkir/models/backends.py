"""Step functions for the engine: the compiled ``.mpk`` graph on the CPU (NumPy interpreter) and,
when the runtime provides it, on the GPU (megakernel).

The example graphs end in ``argmax``/``sample`` and return token ids; :func:`logits_module` rewrites
the entry graph to return the logits feeding that op instead, so the engine can sample each request
with its own settings and verify speculative drafts.  Everything before that op is unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from mpkir import ir
from mpkir.diagnostics import error

PARAM_NAMES = {
    "tokens": ("tokens", "token_ids", "ids", "input_ids"),
    "positions": ("positions", "pos", "position_ids"),
    "seq_ids": ("seq_ids", "seq", "request_ids", "slots"),
    "page_table": ("page_table", "pages", "block_table"),
}


def _type_expr(t: ir.TensorType) -> ir.TypeExpr:
    return ir.TypeExpr(t.dtype, tuple(ir.Name(d) if isinstance(d, str) else ir.Num(d) for d in t.shape))


def logits_module(module: ir.Module, analysis, graph: str | None = None) -> tuple[ir.Module, bool]:
    """(module whose entry graph returns logits, whether it changed).

    When the returned value is computed by ``argmax``/``sample`` at the top level of the graph, that
    op is dropped and its first operand is returned instead.
    """
    g = module.graph(graph)
    ret = g.body[-1]
    if not isinstance(ret, ir.ReturnStmt) or len(ret.values) != 1:
        return module, False
    name = ret.values[0].name
    producer = next((s for s in g.body if isinstance(s, ir.OpStmt) and name in s.results), None)
    if (
        producer is None
        or producer.op not in ("argmax", "sample")
        or not isinstance(producer.operands[0], ir.ValueRef)
    ):
        return module, False
    logits = producer.operands[0].name
    t = analysis.graphs[g.name].types.get(logits)
    if t is None:
        return module, False
    body = (*tuple(s for s in g.body[:-1] if s is not producer), ir.ReturnStmt((ir.ValueRef(logits),)))
    ng = dataclasses.replace(g, body=body, result_types=(_type_expr(t),))
    decls = tuple(ng if d is g else d for d in module.decls)
    return dataclasses.replace(module, decls=decls), True


def _bind_params(g: ir.GraphDecl) -> dict[str, str]:
    """Engine input → graph parameter name, by name, else by position (tokens, positions, seq_ids, table)."""
    names = [p.name for p in g.params]
    out: dict[str, str] = {}
    for role, options in PARAM_NAMES.items():
        hit = next((n for n in options if n in names), None)
        if hit is not None:
            out[role] = hit
    if len(out) < 4 and len(names) == 4:
        out = dict(zip(PARAM_NAMES, names, strict=False))
    if len(out) < 4:
        raise error(
            f"graph '{g.name}' takes ({', '.join('%' + n for n in names)}); the engine needs "
            "tokens, positions, seq_ids and page_table (paged_attention's operands)",
            g.loc,
        )
    return out


class InterpreterBackend:
    """Runs the module's entry graph with the NumPy interpreter, keeping the KV cache between steps.

    ``float_storage="f32"`` keeps every float value in float32 (no bf16 rounding between ops).
    """

    def __init__(
        self,
        module: ir.Module,
        analysis,
        weights: Mapping[str, np.ndarray],
        float_storage: str | None = None,
        graph: str | None = None,
    ):
        from mpkir.interpreter import init_state
        from mpkir.verify import verify

        module2, changed = logits_module(module, analysis, graph)
        if changed:
            analysis = verify(module2)
        self.module = module2
        self.analysis = analysis
        self.graph = module2.graph(graph)
        self.params = _bind_params(self.graph)
        self.weights = dict(weights)
        self.float_storage = float_storage
        self.state = init_state(module2, analysis)
        if float_storage == "f32":  # the KV cache in float32 too (the declared bf16 would round k/v)
            self.state = {k: v.astype(np.float32) if v.dtype.kind == "V" or v.dtype.itemsize == 2 else v
                          for k, v in self.state.items()}
        ptype = analysis.graphs[self.graph.name].types[self.params["page_table"]]
        self.table_shape = tuple(
            int(d) if not isinstance(d, str) else analysis.env.dims[d] for d in ptype.shape
        )
        t = analysis.graphs[self.graph.name].types[self.params["tokens"]]
        self.max_tokens = analysis.env.dims[t.shape[0]] if isinstance(t.shape[0], str) else int(t.shape[0])
        # float logits, also from a graph that already returns them (unchanged by logits_module)
        ret = self.graph.body[-1]
        types = analysis.graphs[self.graph.name].types
        out_t = types.get(ret.values[0].name) if isinstance(ret, ir.ReturnStmt) and ret.values else None
        self.returns_logits = changed or (out_t is not None and out_t.dtype.value in ("bf16", "f16", "f32"))

    def step(self, tokens, positions, seq_ids, page_table) -> np.ndarray:
        from mpkir.interpreter import run_graph

        T = len(tokens)
        if self.max_tokens < T:
            raise ValueError(f"step of {T} tokens exceeds the graph's bound {self.max_tokens}")
        rows, cols = self.table_shape
        table = np.zeros((rows, cols), np.int32)
        pt = np.asarray(page_table, np.int32)
        table[: min(rows, pt.shape[0]), : min(cols, pt.shape[1])] = pt[:rows, :cols]
        p = self.params
        inputs = {
            p["tokens"]: np.asarray(tokens, np.int32),
            p["positions"]: np.asarray(positions, np.int32),
            p["seq_ids"]: np.asarray(seq_ids, np.int32),
            p["page_table"]: table,
        }
        kw = {"graph": self.graph.name, "analysis": self.analysis}
        if self.float_storage:
            kw["float_storage"] = self.float_storage
        outs = run_graph(self.module, inputs, self.weights, self.state, **kw)
        out = outs[0] if isinstance(outs, (list, tuple)) else outs
        out = np.asarray(out)
        return out.astype(np.float32) if self.returns_logits else out.astype(np.int64)


def gpu_available() -> bool:
    """Whether a CUDA device and CuPy are usable here."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


GPU_BACKENDS = ("resident", "step")
DEFAULT_GPU_BACKEND = "resident"  # measured not slower and token-identical (bench/RESULTS.md)
# the resident kernel draws the tokens itself: the host path's tokens, 238 vs 39 tokens/s at batch 1 and 989
# vs 43 at batch 8 (Llama-3.2-1B, H100, bench/RESULTS.md); allocating KV pages itself gained nothing (off)
DEFAULT_KERNEL_SAMPLING = True
DEFAULT_KERNEL_PAGES = False


def _switch(value: bool | None, env: str, default: bool) -> bool:
    """An on/off choice: ``value`` when given, else the environment's ``env`` ("0"/"1"), else ``default``."""
    if value is not None:
        return value
    v = os.environ.get(env, "").strip().lower()
    if v in ("", "auto"):
        return default
    if v not in ("0", "1", "off", "on", "false", "true"):
        raise error(f"{env}={v!r}: expected 0 or 1 (or off/on, false/true)")
    return v in ("1", "on", "true")


def make_backend(
    loaded,
    device: str = "cpu",
    float_storage: str | None = None,
    gpu_backend: str | None = None,
    greedy_only: bool = False,
    kernel_sampling: bool | None = None,
    kernel_pages: bool | None = None,
    numerics: str = "fast",
):
    """The step function for a :class:`~mpkir.models.loader.LoadedModel` on ``cpu`` or ``gpu``.

    ``gpu_backend``: ``resident`` (one megakernel launch serves every step) or ``step`` (one launch per
    step); default: the environment's ``MPKIR_GPU_BACKEND``, else :data:`DEFAULT_GPU_BACKEND`.
    ``greedy_only``: every request will be greedy, so the resident kernel returns each row's argmax id
    instead of the logits (no [T, V] copy back, no host argmax). ``kernel_sampling``: the resident kernel
    draws every request's token itself with the request's parameters (``mk_sample_row``, the ``sample``
    operator's semantics) and returns ids; ``kernel_pages``: the resident kernel allocates and frees the KV
    pages itself (``codegen/mk_pages.cuh``; the engine only counts them). Unset: ``$MPKIR_KERNEL_SAMPLING``
    / ``$MPKIR_KERNEL_PAGES`` ("0" or "1"), else :data:`DEFAULT_KERNEL_SAMPLING` /
    :data:`DEFAULT_KERNEL_PAGES`. ``numerics``: the GPU kernel's (``codegen.lower.NUMERICS``: ``fast``, or
    ``exact`` for the bf16 values of a float64 reference); the CPU path has its own."""
    if numerics != "fast" and device != "gpu":
        raise error(f"numerics {numerics!r} is a GPU kernel setting: use the GPU (the CPU path computes in "
                    "float32, or in bf16 with --precision bf16)")
    if device == "gpu":
        try:
            from mpkir.runtime import host  # the megakernel runtime (issue 4)
        except ImportError as e:
            raise error(f"GPU generation needs the megakernel runtime (mpkir.runtime.host): {e}") from e
        factory = getattr(host, "make_step_backend", None)
        if factory is None:
            raise error(
                "the megakernel runtime has no step backend yet "
                "(mpkir.runtime.host.make_step_backend); use --device cpu"
            )
        kind = gpu_backend or os.environ.get("MPKIR_GPU_BACKEND") or DEFAULT_GPU_BACKEND
        if kind not in GPU_BACKENDS:
            raise error(f"unknown GPU backend '{kind}' (choose from {', '.join(GPU_BACKENDS)})")
        if kind == "resident":
            kernel_sampling = _switch(kernel_sampling, "MPKIR_KERNEL_SAMPLING", DEFAULT_KERNEL_SAMPLING)
            kernel_pages = _switch(kernel_pages, "MPKIR_KERNEL_PAGES", DEFAULT_KERNEL_PAGES)
            output = "ids" if greedy_only else ("sample" if kernel_sampling else "logits")
            return factory(loaded.module, loaded.analysis, loaded.weights, resident=True, output=output,
                           kernel_pages=kernel_pages, numerics=numerics)
        return factory(loaded.module, loaded.analysis, loaded.weights, numerics=numerics)
    return InterpreterBackend(loaded.module, loaded.analysis, loaded.weights, float_storage=float_storage)
