"""The NumPy reference interpreter: runs a graph of a verified module on the CPU.

Every later stage (passes, the task-graph simulator, the megakernel) is compared with it.

Numerics
    Each operator's reference (``OpDef.reference``) computes in float64 and rounds its results to
    float32 once; the interpreter then rounds every float result to its declared dtype (bf16 through
    ml-dtypes), or keeps it in float32 when ``float_storage="f32"``.  Weights are widened bf16 → f32
    once per weight per call (callers may pass float32 weights to skip that).

Bit-exactness with tiled execution
    Every reduction of the norm, softmax, linear and attention references runs per row along the last
    axis of a C-contiguous float64 array: a tile that computes some rows (tokens, heads, output
    columns) of an op with the same references gets the same float32 bits as this interpreter in
    ``float_storage="f32"`` mode.  A split reduction (split-K partial sums, split-KV partial softmax)
    kept in float64 and merged in a fixed order differs from the whole float64 reduction by a few
    float64 ulps, so its float32 result is the same except when that difference straddles a float32
    rounding boundary: no fixed order can exclude this (tests/test_simulator.py has a counterexample
    for each), but it was never seen on random inputs.

Loops run as loops (no unroll pass needed); values defined inside iteration ``L`` are recorded as
``name.L`` (nested: ``name.L1.L2``), the names the unroll pass gives them.  State tensors (KV caches)
are mutated in place.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError, Span, part
from mpkir.ops.base import OpDef, RefCtx
from mpkir.ops.registry import OPS
from mpkir.semantics import Env, eval_int, resolve_attr


class RunError(MpkError, ValueError):
    """Bad inputs, weights or state for a run (located at the parameter or op when possible)."""

    def __init__(self, message: str, span: Span | None = None):
        super().__init__(Diagnostic(message, span))


def _count(d: ir.WeightDecl | ir.StateDecl, env: Env) -> int | None:
    return None if d.index is None else eval_int(d.index.count, env, f"layer count of '{d.name}'")


def _layers(d, env: Env) -> list[int | None]:
    n = _count(d, env)
    return [None] if n is None else list(range(n))


def _concrete(t: ir.TensorType, what: str) -> tuple[int, ...]:
    if any(isinstance(x, str) for x in t.shape):
        raise RunError(f"{what} has a symbolic shape {t}")
    return tuple(int(x) for x in t.shape)


def _random_tensor(rng: np.random.Generator, name: str, t: ir.TensorType) -> np.ndarray:
    shape = _concrete(t, f"weight '{name}'")
    if not t.dtype.is_float:
        hi = 16 if t.dtype is ir.DType.u8 else 8
        return rng.integers(0, hi, size=shape).astype(t.dtype.numpy)
    noise = rng.standard_normal(shape, dtype=np.float32)
    norm_like = len(shape) == 1 and "bias" not in name.lower()  # norm weights: around 1
    vals = 1.0 + 0.1 * noise if norm_like else 0.02 * noise
    return vals.astype(t.dtype.numpy)


def random_weights(module: ir.Module, analysis, seed: int = 0) -> dict[str, np.ndarray]:
    """{checkpoint name: random array in the storage dtype} for every weight (and layer) of the module.

    Matrices are N(0, 0.02²); vectors are 1 + N(0, 0.1²) (norm weights) or N(0, 0.02²) when the name says
    ``bias``.  Each tensor's values depend only on (seed, checkpoint name); declarations that share a
    checkpoint name (tied embeddings) share one array.
    """
    out: dict[str, np.ndarray] = {}
    for d in module.weights:
        t = analysis.globals[d.name]
        for layer in _layers(d, analysis.env):
            name = d.checkpoint_name(layer)
            if name in out:
                if out[name].shape != _concrete(t, f"weight '{d.name}'"):
                    raise RunError(f"weights bound to '{name}' disagree in shape: {out[name].shape} vs {t}",
                                   d.loc)
                continue
            rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode())])
            out[name] = _random_tensor(rng, name, t)
    return out


def init_state(module: ir.Module, analysis) -> dict[tuple[str, int | None], np.ndarray]:
    """{(state name, layer or None): zeros in the storage dtype} for every state tensor."""
    out: dict[tuple[str, int | None], np.ndarray] = {}
    for d in module.states:
        t = analysis.globals[d.name]
        for layer in _layers(d, analysis.env):
            out[(d.name, layer)] = np.zeros(_concrete(t, f"state '{d.name}'"), t.dtype.numpy)
    return out


# --------------------------------------------------------------------------- running a graph


class _Run:
    def __init__(self, module, analysis, graph, weights, state, f32_mode: bool, record):
        self.m = module
        self.a = analysis
        self.g = graph
        self.info = analysis.graphs[graph.name]
        self.weights = weights
        self.state = state
        self.f32 = f32_mode
        self.record = record
        self.dims: dict[str, int] = {}
        self.wcache: dict[str, np.ndarray] = {}  # checkpoint name -> float32 (or int) array, checked
        self.attr_cache: dict[int, dict[str, Any]] = {}

    # ---- values
    def store_dtype(self, dt: ir.DType) -> np.dtype:
        if dt.is_float and self.f32:
            return np.dtype(np.float32)
        return dt.numpy

    def conform(self, x: np.ndarray, t: ir.TensorType, what: str, loc) -> np.ndarray:
        shape = [self.dims.get(d, n) if isinstance(d, str) else d
                 for d, n in zip(t.shape, x.shape, strict=False)]
        if tuple(x.shape) != tuple(shape) or x.ndim != t.rank:
            raise RunError(f"{what}: computed shape {tuple(x.shape)} but the declared type is {t} "
                           f"(= {tuple(shape)})", loc)
        return np.asarray(x).astype(self.store_dtype(t.dtype), copy=False)

    def bind_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        given = {k.removeprefix("%"): v for k, v in inputs.items()}
        names = [p.name for p in self.g.params]
        unknown = [k for k in given if k not in names]
        if unknown:
            raise RunError(f"graph '{self.g.name}' has no parameter '%{unknown[0]}' "
                           f"(parameters: {', '.join('%' + n for n in names)})", part(self.g.loc, "name"))
        bound_by: dict[str, str] = {}
        vals: dict[str, np.ndarray] = {}
        for p in self.g.params:
            loc = part(p.loc, "result")
            if p.name not in given:
                raise RunError(f"missing input '%{p.name}' of graph '{self.g.name}'", loc)
            x = np.asarray(given[p.name])
            t = self.info.types[p.name]
            if x.ndim != t.rank:
                raise RunError(f"input '%{p.name}' has shape {tuple(x.shape)} but the graph declares {t}",
                               loc)
            for i, (n, d) in enumerate(zip(x.shape, t.shape, strict=True)):
                if isinstance(d, str):
                    if d in self.dims and self.dims[d] != n:
                        raise RunError(f"input '%{p.name}' of shape {tuple(x.shape)} (declared {t}) sets "
                                       f"symbolic dim {d} = {n} in dim {i}, but input '%{bound_by[d]}' set "
                                       f"{d} = {self.dims[d]}", loc)
                    self.dims[d] = int(n)
                    bound_by[d] = p.name
                elif n != d:
                    raise RunError(f"input '%{p.name}' has shape {tuple(x.shape)} but the graph declares "
                                   f"{t}: dim {i} is {n}, expected {d}", loc)
            if t.dtype.is_float != (x.dtype.kind in "fV"):
                raise RunError(f"input '%{p.name}' has dtype {x.dtype} but the graph declares {t}", loc)
            vals[p.name] = x.astype(self.store_dtype(t.dtype), copy=False)
        return vals

    # ---- globals
    def global_value(self, o: ir.GlobalRef, env: Env, loc) -> tuple[np.ndarray, bool]:
        """The array of @name[index]; second item: whether it is a state (mutable) tensor."""
        layer = None if o.index is None else eval_int(o.index, env, f"index of '@{o.name}'")
        w = self.m.weight(o.name)
        if w is not None:
            key = w.checkpoint_name(layer)
            arr = self.wcache.get(key)
            if arr is None:
                if key not in self.weights:
                    raise RunError(f"weight '@{o.name}'{'' if layer is None else f'[{layer}]'}: tensor "
                                   f"'{key}' is missing from the weights", loc)
                arr = np.asarray(self.weights[key])
                t = self.a.globals[o.name]
                if tuple(arr.shape) != _concrete(t, f"weight '{o.name}'"):
                    raise RunError(f"weight '{key}' has shape {tuple(arr.shape)} but '@{o.name}' is declared "
                                   f"{t}", loc)
                if arr.dtype.kind in "fV" and arr.dtype not in (np.float32, np.float64):
                    arr = arr.astype(np.float32)  # bf16/f16: widened once per call (exact)
                self.wcache[key] = arr
            return arr, False
        s = self.m.state(o.name)
        if s is None:
            raise RunError(f"undefined weight or state '@{o.name}'", loc)
        key2 = (o.name, layer)
        if key2 not in self.state:
            raise RunError(f"state '@{o.name}'{'' if layer is None else f'[{layer}]'} is missing from the "
                           "state (make it with init_state)", loc)
        return self.state[key2], True

    # ---- statements
    def attrs(self, s: ir.OpStmt, opdef: OpDef, env: Env) -> dict[str, Any]:
        got = self.attr_cache.get(id(s))
        if got is None:
            got = {}
            for a in s.attrs:
                spec = opdef.attr_spec(a.key)
                if spec is None:
                    raise RunError(f"'{s.op}' has no attribute '{a.key}'", a.loc)
                got[a.key] = resolve_attr(spec, a.value, env)
            for spec in opdef.attrs:
                if spec.name not in got:
                    got[spec.name] = spec.default
            self.attr_cache[id(s)] = got
        return got

    def op(self, s: ir.OpStmt, scope: dict, env: Env, suffix: str) -> None:
        opdef = OPS.get(s.op)
        loc = part(s.loc, "name")
        if opdef is None:
            raise RunError(f"unknown operator '{s.op}'", loc)
        args = []
        for i, o in enumerate(s.operands):
            if isinstance(o, ir.ValueRef):
                args.append(scope[o.name])
            else:
                arr, is_state = self.global_value(o, env, o.loc or loc)
                if is_state and i not in opdef.mutates:
                    arr = arr.copy()
                args.append(arr)
        try:
            outs = opdef.reference(args, self.attrs(s, opdef, env), RefCtx(self.dims))
        except ValueError as e:
            if isinstance(e, MpkError):
                raise
            raise RunError(f"'{s.op}': {e}", loc) from None
        if len(outs) != len(s.results):
            raise RunError(f"'{s.op}' produced {len(outs)} result(s) for {len(s.results)} name(s)", loc)
        for r, x in zip(s.results, outs, strict=True):
            y = self.conform(np.asarray(x), self.info.types[r], f"'{s.op}' result '%{r}'", loc)
            scope[r] = y
            if self.record is not None:
                self.record[r + suffix] = y

    def block(self, body, scope: dict, env: Env, suffix: str):
        for s in body:
            if isinstance(s, ir.OpStmt):
                self.op(s, scope, env, suffix)
            elif isinstance(s, ir.ForStmt):
                self.loop(s, scope, env, suffix)
            elif isinstance(s, (ir.YieldStmt, ir.ReturnStmt)):
                return [scope[v.name] for v in s.values]
        return None

    def loop(self, s: ir.ForStmt, scope: dict, env: Env, suffix: str) -> None:
        lo = eval_int(s.start, env, "loop start")
        hi = eval_int(s.end, env, "loop end")
        current = []
        for c in s.carries:
            if isinstance(c.init, ir.ValueRef):
                current.append(scope[c.init.name])
            else:
                arr, _ = self.global_value(c.init, env, c.init.loc or s.loc)
                current.append(arr)
        for layer in range(lo, hi):
            inner = dict(scope)
            for c, v in zip(s.carries, current, strict=True):
                inner[c.name] = v
            got = self.block(s.body, inner, env.with_loop_var(s.var, layer), f"{suffix}.{layer}")
            if got is None or len(got) != len(s.carries):
                raise RunError("loop body must end with 'yield' of every carried value", s.loc)
            current = got
        for r, v in zip(s.results, current, strict=True):
            scope[r] = v
            if self.record is not None:
                self.record[r + suffix] = v


def run_graph(module: ir.Module, inputs: Mapping[str, Any], weights: Mapping[str, np.ndarray],
              state: dict | None = None, graph: str | None = None, analysis=None,
              float_storage: str | None = None, record: dict | None = None) -> tuple[np.ndarray, ...]:
    """Run one graph (the entry graph by default); returns its results as a tuple of arrays.

    ``inputs``: {parameter name (``%`` optional): array}; symbolic dims bind from their shapes.
    ``weights``: {checkpoint name: array} (bf16/f16/f32/f64; bf16 and f16 are widened to float32
    once per call, float64 weights skip the widening that linears do); ``state``: {(name, layer): array},
    mutated in place (a fresh zero state when ``None``).  ``float_storage="f32"`` keeps float values in
    float32 instead of rounding them to their declared dtypes (values written into state tensors still
    take the state array's dtype).  ``record`` receives every SSA value (``name.L`` inside loop iteration L).
    """
    if float_storage not in (None, "f32"):
        raise ValueError(f"float_storage must be None or 'f32', got {float_storage!r}")
    if analysis is None:
        from mpkir.verify import verify

        analysis = verify(module)
    try:
        g = module.graph(graph)
    except KeyError:
        names = ", ".join(x.name for x in module.graphs)
        raise RunError(f"no graph named '{graph}' (graphs: {names})") from None
    if g.name not in analysis.graphs:
        raise RunError(f"the analysis passed has no graph '{g.name}' (analyze this module)")
    if state is None:
        state = init_state(module, analysis)
    run = _Run(module, analysis, g, weights, state, float_storage == "f32", record)
    scope = run.bind_inputs(inputs)
    if record is not None:
        record.update(scope)
    outs = run.block(g.body, scope, analysis.env, "")
    if outs is None:
        raise RunError(f"graph '{g.name}' does not end with 'return'", g.loc)
    return tuple(outs)
