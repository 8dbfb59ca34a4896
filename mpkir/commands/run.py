"""``mpkir run FILE``: execute a graph on the CPU with the NumPy reference interpreter."""

from __future__ import annotations

import argparse
import io

import numpy as np

from mpkir import ir
from mpkir.commands import UsageError, load_verified, write_atomic
from mpkir.diagnostics import Diagnostic, MpkError

_IDS = ("tokens", "ids", "input_ids", "token_ids")
_POSITIONS = ("positions", "position_ids", "pos")
_SEQ_IDS = ("seq_ids", "seq_id", "request_ids")
_PAGE_TABLES = ("page_table", "page_tables", "block_table")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _dim_binding(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    try:
        if not eq:
            raise ValueError
        return name.strip(), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=INT, got '{text}'") from None


def _vocab(graph: ir.GraphDecl, param: str, analysis) -> int | None:
    """Rows of the embedding table that ``%param`` indexes, if any."""

    def walk(body):
        for s in body:
            if isinstance(s, ir.ForStmt):
                v = walk(s.body)
                if v is not None:
                    return v
            elif (isinstance(s, ir.OpStmt) and s.op == "embedding" and len(s.operands) >= 2
                  and isinstance(s.operands[0], ir.ValueRef) and s.operands[0].name == param
                  and isinstance(s.operands[1], ir.GlobalRef)):
                t = analysis.globals.get(s.operands[1].name)
                if t is not None and isinstance(t.shape[0], int):
                    return t.shape[0]
        return None

    return walk(graph.body)


def make_inputs(module: ir.Module, analysis, graph: ir.GraphDecl, *, tokens: list[int] | None = None,
                dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every parameter of ``graph`` that make a coherent step.

    Token ids are random in the vocabulary (or ``tokens``); the tokens are one request's positions
    0..T-1 (``seq_ids`` all 0) whose pages are ``page_table``'s first rows; other integer inputs are
    small random ints, float inputs standard normal.  Symbolic dims bind to ``dims``, else to the
    number of ``tokens``, else to their bound.
    """
    rng = np.random.default_rng(seed)
    env = analysis.env
    cfg = analysis.serve
    bound: dict[str, int] = dict(dims or {})
    for name in bound:
        if name not in env.dims:
            known = ", ".join(env.dims) or "none"
            raise UsageError(f"--dim {name}: no symbolic dim '{name}' (dims: {known})")
        if not 1 <= bound[name] <= env.dims[name]:
            raise UsageError(f"--dim {name}={bound[name]}: must be in 1..{env.dims[name]}")
    types = analysis.graphs[graph.name].types
    if tokens is not None:
        ids = next((p for p in graph.params if p.name in _IDS), None)
        if ids is None:
            raise UsageError(f"--tokens: graph '{graph.name}' has no token-id parameter ({', '.join(_IDS)})")
        t = types[ids.name]
        if t.rank != 1:
            raise UsageError(f"--tokens: %{ids.name} has type {t}, not a 1-D list of ids")
        d = t.shape[0]
        if isinstance(d, str):
            if len(tokens) > env.dims[d]:
                raise UsageError(f"--tokens: {len(tokens)} tokens but dim {d} <= {env.dims[d]}")
            if bound.setdefault(d, len(tokens)) != len(tokens):
                raise UsageError(f"--tokens: {len(tokens)} tokens but --dim {d}={bound[d]}")
        elif d != len(tokens):
            raise UsageError(f"--tokens: %{ids.name} takes exactly {d} tokens, got {len(tokens)}")
    for name, b in env.dims.items():
        bound.setdefault(name, b)

    def shape_of(t: ir.TensorType) -> tuple[int, ...]:
        return tuple(bound[d] if isinstance(d, str) else d for d in t.shape)

    out: dict[str, np.ndarray] = {}
    for p in graph.params:
        t = types[p.name]
        shape = shape_of(t)
        dt = t.dtype.numpy
        if p.name in _IDS and tokens is not None:
            a = np.asarray(tokens).reshape(shape)
        elif p.name in _IDS and not t.dtype.is_float:
            vocab = _vocab(graph, p.name, analysis) or int(env.consts.get("vocab", 100))
            a = rng.integers(0, vocab, size=shape)
        elif p.name in _POSITIONS and not t.dtype.is_float:
            a = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % max(1, cfg.max_seq_len)
        elif p.name in _SEQ_IDS and not t.dtype.is_float:
            a = np.zeros(shape, dtype=np.int64)
        elif p.name in _PAGE_TABLES and not t.dtype.is_float and len(shape) == 2:
            a = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape) % max(1, cfg.num_pages)
        elif t.dtype.is_float:
            a = rng.standard_normal(shape, dtype=np.float32)
        else:
            a = rng.integers(0, 16, size=shape)
        out[p.name] = np.asarray(a).astype(dt)
    return out


def _load_npz(path: str, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        raise MpkError(Diagnostic(f"cannot read {what} {path}: {e}")) from None


def _as_dtype(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    if a.dtype.kind == "V" and a.dtype.itemsize == dt.itemsize:
        return a.view(dt)  # bf16 saved by NumPy without ml-dtypes comes back as raw bytes
    return a.astype(dt)


def load_weights(module: ir.Module, analysis, path: str) -> dict[str, np.ndarray]:
    """Tensors from an .npz keyed by checkpoint name; every missing or misshapen one is reported."""
    data = _load_npz(path, "weights")
    out: dict[str, np.ndarray] = {}
    diags: list[Diagnostic] = []
    for w in module.weights:
        t = analysis.globals.get(w.name)
        if t is None:
            continue
        layers = [None] if w.index is None else list(range(_count(w, analysis)))
        for layer in layers:
            key = w.checkpoint_name(layer)
            if key in out:
                continue
            if key not in data:
                diags.append(Diagnostic(f"{path}: no tensor '{key}' (weight '@{w.name}')", w.loc))
                continue
            a = data[key]
            if tuple(a.shape) != tuple(t.shape):
                diags.append(Diagnostic(f"{path}: tensor '{key}' has shape {list(a.shape)} but '@{w.name}' "
                                        f"is {t}", w.loc))
                continue
            out[key] = _as_dtype(a, t.dtype.numpy)
    if diags:
        raise MpkError(diags)
    return out


def _count(w: ir.WeightDecl, analysis) -> int:
    from mpkir.semantics import eval_int

    return eval_int(w.index.count, analysis.env, "layer count")


def summarize(name: str, a: np.ndarray, limit: int = 8) -> str:
    """``%name: dtype[shape]`` and a few values (floats also min/max/mean and a non-finite count)."""
    a = np.asarray(a)
    head = f"%{name}: {a.dtype}{list(a.shape)}"
    flat = a.reshape(-1)
    if flat.size == 0:
        return head + " (empty)"
    if a.dtype.kind in "iub":
        vals = ", ".join(str(int(x)) for x in flat[:limit])
        return head + f" = [{vals}{', ...' if flat.size > limit else ''}]"
    f = flat.astype(np.float64)
    finite = np.isfinite(f)
    stats = (f" min={f[finite].min():.4g} max={f[finite].max():.4g} mean={f[finite].mean():.4g}"
             if finite.any() else "")
    bad = f" non-finite={int((~finite).sum())}" if not finite.all() else ""
    vals = ", ".join(f"{x:.4g}" for x in f[:limit]) + (", ..." if flat.size > limit else "")
    return head + stats + bad + f"\n    [{vals}]"


def _outputs(graph: ir.GraphDecl, outs) -> dict[str, np.ndarray]:
    if isinstance(outs, dict):
        return {str(k).lstrip("%"): v for k, v in outs.items()}
    if isinstance(outs, np.ndarray):
        outs = (outs,)
    ret = next((s for s in graph.body if isinstance(s, ir.ReturnStmt)), None)
    names = [v.name for v in ret.values] if ret is not None else []
    result: dict[str, np.ndarray] = {}
    for i, a in enumerate(outs):
        key = names[i] if i < len(names) and names[i] not in result else f"out{i}"
        result[key] = a
    return result


def _save(path: str, arrays: dict[str, np.ndarray]) -> None:
    plain = {k: (np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind in "fV" else np.asarray(v))
             for k, v in arrays.items()}
    buf = io.BytesIO()
    np.savez(buf, **plain)
    try:
        write_atomic(path, lambda f: f.write(buf.getvalue()), binary=True)
    except OSError as e:
        raise MpkError(Diagnostic(f"cannot write {path}: {e.strerror or e}")) from None


def run(args) -> int:
    if args.device == "gpu":  # the persistent megakernel (issue 4): mpkir.runtime.host
        from mpkir.runtime.host import run_cli
        return run_cli(args)
    from mpkir.interpreter import init_state, random_weights, run_graph

    if args.inputs and args.tokens is not None:
        raise UsageError("give --inputs or --tokens, not both")
    module, analysis, _ = load_verified(args.path)
    try:
        graph = module.graph(args.graph)
    except KeyError:
        names = ", ".join(g.name for g in module.graphs)
        raise UsageError(f"--graph {args.graph}: no such graph (graphs: {names})") from None
    dims = dict(args.dim or [])
    if args.inputs:
        inputs = _load_npz(args.inputs, "inputs")
        missing = [p.name for p in graph.params if p.name not in inputs]
        if missing:
            given = make_inputs(module, analysis, graph, dims=dims, seed=args.seed)
            inputs = {**{k: given[k] for k in missing}, **inputs}
        types = analysis.graphs[graph.name].types
        inputs = {k: (_as_dtype(v, types[k].dtype.numpy) if k in types else v) for k, v in inputs.items()}
    else:
        inputs = make_inputs(module, analysis, graph, tokens=args.tokens, dims=dims, seed=args.seed)
    weights = load_weights(module, analysis, args.weights) if args.weights else \
        random_weights(module, analysis, seed=args.seed)
    state = init_state(module, analysis)
    outs = _outputs(graph, run_graph(module, inputs, weights, state, graph=graph.name, analysis=analysis))
    if not args.quiet:
        for k in (p.name for p in graph.params):
            print(summarize(k, inputs[k]).replace("%", "input %", 1))
        for k, v in outs.items():
            print(summarize(k, v))
    if args.save:
        _save(args.save, outs)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="execute a graph: CPU reference interpreter, or the GPU megakernel (--device gpu)",
        description="Verify FILE and execute one graph with the NumPy reference interpreter (bf16 stored "
                    "through ml-dtypes, computed in float32). Inputs not given are made up: random token "
                    "ids in the vocabulary, positions 0..T-1 of one request, seq_ids 0, a page table, "
                    "random floats. Weights are random unless --weights is given; state (KV caches) starts "
                    "at zero. Prints every input and output with its shape and a few values. With --device "
                    "gpu the graph is compiled into one CUDA megakernel that runs --steps decode steps in "
                    "one launch (random weights) and prints the tokens and the time per step.")
    p.add_argument("path", metavar="FILE", help=".mpk file ('-' reads stdin)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--inputs", metavar="IN.npz",
                     help="graph inputs by parameter name (missing ones are made up)")
    src.add_argument("--tokens", type=_ints, metavar="1,2,3", help="token ids for the token-id parameter")
    p.add_argument("--dim", type=_dim_binding, action="append", metavar="NAME=N",
                   help="bind a symbolic dim (default: the number of tokens, else its bound); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    p.add_argument("--weights", metavar="CKPT.npz",
                   help="weights keyed by checkpoint name (default: random, seeded by --seed)")
    p.add_argument("--graph", metavar="NAME", help="graph to run (default: the first one)")
    p.add_argument("--save", metavar="OUT.npz",
                   help="save the outputs by name (floats as float32), written atomically")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: NumPy interpreter; gpu: the CUDA megakernel (N steps in one launch)")
    p.add_argument("--steps", type=int, default=1, help="gpu: decode steps in the one launch (default: 1)")
    p.add_argument("--trace", metavar="OUT.json", help="gpu: per-SM task timeline (Chrome/Perfetto JSON)")
    p.add_argument("--numerics", choices=["fast", "exact"], default="fast",
                   help="gpu: fast (float32 sums, tensor cores; default) or exact (float64 sums, rounded "
                        "only where the IR rounds: the bf16 values of a float64 reference of the graph; "
                        "slower)")
    p.add_argument("--greedy", action="store_true",
                   help="gpu: take the most likely token where the graph samples (default: sample in the "
                        "kernel as the graph's sample op says: temperature, top-k, top-p, seed)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing (use with --save)")
    p.set_defaults(func=run)
