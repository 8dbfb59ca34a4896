"""Subgraph kinds the superoptimizer searches: their kernel-level target (a one-block program) and sizes."""

from __future__ import annotations

from dataclasses import dataclass

from mpkir.passes.superopt.program import Input, Op, Output, Program


@dataclass(frozen=True)
class Subgraph:
    """A piece of the operator graph: ``kind``, the IR values it covers, its sizes and constants."""

    kind: str  # norm_linear | act_down | headnorm_rope | decode_attention
    covers: tuple[str, ...]
    dims: tuple[tuple[str, int], ...]
    consts: tuple[tuple[str, float], ...] = ()
    outs: int = 1  # number of linears sharing the normalised input (norm_linear)

    def d(self, k):
        return dict(self.dims)[k]

    def c(self, k):
        return dict(self.consts)[k]

    def resized(self, **dims) -> Subgraph:
        return Subgraph(
            self.kind, self.covers, tuple({**dict(self.dims), **dims}.items()), self.consts, self.outs
        )


def _op(r, k, *args, **attrs):
    return Op((r,), k, tuple(args), tuple(attrs.items()))


def inputs_of(sg: Subgraph) -> dict[str, tuple[int, ...]]:
    if sg.kind == "norm_linear":
        return {"x": (sg.d("M"), sg.d("K")), "g": (sg.d("K"),), "w": (sg.d("N"), sg.d("K"))}
    if sg.kind == "act_down":
        return {"gate": (sg.d("M"), sg.d("F")), "up": (sg.d("M"), sg.d("F")), "wd": (sg.d("H"), sg.d("F"))}
    if sg.kind == "headnorm_rope":
        t, h, d = sg.d("T"), sg.d("Hh"), sg.d("D")
        return {"x": (t, h, d), "g": (d,), "cos": (t, 1, d), "sin": (t, 1, d)}
    if sg.kind == "decode_attention":
        return {"q": (sg.d("G"), sg.d("D")), "k": (sg.d("N"), sg.d("D")), "v": (sg.d("N"), sg.d("D"))}
    raise ValueError(sg.kind)


def output_shape(sg: Subgraph) -> tuple[int, ...]:
    return {
        "norm_linear": lambda: (sg.d("M"), sg.d("N")),
        "act_down": lambda: (sg.d("M"), sg.d("H")),
        "headnorm_rope": lambda: (sg.d("T"), sg.d("Hh"), sg.d("D")),
        "decode_attention": lambda: (sg.d("G"), sg.d("D")),
    }[sg.kind]()


def target(sg: Subgraph) -> Program:
    """The subgraph's operator semantics, written as one block with the whole tensors."""
    if sg.kind == "norm_linear":
        body = (
            _op("s", "square", "x"),
            _op("ss", "sum", "%s", axis=-1),
            _op("r", "rsqrt_mean", "%ss", n=sg.d("K"), eps=sg.c("eps")),
            _op("xn", "mul", "x", "%r"),
            _op("xg", "mul", "%xn", "g"),
            _op("y", "matmul_nt", "%xg", "w"),
        )
    elif sg.kind == "act_down":
        body = (_op("a", "silu", "gate"), _op("h", "mul", "%a", "up"), _op("y", "matmul_nt", "%h", "wd"))
    elif sg.kind == "headnorm_rope":
        body = (
            _op("s", "square", "x"),
            _op("ss", "sum", "%s", axis=-1),
            _op("r", "rsqrt_mean", "%ss", n=sg.d("D"), eps=sg.c("eps")),
            _op("xn", "mul", "x", "%r"),
            _op("xg", "mul", "%xn", "g"),
            _op("c", "mul", "%xg", "cos"),
            _op("rh", "rot_half", "%xg"),
            _op("sr", "mul", "%rh", "sin"),
            _op("y", "add", "%c", "%sr"),
        )
    elif sg.kind == "decode_attention":
        body = (
            _op("s", "matmul_nt", "q", "k"),
            _op("s2", "scale", "%s", c=sg.c("scale")),
            _op("m", "max", "%s2", axis=-1),
            _op("dd", "sub", "%s2", "%m"),
            _op("p", "exp", "%dd"),
            _op("l", "sum", "%p", axis=-1),
            _op("o", "matmul", "%p", "v"),
            _op("y", "div", "%o", "%l"),
        )
    else:
        raise ValueError(sg.kind)
    ins = tuple(Input(n, s, (), -1) for n, s in inputs_of(sg).items())
    return Program(f"{sg.kind}_ref", (), 1, ins, body, (), (), (Output("y", output_shape(sg), "%y", ()),))
