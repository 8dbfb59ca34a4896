"""Hypothesis strategies for .mpk: random valid modules and mutated (mostly invalid) sources.

``modules()`` draws modules that pass :func:`mpkir.verify.analyze` with no diagnostics: constants
(integer and float expressions of earlier constants), symbolic dims, a serve block, weights (some per
layer, bound to ``"...{l}..."`` checkpoint names), states and graphs whose bodies are random DAGs of
catalogue operators, optionally inside ``for`` loops with carried values and ``@w[l]`` references.
Only operators registered in :data:`mpkir.ops.registry.OPS` are used; result types come from the
operator's own ``infer``, operands and attributes follow the catalogue in DEVELOPERS.md.

``runnable_modules()`` keeps to float graph inputs and dims of at most 16, so the reference interpreter
can run every draw.  ``mutated_sources()`` damages printed modules (tokens, numbers, names, lines,
junk characters, dtypes, operator names, attributes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st

from mpkir import ir
from mpkir.ops.base import ShapeError
from mpkir.ops.registry import OPS
from mpkir.printer import KEYWORDS, print_module
from mpkir.serve import TARGETS

FLOATS = (ir.DType.f32, ir.DType.bf16, ir.DType.f16)
INTS = (ir.DType.i32, ir.DType.i64)
_WORDS = ("hidden", "ffn", "heads", "dim", "size", "vocab", "n", "k", "eps", "scale", "width", "rows", "cols",
          "layers", "emb", "proj", "norm", "gate", "up", "down", "q", "kv", "out", "w", "b", "x")
DISAGREEMENTS: list[str] = []
"""Operator calls that follow the catalogue but the registered ``infer`` rejected (see the tests)."""


@dataclass
class Val:
    """A value in scope while drawing a graph body."""

    ref: ir.Operand
    type: ir.TensorType
    bound: int | None = None  # for integer values: every element is < bound (argmax results)


@dataclass
class _Ctx:
    draw: Callable
    runnable: bool
    max_dim: int
    names: set[str] = field(default_factory=set)
    int_consts: list[tuple[str, int]] = field(default_factory=list)
    float_consts: list[tuple[str, float]] = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)
    consts: list[ir.Decl] = field(default_factory=list)
    weights: list[ir.WeightDecl] = field(default_factory=list)
    weight_types: dict[str, tuple[ir.TensorType, int | None]] = field(default_factory=dict)
    values: set[str] = field(default_factory=set)
    loop_vars: list[str] = field(default_factory=list)
    counter: int = 0

    # ---------------------------------------------------------------- names
    def ident(self, hint: str = "") -> str:
        d = self.draw
        while True:
            base = hint or d(st.sampled_from(_WORDS))
            name = base if d(st.booleans()) and base not in self.names else f"{base}_{len(self.names)}"
            if d(st.integers(0, 9)) == 0:
                name = name.capitalize()
            if name not in self.names and name not in KEYWORDS and not re.fullmatch(
                    r"(bf16|f16|f32|i32|i64|u8)", name):
                self.names.add(name)
                return name

    def value_name(self) -> str:
        d = self.draw
        self.counter += 1
        style = d(st.integers(0, 5))
        c = self.counter
        name = {0: f"{c}", 1: f"v{c}", 2: f"x_{c}", 3: f"h{c}.{d(st.integers(0, 3))}", 4: f"t{c}",
                5: f"a{c}"}[style]
        assert name not in self.values
        self.values.add(name)
        return name

    # ---------------------------------------------------------------- expressions
    def int_expr(self, v: int, depth: int = 0) -> ir.Expr:
        """An expression that evaluates to the integer ``v`` (literals, constants and arithmetic)."""
        d = self.draw
        choices = ["num"]
        same = [n for n, x in self.int_consts if x == v]
        if same:
            choices += ["name", "name"]
        if depth < 2:
            choices += ["add", "sub", "mul", "div", "neg"]
        kind = d(st.sampled_from(choices))
        if kind == "name":
            return ir.Name(d(st.sampled_from(same)))
        if kind == "add":
            a = d(st.integers(-4, 8))
            return ir.BinOp("+", self.int_expr(a, depth + 1), self.int_expr(v - a, depth + 1))
        if kind == "sub":
            b = d(st.integers(-4, 8))
            rhs = ir.Neg(ir.Num(-b)) if b < 0 and d(st.booleans()) else self.int_expr(b, depth + 1)
            return ir.BinOp("-", self.int_expr(v + b, depth + 1), rhs)
        if kind == "mul" and v != 0:
            divs = [k for k in range(1, min(abs(v), 8) + 1) if v % k == 0]
            k = d(st.sampled_from(divs))
            return ir.BinOp("*", self.int_expr(v // k, depth + 1), self.int_expr(k, depth + 1))
        if kind == "div":
            k = d(st.integers(1, 4))
            return ir.BinOp("/", self.int_expr(v * k, depth + 1), self.int_expr(k, depth + 1))
        if kind == "neg" and v != 0:
            inner = self.int_expr(-v, depth + 1)
            if isinstance(inner, ir.Num) and d(st.booleans()):
                return ir.Num(v)
            return ir.Neg(inner)
        return ir.Num(v)

    def float_expr(self, v: float) -> ir.Expr:
        d = self.draw
        same = [n for n, x in self.float_consts if x == v]
        if same and d(st.booleans()):
            return ir.Name(d(st.sampled_from(same)))
        if d(st.integers(0, 3)) == 0:
            return ir.BinOp("*", ir.Num(v * 2.0), ir.Num(0.5))
        return ir.Num(v)

    def type_expr(self, t: ir.TensorType) -> ir.TypeExpr:
        dims = tuple(ir.Name(x) if isinstance(x, str) else self.int_expr(x) for x in t.shape)
        return ir.TypeExpr(t.dtype, dims)

    def size(self, lo: int = 1) -> int:
        return self.draw(st.integers(lo, self.max_dim))

    # ---------------------------------------------------------------- globals
    def weight(self, shape: tuple[int, ...], dtype: ir.DType, *, layer: tuple[str, int] | None = None,
               reuse: bool = True) -> ir.GlobalRef:
        """A reference to a weight of this type (reused or new); per layer with ``layer=(var, count)``."""
        d = self.draw
        t = ir.TensorType(dtype, shape)
        if reuse:
            same = [n for n, (wt, cnt) in self.weight_types.items() if wt == t
                    and ((cnt is None) == (layer is None)) and (layer is None or cnt >= layer[1])]
            if same and d(st.booleans()):
                name = d(st.sampled_from(same))
                return ir.GlobalRef(name, ir.Name(layer[0]) if layer else None)
        name = self.ident()
        index = None
        ckpt = f"model.{name}.weight"
        if layer is not None:
            var = d(st.sampled_from(["l", "i", "layer", "n"]))
            count = layer[1] + d(st.integers(0, 2))
            index = ir.LayerIndex(var, self.int_expr(count))
            ckpt = d(st.sampled_from([f"model.layers.{{{var}}}.{name}.weight", f"blk.{{{var}}}.{name}",
                                      f"{{{var}}}/{name}/{{{var}}}"]))
        elif d(st.integers(0, 5)) == 0:
            ckpt = f"weights/{name} \"q\" \\ é"
        self.weights.append(ir.WeightDecl(name, index, self.type_expr(t), ckpt))
        self.weight_types[name] = (t, count if layer is not None else None)
        return ir.GlobalRef(name, ir.Name(layer[0]) if layer else None)


# ==================================================================== operators
# Each generator takes the context, the values in scope, the loop (var, trip count) or None, and returns
# (operands, attrs as {key: (python value, IR value)}, number of results) or None when it does not apply.


def _floats(vals: list[Val], rank: int = 1, last_int: bool = True) -> list[Val]:
    return [v for v in vals if v.type.dtype.is_float and v.type.rank >= rank
            and (not last_int or (v.type.rank and isinstance(v.type.shape[-1], int)))]


def _pick(ctx: _Ctx, vals: list[Val]) -> Val | None:
    return ctx.draw(st.sampled_from(vals)) if vals else None


def _same_type(ctx: _Ctx, vals: list[Val], x: Val) -> Val:
    same = [v for v in vals if v.type == x.type]
    return ctx.draw(st.sampled_from(same)) if same else x


def _w(ctx: _Ctx, shape, dtype, loop) -> ir.GlobalRef:
    per_layer = loop is not None and ctx.draw(st.integers(0, 3)) > 0
    return ctx.weight(tuple(shape), dtype, layer=loop if per_layer else None)


def _axis(ctx: _Ctx, rank: int, axis: int) -> tuple[int, ir.Expr]:
    a = ctx.draw(st.sampled_from([axis, axis - rank]))
    return a, ctx.int_expr(a)


def _eps(ctx: _Ctx, attrs: dict, default: float) -> None:
    if ctx.draw(st.booleans()):
        v = ctx.draw(st.sampled_from([1e-6, 1e-5, 0.001, default]))
        attrs["eps"] = (v, ctx.float_expr(v))


def g_linear(ctx, vals, loop):
    x = _pick(ctx, _floats(vals))
    if x is None:
        return None
    k, n = x.type.shape[-1], ctx.size()
    ops = [x.ref, _w(ctx, (n, k), x.type.dtype, loop)]
    if ctx.draw(st.integers(0, 3)) == 0:
        ops.append(_w(ctx, (n,), x.type.dtype, loop))
    return ops, {}, 1


def g_matmul(ctx, vals, loop):
    x = _pick(ctx, _floats(vals, rank=2))
    if x is None:
        return None
    return [x.ref, _w(ctx, (x.type.shape[-1], ctx.size()), x.type.dtype, loop)], {}, 1


def g_binary(ctx, vals, loop):
    x = _pick(ctx, _floats(vals, last_int=False))
    if x is None:
        return None
    kind = ctx.draw(st.integers(0, 2))
    if kind == 0:
        other = _same_type(ctx, vals, x).ref
    elif kind == 1 and x.type.rank and isinstance(x.type.shape[-1], int):
        other = _w(ctx, (x.type.shape[-1],), x.type.dtype, loop)
    elif all(isinstance(s, int) for s in x.type.shape):
        other = _w(ctx, x.type.shape, x.type.dtype, loop)
    else:
        other = x.ref
    ops = [x.ref, other]
    if ctx.draw(st.booleans()):
        ops.reverse()
    return ops, {}, 1


def g_unary(ctx, vals, loop):
    x = _pick(ctx, _floats(vals, rank=0, last_int=False))
    return None if x is None else ([x.ref], {}, 1)


def g_gelu(ctx, vals, loop):
    x = _pick(ctx, _floats(vals, rank=0, last_int=False))
    if x is None:
        return None
    attrs = {}
    if ctx.draw(st.booleans()):
        a = ctx.draw(st.sampled_from(["none", "tanh"]))
        attrs["approximate"] = (a, ir.Name(a))
    return [x.ref], attrs, 1


def g_silu_mul(ctx, vals, loop):
    x = _pick(ctx, _floats(vals))
    if x is None:
        return None
    if x.type.shape[-1] % 2 == 0 and ctx.draw(st.booleans()):
        return [x.ref], {}, 1
    return [x.ref, _same_type(ctx, vals, x).ref], {}, 1


def g_softmax(ctx, vals, loop):
    x = _pick(ctx, _floats(vals, last_int=False))
    if x is None:
        return None
    attrs = {}
    if ctx.draw(st.booleans()):
        a, e = _axis(ctx, x.type.rank, ctx.draw(st.integers(0, x.type.rank - 1)))
        attrs["axis"] = (a, e)
    return [x.ref], attrs, 1


def g_rmsnorm(ctx, vals, loop):
    x = _pick(ctx, _floats(vals))
    if x is None:
        return None
    attrs: dict = {}
    _eps(ctx, attrs, 1e-6)
    return [x.ref, _w(ctx, (x.type.shape[-1],), x.type.dtype, loop)], attrs, 1


def g_layernorm(ctx, vals, loop):
    x = _pick(ctx, _floats(vals))
    if x is None:
        return None
    h = x.type.shape[-1]
    ops = [x.ref, _w(ctx, (h,), x.type.dtype, loop)]
    if ctx.draw(st.booleans()):
        ops.append(_w(ctx, (h,), x.type.dtype, loop))
    attrs: dict = {}
    _eps(ctx, attrs, 1e-5)
    return ops, attrs, 1


def _rank3(vals):
    return [v for v in _floats(vals, rank=3) if v.type.rank == 3 and isinstance(v.type.shape[2], int)]


def g_head_rmsnorm(ctx, vals, loop):
    x = _pick(ctx, _rank3(vals))
    if x is None:
        return None
    attrs: dict = {}
    _eps(ctx, attrs, 1e-6)
    return [x.ref, _w(ctx, (x.type.shape[2],), x.type.dtype, loop)], attrs, 1


def g_attention(ctx, vals, loop):
    x = _pick(ctx, _rank3(vals))
    if x is None:
        return None
    kv = [v for v in _rank3(vals) if v.type.dtype == x.type.dtype and v.type.shape[0] == x.type.shape[0]
          and v.type.shape[2] == x.type.shape[2] and isinstance(v.type.shape[1], int)
          and isinstance(x.type.shape[1], int) and x.type.shape[1] % v.type.shape[1] == 0]
    k = _pick(ctx, kv) or x
    v = _pick(ctx, [w for w in kv if w.type == k.type]) or k
    attrs = {}
    if ctx.draw(st.booleans()):
        c = ctx.draw(st.booleans())
        attrs["causal"] = (c, ir.Bool(c))
    if ctx.draw(st.booleans()):
        s = ctx.draw(st.sampled_from([0.0, 0.125, 0.5]))
        attrs["scale"] = (s, ctx.float_expr(s))
    return [x.ref, k.ref, v.ref], attrs, 1


def _positions(vals, t) -> list[Val]:
    return [v for v in vals if v.type.dtype == ir.DType.i32 and v.type.shape == (t,)]


def g_rope(ctx, vals, loop):
    xs = [v for v in _rank3(vals) if v.type.shape[2] % 2 == 0 and _positions(vals, v.type.shape[0])]
    x = _pick(ctx, xs)
    if x is None:
        return None
    pos = ctx.draw(st.sampled_from(_positions(vals, x.type.shape[0])))
    attrs = {}
    if ctx.draw(st.booleans()):
        th = ctx.draw(st.sampled_from([10000.0, 500000.0, 100.0]))
        attrs["theta"] = (th, ctx.float_expr(th))
    if ctx.draw(st.booleans()):
        s = ctx.draw(st.sampled_from(["neox", "interleaved"]))
        attrs["style"] = (s, ir.Name(s))
    if ctx.draw(st.booleans()):
        r = ctx.draw(st.sampled_from([0, x.type.shape[2]]))
        attrs["rotary_dim"] = (r, ctx.int_expr(r))
    return [x.ref, pos.ref], attrs, 1


def g_sample(ctx, vals, loop):
    xs = [v for v in _floats(vals, rank=2) if v.type.rank == 2 and _positions(vals, v.type.shape[0])]
    x = _pick(ctx, xs)
    if x is None:
        return None
    pos = ctx.draw(st.sampled_from(_positions(vals, x.type.shape[0])))
    attrs = {}
    for key, choices in (("temperature", [0.7, 1.0]), ("top_p", [0.9, 1.0])):
        if ctx.draw(st.booleans()):
            f = ctx.draw(st.sampled_from(choices))
            attrs[key] = (f, ctx.float_expr(f))
    for key, lo, hi in (("top_k", 0, 8), ("seed", 0, 100)):
        if ctx.draw(st.booleans()):
            i = ctx.draw(st.integers(lo, hi))
            attrs[key] = (i, ctx.int_expr(i))
    return [x.ref, pos.ref], attrs, 1


def _shape_expr(ctx, shape) -> ir.ListVal:
    return ir.ListVal(tuple(ir.Name(s) if isinstance(s, str) else (ir.Num(-1) if s == -1 else ctx.int_expr(s))
                            for s in shape))


def g_reshape(ctx, vals, loop):
    xs = [v for v in vals if v.type.dtype.is_float and v.type.rank >= 1]
    x = _pick(ctx, xs)
    if x is None:
        return None
    shape = list(x.type.shape)
    ints = [i for i, s in enumerate(shape) if isinstance(s, int)]
    kind = ctx.draw(st.integers(0, 2))
    if (kind == 0 and len(ints) >= 2 and ints[-1] == ints[-2] + 1
            and shape[ints[-1]] * shape[ints[-2]] <= ctx.max_dim):
        i = ints[-2]
        shape[i:i + 2] = [shape[i] * shape[i + 1]]
    elif kind == 1 and ints:
        i = ctx.draw(st.sampled_from(ints))
        n = shape[i]
        a = ctx.draw(st.sampled_from([k for k in range(1, n + 1) if n % k == 0] or [1]))
        shape[i:i + 1] = [a, n // a]
    new = list(shape)
    if ints and ctx.draw(st.booleans()):
        cand = [i for i, s in enumerate(new) if isinstance(s, int)]
        if cand:
            new[ctx.draw(st.sampled_from(cand))] = -1
    return [x.ref], {"shape": (tuple(new), _shape_expr(ctx, new))}, 1


def _int_axes(x: Val) -> list[int]:
    return [i for i, s in enumerate(x.type.shape) if isinstance(s, int)]


def g_split(ctx, vals, loop):
    xs = [v for v in vals if v.type.dtype.is_float and any(v.type.shape[i] >= 2 for i in _int_axes(v))]
    x = _pick(ctx, xs)
    if x is None:
        return None
    axis = ctx.draw(st.sampled_from([i for i in _int_axes(x) if x.type.shape[i] >= 2]))
    n = x.type.shape[axis]
    cuts = sorted(ctx.draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=min(3, n - 1))))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    attrs = {"sizes": (tuple(sizes), ir.ListVal(tuple(ctx.int_expr(s) for s in sizes)))}
    if axis != x.type.rank - 1 or ctx.draw(st.booleans()):
        a, e = _axis(ctx, x.type.rank, axis)
        attrs["axis"] = (a, e)
    return [x.ref], attrs, len(sizes)


def g_concat(ctx, vals, loop):
    xs = [v for v in vals if v.type.dtype.is_float and _int_axes(v)]
    x = _pick(ctx, xs)
    if x is None:
        return None
    axis = ctx.draw(st.sampled_from(_int_axes(x)))
    k = ctx.draw(st.integers(1, 3))
    while k > 1 and x.type.shape[axis] * k > ctx.max_dim:
        k -= 1
    ops = [_same_type(ctx, vals, x).ref for _ in range(k)]
    attrs = {}
    if axis != x.type.rank - 1 or ctx.draw(st.booleans()):
        a, e = _axis(ctx, x.type.rank, axis)
        attrs["axis"] = (a, e)
    return ops, attrs, 1


def g_transpose(ctx, vals, loop):
    x = _pick(ctx, [v for v in vals if v.type.dtype.is_float and v.type.rank >= 1])
    if x is None:
        return None
    perm = tuple(ctx.draw(st.permutations(range(x.type.rank))))
    return [x.ref], {"perm": (perm, ir.ListVal(tuple(ctx.int_expr(p) for p in perm)))}, 1


def g_cast(ctx, vals, loop):
    x = _pick(ctx, [v for v in vals if v.type.dtype.is_float])
    if x is None:
        return None
    dt = ctx.draw(st.sampled_from(FLOATS))
    return [x.ref], {"dtype": (dt, ir.Name(dt.value))}, 1


def g_argmax(ctx, vals, loop):
    x = _pick(ctx, _floats(vals, last_int=False))
    if x is None:
        return None
    attrs = {}
    if ctx.draw(st.booleans()):
        a, e = _axis(ctx, x.type.rank, ctx.draw(st.integers(0, x.type.rank - 1)))
        attrs["axis"] = (a, e)
    return [x.ref], attrs, 1


def g_embedding(ctx, vals, loop):
    ids = [v for v in vals if v.type.dtype in INTS and (v.bound is not None or not ctx.runnable)]
    x = _pick(ctx, ids)
    if x is None:
        return None
    rows = max(x.bound or 1, ctx.size())
    dt = ctx.draw(st.sampled_from(FLOATS))
    return [x.ref, _w(ctx, (rows, ctx.size()), dt, loop)], {}, 1


def g_allreduce(ctx, vals, loop):
    return g_unary(ctx, vals, loop)


GENERATORS: dict[str, Callable] = {
    "linear": g_linear, "matmul": g_matmul, "add": g_binary, "mul": g_binary, "silu": g_unary,
    "gelu": g_gelu, "silu_mul": g_silu_mul, "softmax": g_softmax, "rmsnorm": g_rmsnorm,
    "layernorm": g_layernorm, "head_rmsnorm": g_head_rmsnorm, "attention": g_attention, "rope": g_rope,
    "sample": g_sample, "reshape": g_reshape, "split": g_split, "concat": g_concat,
    "transpose": g_transpose, "cast": g_cast, "argmax": g_argmax, "embedding": g_embedding,
    "allreduce": g_allreduce,
}
"""Catalogue operators the strategy can draw (``paged_attention`` needs a page table: not drawn)."""

# operators whose result has the type of their first operand (usable on a loop's carried value)
_PRESERVING = ("add", "mul", "silu", "gelu", "softmax", "rmsnorm", "layernorm", "allreduce", "linear")


def available_ops() -> list[str]:
    return [n for n in GENERATORS if n in OPS]


def _global_type(ctx: _Ctx, ref: ir.GlobalRef) -> ir.TensorType:
    return ctx.weight_types[ref.name][0]


def _emit(ctx: _Ctx, op: str, gen_out, vals: list[Val], body: list[ir.Stmt]) -> list[Val] | None:
    """Infer result types with the registered operator and append the statement; None if rejected."""
    operands, attrs, nres = gen_out
    types_by_ref = {id(v.ref): v.type for v in vals}
    in_types = []
    for o in operands:
        in_types.append(_global_type(ctx, o) if isinstance(o, ir.GlobalRef) else types_by_ref[id(o)])
    opdef = OPS[op]
    resolved = {s.name: s.default for s in opdef.attrs if not s.required}
    resolved.update({k: v for k, (v, _) in attrs.items()})
    try:
        out = opdef.infer(in_types, resolved)
    except ShapeError as e:
        DISAGREEMENTS.append(f"{op}({', '.join(map(str, in_types))}, {resolved}): {e}")
        return None
    if len(out) != nres or any(any(isinstance(s, int) and s > ctx.max_dim for s in t.shape) for t in out):
        return None
    names = [ctx.value_name() for _ in out]
    ir_attrs = tuple(ir.Attr(k, e) for k, (_, e) in attrs.items())
    if ctx.draw(st.booleans()):
        ir_attrs = tuple(ctx.draw(st.permutations(ir_attrs)))
    schedule = ()
    if ctx.draw(st.integers(0, 5)) == 0:
        schedule = (ir.Attr("tasks", ir.Num(ctx.draw(st.integers(1, 8)))),)
    types = tuple(ctx.type_expr(t) for t in out) if ctx.draw(st.integers(0, 3)) == 0 else ()
    body.append(ir.OpStmt(tuple(names), op, tuple(operands), ir_attrs, schedule, types))
    bound = None
    if op == "argmax":
        x = in_types[0]
        ax = resolved.get("axis", -1)
        d = x.shape[ax] if x.rank else 1
        bound = d if isinstance(d, int) else ctx.dims.get(d)
    return [Val(ir.ValueRef(n), t, bound) for n, t in zip(names, out, strict=True)]


def _free_op(ctx: _Ctx, vals: list[Val], body: list[ir.Stmt], loop) -> list[Val]:
    ops = available_ops()
    if ctx.runnable:
        ops = [o for o in ops if o not in ("rope", "sample")]
    for _ in range(4):
        op = ctx.draw(st.sampled_from(ops))
        g = GENERATORS[op](ctx, vals, loop)
        if g is None:
            continue
        new = _emit(ctx, op, g, vals, body)
        if new is not None:
            return new
    return []


def _preserving_op(ctx: _Ctx, head: Val, vals: list[Val], body: list[ir.Stmt], loop) -> Val | None:
    """One op on the carried value whose result has the same type (per-layer weights where it takes one)."""
    ops = [o for o in _PRESERVING if o in OPS and (head.type.dtype.is_float)]
    if not ops:
        return None
    op = ctx.draw(st.sampled_from(ops))
    t = head.type
    last = t.shape[-1] if t.rank else None
    if op == "linear":
        if not isinstance(last, int):
            return None
        g = ([head.ref, _w(ctx, (last, last), t.dtype, loop)], {}, 1)
    elif op in ("rmsnorm", "layernorm"):
        if not isinstance(last, int):
            return None
        g = ([head.ref, _w(ctx, (last,), t.dtype, loop)], {}, 1)
    elif op in ("add", "mul"):
        others = [v for v in vals if v.type == t]
        if isinstance(last, int) and ctx.draw(st.booleans()):
            other = _w(ctx, (last,), t.dtype, loop)
        else:
            other = ctx.draw(st.sampled_from(others)).ref if others else head.ref
        g = ([head.ref, other], {}, 1)
    else:
        g = ([head.ref], {}, 1)
    pool = [*vals, head]
    new = _emit(ctx, op, g, pool, body)
    if not new or new[0].type != t:
        if new:  # the statement stays (a dead value); the chain does not use it
            pass
        return None
    return new[0]


def _for_loop(ctx: _Ctx, vals: list[Val], body: list[ir.Stmt], depth: int) -> list[Val]:
    d = ctx.draw
    carried = [v for v in vals if v.type.dtype.is_float]
    if not carried:
        return []
    n_carry = d(st.integers(1, min(2, len(carried))))
    inits = [d(st.sampled_from(carried)) for _ in range(n_carry)]
    start = d(st.integers(0, 1))
    trips = d(st.integers(1, 3))
    end = start + trips
    var = d(st.sampled_from(["l", "i", "j", "layer"]))
    if var in ctx.names or var in ctx.loop_vars:
        var = ctx.ident("loop")
    ctx.loop_vars.append(var)
    loop = (var, end)
    carries, heads = [], []
    for v in inits:
        name = ctx.value_name()
        init = v.ref
        if isinstance(init, ir.GlobalRef):
            init = ir.GlobalRef(init.name, init.index)
        carries.append(ir.Carry(name, init))
        heads.append(Val(ir.ValueRef(name), v.type))
    inner: list[ir.Stmt] = []
    scope = [*vals, *heads]
    for _ in range(d(st.integers(1, 4))):
        k = d(st.integers(0, 3))
        if k == 0:
            scope += _free_op(ctx, scope, inner, loop)
        elif k == 1 and depth < 1:
            scope += _for_loop(ctx, scope, inner, depth + 1)
        else:
            i = d(st.integers(0, len(heads) - 1))
            new = _preserving_op(ctx, heads[i], scope, inner, loop)
            if new is not None:
                heads[i] = new
                scope.append(new)
    inner.append(ir.YieldStmt(tuple(ir.ValueRef(h.ref.name) for h in heads)))
    ctx.loop_vars.pop()
    results = [ctx.value_name() for _ in inits]
    body.append(ir.ForStmt(tuple(results), var, ctx.int_expr(start), ctx.int_expr(end), tuple(carries),
                           tuple(inner)))
    return [Val(ir.ValueRef(r), v.type) for r, v in zip(results, inits, strict=True)]


def _graph(ctx: _Ctx, name: str) -> ir.GraphDecl:
    d = ctx.draw
    params, vals = [], []
    dims = list(ctx.dims)
    dtype = d(st.sampled_from(FLOATS))
    for _ in range(d(st.integers(1, 3))):
        rank = d(st.integers(1, 3))
        shape: list[ir.Dim] = [ctx.size() for _ in range(rank)]
        if dims and d(st.booleans()):
            shape[0] = d(st.sampled_from(dims))
        pdt = dtype if d(st.integers(0, 3)) else d(st.sampled_from(FLOATS))
        t = ir.TensorType(pdt, tuple(shape))
        pname = ctx.value_name()
        params.append(ir.Param(pname, ctx.type_expr(t)))
        vals.append(Val(ir.ValueRef(pname), t))
    if not ctx.runnable and d(st.booleans()):
        first = vals[0].type.shape[0]
        pname = ctx.value_name()
        t = ir.TensorType(d(st.sampled_from([ir.DType.i32, ir.DType.i32, ir.DType.i64])), (first,))
        params.append(ir.Param(pname, ctx.type_expr(t)))
        vals.append(Val(ir.ValueRef(pname), t))
    body: list[ir.Stmt] = []
    for _ in range(d(st.integers(1, 6))):
        if d(st.integers(0, 4)) == 0:
            vals += _for_loop(ctx, vals, body, 0)
        else:
            vals += _free_op(ctx, vals, body, None)
    computed = [v for v in vals if v.ref.name not in {p.name for p in params}] or vals
    rets = [computed[-1]]
    if len(vals) > 1 and d(st.booleans()):
        rets.append(d(st.sampled_from(vals)))
    body.append(ir.ReturnStmt(tuple(ir.ValueRef(v.ref.name) for v in rets)))
    return ir.GraphDecl(name, tuple(params), tuple(ctx.type_expr(v.type) for v in rets), tuple(body))


def _serve(ctx: _Ctx) -> ir.ServeDecl:
    d = ctx.draw
    reqs = d(st.integers(1, 4))
    spec = d(st.sampled_from(["none", "none", "ngram"]))
    spec_k = d(st.integers(1, 4))
    per_req = 1 + (spec_k if spec == "ngram" else 0)
    page = d(st.sampled_from([1, 4, 16, 64]))
    pages_per_seq = d(st.integers(1, 8))
    seq = page * pages_per_seq
    if spec == "ngram" and spec_k >= seq:
        spec = "none"
        per_req = 1
    vals: dict[str, tuple[object, ir.AttrValue]] = {}

    def put(key, v, e=None):
        vals[key] = (v, e if e is not None else ctx.int_expr(v) if isinstance(v, int) else
                     ir.Name(v) if isinstance(v, str) else ctx.float_expr(v))

    put("max_requests", reqs)
    put("max_tokens", reqs * per_req * d(st.integers(1, 2)))
    put("max_seq_len", seq)
    put("page_size", page)
    put("num_pages", max(reqs, pages_per_seq) * d(st.integers(1, 2)))
    put("mode", d(st.sampled_from(["decode", "prefill", "mixed"])))
    sampling = "greedy" if spec == "ngram" else d(st.sampled_from(["greedy", "sample"]))
    put("sampling", sampling)
    put("temperature", d(st.sampled_from([0.5, 1.0, 0.7])))
    put("top_k", d(st.integers(0, 50)))
    put("top_p", d(st.sampled_from([1.0, 0.9, 0.5])))
    put("seed", d(st.integers(0, 1000)))
    put("speculative", spec)
    put("spec_k", spec_k)
    put("ngram", d(st.integers(1, 4)))
    put("gpus", d(st.sampled_from([1, 2, 4, 8])))
    put("target", d(st.sampled_from(TARGETS)))
    put("eos_token", d(st.integers(-1, 100)))
    keys = d(st.lists(st.sampled_from(sorted(vals)), unique=True, max_size=len(vals)))
    # keys left out take defaults: keep every setting the others depend on
    keep = {"max_requests", "max_tokens", "max_seq_len", "page_size", "num_pages", "speculative", "spec_k",
            "sampling"}
    keys = [k for k in keys if k not in keep] + sorted(keep)
    keys = d(st.permutations(keys))
    return ir.ServeDecl(tuple(ir.Attr(k, vals[k][1]) for k in keys))


@st.composite
def modules(draw, *, runnable: bool = False, max_dim: int | None = None) -> ir.Module:
    """Random valid modules (every draw passes ``verify.analyze`` with no diagnostics).

    ``runnable=True``: graph inputs are float tensors only, dims (and dim bounds) are at most 16 and no
    operator needs integer inputs the interpreter could not invent (``rope``, ``sample``); embedding
    ids come from ``argmax`` over a dim no larger than the table.
    """
    ctx = _Ctx(draw, runnable, max_dim or (16 if runnable else 24))
    decls: list[ir.Decl] = []
    if draw(st.booleans()):
        decls.append(ir.ModelDecl(draw(st.sampled_from(["tiny", "m", "qwen3-0.6b", "a \"quoted\" name"]))))
    for _ in range(draw(st.integers(0, 4))):
        name = ctx.ident()
        if draw(st.integers(0, 3)) == 0:
            v = draw(st.sampled_from([1e-6, 1e-5, 0.5, 10000.0, 2.0]))
            ctx.consts.append(ir.ConstDecl(name, ctx.float_expr(v)))
            ctx.float_consts.append((name, v))
        else:
            v = draw(st.integers(-2, ctx.max_dim))
            ctx.consts.append(ir.ConstDecl(name, ctx.int_expr(v)))
            ctx.int_consts.append((name, v))
    for _ in range(draw(st.integers(0, 2))):
        name = ctx.ident(draw(st.sampled_from(["B", "T", "S", "N"])))
        bound = draw(st.integers(1, ctx.max_dim))
        ctx.consts.append(ir.DimDecl(name, ctx.int_expr(bound)))
        ctx.dims[name] = bound
    decls += ctx.consts
    serve = [_serve(ctx)] if draw(st.booleans()) else []
    graphs = [_graph(ctx, ctx.ident("main")) for _ in range(draw(st.integers(1, 2)))]
    states = []
    for _ in range(draw(st.integers(0, 2))):
        shape = tuple(ctx.size() for _ in range(draw(st.integers(1, 3))))
        t = ir.TensorType(draw(st.sampled_from(FLOATS)), shape)
        index = None
        if draw(st.booleans()):
            index = ir.LayerIndex("l", ctx.int_expr(draw(st.integers(1, 3))))
        states.append(ir.StateDecl(ctx.ident("cache"), index, ctx.type_expr(t)))
    rest = [*serve, *ctx.weights, *states]
    if draw(st.booleans()):
        rest = list(draw(st.permutations(rest)))
    return ir.Module(tuple(decls + rest + graphs))


def runnable_modules(max_dim: int = 16) -> st.SearchStrategy[ir.Module]:
    """Valid modules whose entry graph the reference interpreter can run on random float inputs."""
    return modules(runnable=True, max_dim=max_dim)


def sources(**kw) -> st.SearchStrategy[str]:
    """Printed valid modules."""
    return modules(**kw).map(print_module)


# ==================================================================== mutations

_TOKEN = re.compile(r'"(?:\\.|[^"\\\n])*"|[%@]?[A-Za-z0-9_][A-Za-z0-9_.]*|\.\.|->|<=|//[^\n]*|\S')
_JUNK = [*"$#!?;`~\\\"'{}()[]<>=%@:,.-+*/", "\t", "\x00", "\x0c", "é", "\u2028", "𝑥", "\r", "\n", "//"]
_NUMBERS = ["0", "-1", "1", "3", "7", "1.5", "-0.0", "1e-6", "1e999", "99999999999999999999999", "2.",
            "0x10", "1e", "007"]
_DTYPE_WORDS = [d.value for d in ir.DType] + ["f64", "q8", "bf", "int", "bf16bf16"]


def _tokens(text: str) -> list[re.Match]:
    return list(_TOKEN.finditer(text))


def _replace(text: str, m: re.Match, new: str) -> str:
    return text[:m.start()] + new + text[m.end():]


def _mutate(draw, text: str) -> str:
    toks = _tokens(text)
    if not toks:
        return text + draw(st.sampled_from(_JUNK))
    kind = draw(st.sampled_from(["delete", "duplicate", "swap", "number", "rename", "drop_line", "dup_line",
                                 "junk", "dtype", "op", "attr", "truncate", "keyword"]))
    tok = draw(st.sampled_from(toks))
    if kind == "delete":
        return _replace(text, tok, "")
    if kind == "duplicate":
        return _replace(text, tok, tok.group() + " " + tok.group())
    if kind == "swap":
        i = toks.index(tok)
        if i + 1 < len(toks):
            a, b = toks[i], toks[i + 1]
            return text[:a.start()] + b.group() + text[a.end():b.start()] + a.group() + text[b.end():]
        return text
    if kind == "number":
        nums = [t for t in toks if re.fullmatch(r"\d[\d.eE+-]*", t.group())]
        if nums:
            return _replace(text, draw(st.sampled_from(nums)), draw(st.sampled_from(_NUMBERS)))
        return text
    if kind == "rename":
        vals = [t for t in toks if t.group()[:1] in "%@"] or toks
        t = draw(st.sampled_from(vals))
        return _replace(text, t, t.group()[:1] + draw(st.sampled_from(["zz", "x", "0", "a.b", ""])))
    if kind in ("drop_line", "dup_line"):
        lines = text.split("\n")
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "drop_line":
            del lines[i]
        else:
            lines.insert(i, lines[i])
        return "\n".join(lines)
    if kind == "junk":
        pos = draw(st.integers(0, len(text)))
        junk = draw(st.sampled_from(_JUNK) if draw(st.integers(0, 3)) else st.text(min_size=1, max_size=3))
        return text[:pos] + junk + text[pos:]
    if kind == "dtype":
        dts = [t for t in toks if t.group() in _DTYPE_WORDS]
        if dts:
            return _replace(text, draw(st.sampled_from(dts)), draw(st.sampled_from(_DTYPE_WORDS)))
        return text
    if kind == "op":
        calls = [m for m in re.finditer(r"(?<== )([a-z_]+)(?=\()", text)]
        if calls:
            new = draw(st.sampled_from([*sorted(OPS), "linaer", "foo", "for", "paged_attention", "Linear"]))
            return _replace(text, draw(st.sampled_from(calls)), new)
        return text
    if kind == "attr":
        attrs = list(re.finditer(r"([A-Za-z_]\w*)=([^,)\n]+)", text)) + list(
            re.finditer(r"([A-Za-z_]\w*) = ([^\n]+)", text))
        if attrs:
            m = draw(st.sampled_from(attrs))
            key, val = m.group(1), m.group(2)
            new = draw(st.sampled_from([f"{key}=", f"{key} {val}", f'{key}="{val}"', f"{key}=[{val},",
                                        f"={val}", f"bogus={val}", f"{key}={val}={val}", f"{key}=true",
                                        f"{key}=[{val}]", f"{key}=-{val}", f"{key}={val}, {key}={val}",
                                        f"{key}=1.5", f"{key}=0", f"{key}=-1", f"{key}=nope"]))
            return _replace(text, m, new)
        return text
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text)))]
    # keyword: replace a token with a keyword or vice versa
    return _replace(text, tok, draw(st.sampled_from(sorted(KEYWORDS))))


@st.composite
def mutated_sources(draw, base: st.SearchStrategy[str] | None = None, max_mutations: int = 3) -> str:
    """A printed valid module with 1..max_mutations random textual mutations (usually invalid)."""
    text = draw(base if base is not None else sources())
    for _ in range(draw(st.integers(1, max_mutations))):
        text = _mutate(draw, text)
    return text


__all__ = ["DISAGREEMENTS", "GENERATORS", "Val", "available_ops", "modules", "mutated_sources",
           "runnable_modules", "sources"]
