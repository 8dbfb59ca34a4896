"""Found-program entries for modules the search never ran on (tiny test checkpoints): the structure of a
found program of the same kind (``bench/superopt_programs.json``), re-sized to each subgraph of the module."""

from __future__ import annotations

import dataclasses


def resized_entries(module, entries: list[dict], kind: str, rows: int, loop: int = 2) -> list[dict]:
    """One entry per ``kind`` subgraph of ``module`` (norm_linear / act_down: one output dim tiled over a 1-D
    grid), its program the first such entry's re-sized: tiles of the largest divisor of the output width
    that is <= ``rows``, ``loop`` chunks of the reduced dim."""
    from mpkir.passes.superopt.partition import partition
    from mpkir.passes.superopt.program import parse_program, print_program
    from mpkir.verify import analyze

    base = parse_program(next(e for e in entries if e["kind"] == kind)["program"])
    out = []
    for sg in partition(module, analyze(module)):
        if sg.kind != kind:
            continue
        n = dict(sg.dims)["N" if kind == "norm_linear" else "H"]
        tile = max(d for d in range(1, rows + 1) if n % d == 0)
        prog = resized(base, sg, (n // tile,), loop)
        entry = {"kind": kind, "covers": list(sg.covers), "dims": dict(sg.dims), "consts": dict(sg.consts)}
        out.append({**entry, "outs": sg.outs, "program": print_program(prog), "applied": False,
                    "decision": "the found structure re-sized (tests)"})
    return out


def resized(prog, sg, grid: tuple[int, ...], loop: int):
    """``prog`` (a found program of ``sg``'s kind) with ``sg``'s tensor shapes and constants, on ``grid``."""
    from mpkir.passes.superopt.program import validate
    from mpkir.passes.superopt.targets import inputs_of, output_shape

    ins = inputs_of(sg)
    red = dict(sg.dims).get("K", dict(sg.dims).get("D"))

    def op(o):
        if o.kind != "rsqrt_mean":
            return o
        return dataclasses.replace(o, attrs=(("n", float(red)), ("eps", sg.c("eps"))))

    new = dataclasses.replace(
        prog,
        grid=grid,
        loop=loop,
        inputs=tuple(dataclasses.replace(i, shape=ins[i.name]) for i in prog.inputs),
        body=tuple(op(o) for o in prog.body),
        epilogue=tuple(op(o) for o in prog.epilogue),
        outputs=tuple(dataclasses.replace(o, shape=output_shape(sg)) for o in prog.outputs),
    )
    validate(new)
    return new
