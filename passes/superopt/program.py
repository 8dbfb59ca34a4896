"""Block-level programs (Mirage's block μGraph): the IR, its textual form and its parser.

A :class:`Program` is one task type: a grid (one grid point = one task), a loop count, inputs with an
``imap`` (per grid axis: the tensor dim split across the axis, or -1 = replicated) and an ``fmap`` (the
dim split across loop iterations, or -1), three explicit regions — ``body`` (ops on tiles, every
iteration), ``accs`` (accumulators closing the loop) and ``epilogue`` (ops after the loop) — and outputs
with an ``omap`` (per grid axis, the output dim along which block tiles are concatenated).
A :class:`Fused` is a short sequence of programs (e.g. split-KV partials then the merge). A split-KV attention
program may be marked ``paged(k, v)`` (after ``threads``): its k/v rows are then gathered through the
megakernel's page table up to each token's position (semantics, emitter and proof: :mod:`paged`).

Text form (own grammar, so it can be carried in a string attribute ``program="..."``)::

    program rms_linear grid(4) loop(2) {
      in x: [2, 64] imap(-1) fmap(1)
      in w: [32, 64] imap(0) fmap(1)
      body %a = matmul_nt(x, w)
      body %s = square(x)
      body %t = sum(%s, axis=-1)
      acc %A = sum(%a)
      acc %S = sum(%t)
      epi %r = rsqrt_mean(%S, n=64, eps=1e-05)
      epi %o = mul(%A, %r)
      out y: [2, 32] = %o omap(1)
    }
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lark import Lark, Transformer

UNARY = ("exp", "silu", "rsqrt", "square", "rot_half")
BINARY = ("add", "sub", "mul", "div", "matmul", "matmul_nt")
REDUCE = ("sum", "max")
CONST = ("scale", "addc", "rsqrt_mean")  # scale(x, c=..), addc(x, c=..), rsqrt_mean(x, n=.., eps=..)
BLOCK_OPS = UNARY + BINARY + REDUCE + CONST
ACCS = ("sum", "max", "online_softmax")  # online_softmax(s, v) -> o, l, m (max + rescale)


@dataclass(frozen=True)
class Input:
    name: str
    shape: tuple[int, ...]
    imap: tuple[int, ...]
    fmap: int = -1


@dataclass(frozen=True)
class Op:
    results: tuple[str, ...]
    kind: str
    args: tuple[str, ...]
    attrs: tuple[tuple[str, float], ...] = ()

    def attr(self, key: str, default=None):
        return dict(self.attrs).get(key, default)


@dataclass(frozen=True)
class Output:
    name: str
    shape: tuple[int, ...]
    value: str
    omap: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    name: str
    grid: tuple[int, ...]
    loop: int
    inputs: tuple[Input, ...]
    body: tuple[Op, ...]
    accs: tuple[Op, ...]
    epilogue: tuple[Op, ...]
    outputs: tuple[Output, ...]
    threads: int = field(default=512)  # the megakernel's fixed CTA size (MK_NT)
    # inputs whose rows are gathered through the megakernel's page table up to each token's position (the
    # split-KV attention form, passes/superopt/paged.py): text ``paged(k, v)``; () = dense
    paged: tuple[str, ...] = ()

    @property
    def ntasks(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


@dataclass(frozen=True)
class Fused:
    """Programs run in order; a later program may read an earlier one's outputs by name."""

    programs: tuple[Program, ...]


# ------------------------------------------------------------------ printing
def _fmt_num(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _fmt_op(region: str, op: Op) -> str:
    res = ", ".join("%" + r for r in op.results)
    args = list(op.args)
    args += [f"{k}={_fmt_num(v)}" for k, v in op.attrs]
    return f"  {region} {res} = {op.kind}({', '.join(args)})"


def _tup(t) -> str:
    return "(" + ", ".join(str(x) for x in t) + ")"


def print_program(p: Program) -> str:
    pg = f" paged({', '.join(p.paged)})" if p.paged else ""
    lines = [f"program {p.name} grid{_tup(p.grid)} loop({p.loop}) threads({p.threads}){pg} {{"]
    for i in p.inputs:
        lines.append(f"  in {i.name}: {list(i.shape)} imap{_tup(i.imap)} fmap({i.fmap})")
    for region, ops in (("body", p.body), ("acc", p.accs), ("epi", p.epilogue)):
        lines += [_fmt_op(region, o) for o in ops]
    for o in p.outputs:
        lines.append(f"  out {o.name}: {list(o.shape)} = {o.value} omap{_tup(o.omap)}")
    lines.append("}")
    return "\n".join(lines)


def print_fused(f: Fused) -> str:
    return "\n".join(print_program(p) for p in f.programs)


# ------------------------------------------------------------------ parsing
_GRAMMAR = r"""
start: program+
program: "program" NAME "grid" ints "loop" "(" INT ")" ("threads" "(" INT ")")? paged? "{" item* "}"
paged: "paged" "(" NAME ("," NAME)* ")"
?item: input | op | output
input: "in" NAME ":" shape "imap" ints "fmap" "(" SINT ")"
op: REGION results "=" NAME "(" [arg ("," arg)*] ")"
results: VAL ("," VAL)*
?arg: VAL -> ref | NAME -> ref | NAME "=" NUMBER -> kw
output: "out" NAME ":" shape "=" VAL "omap" ints
shape: "[" [INT ("," INT)*] "]"
ints: "(" [SINT ("," SINT)*] ")"
REGION: "body" | "acc" | "epi"
VAL: "%" NAME
SINT: /-?\d+/
NUMBER: /-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?/
%import common.CNAME -> NAME
%import common.INT
%import common.WS
%ignore WS
%ignore /\/\/[^\n]*/
"""


@dataclass(frozen=True)
class _Paged:
    names: tuple[str, ...]


class _T(Transformer):
    def start(self, ps):
        return Fused(tuple(ps))

    def ints(self, xs):
        return tuple(int(x) for x in xs if x is not None)

    def shape(self, xs):
        return tuple(int(x) for x in xs if x is not None)

    def input(self, c):
        return Input(str(c[0]), c[1], c[2], int(c[3]))

    def results(self, xs):
        return tuple(str(x)[1:] for x in xs)

    def ref(self, c):
        return ("ref", str(c[0]))

    def kw(self, c):
        return ("kw", (str(c[0]), float(c[1])))

    def op(self, c):
        region, results, kind, *args = c
        refs = tuple(a[1] for a in args if a is not None and a[0] == "ref")
        kws = tuple(a[1] for a in args if a is not None and a[0] == "kw")
        return (str(region), Op(results, str(kind), refs, kws))

    def output(self, c):
        return Output(str(c[0]), c[1], str(c[2]), c[3])

    def paged(self, names):
        return _Paged(tuple(str(n) for n in names))

    def program(self, c):
        name, grid, loop, *rest = c
        threads = 512
        if rest and not isinstance(rest[0], (Input, Output, tuple, _Paged)):
            threads, rest = int(rest[0]), rest[1:]
        paged = ()
        if rest and isinstance(rest[0], _Paged):
            paged, rest = rest[0].names, rest[1:]
        ins = tuple(x for x in rest if isinstance(x, Input))
        outs = tuple(x for x in rest if isinstance(x, Output))
        ops = [x for x in rest if isinstance(x, tuple)]
        regions = {r: tuple(o for rr, o in ops if rr == r) for r in ("body", "acc", "epi")}
        return Program(
            str(name),
            grid,
            int(loop),
            ins,
            regions["body"],
            regions["acc"],
            regions["epi"],
            outs,
            threads,
            paged,
        )


_PARSER = Lark(_GRAMMAR, parser="lalr")


class ProgramError(ValueError):
    """A block program that does not parse or is not valid."""


def parse_fused(text: str) -> Fused:
    try:
        return _T().transform(_PARSER.parse(text))
    except Exception as e:  # lark errors carry line/column in their message
        raise ProgramError(f"block program: {e}") from None


def parse_program(text: str) -> Program:
    f = parse_fused(text)
    if len(f.programs) != 1:
        raise ProgramError("expected exactly one program")
    return f.programs[0]


def validate(p: Program) -> None:
    """Static checks: names defined before use, maps in range, splits even, known ops."""
    defined = {i.name for i in p.inputs}
    for i in p.inputs:
        if len(i.imap) != len(p.grid):
            raise ProgramError(f"{p.name}: input {i.name}: imap needs {len(p.grid)} entries")
        for a, d in enumerate(i.imap):
            if d >= len(i.shape) or (d >= 0 and i.shape[d] % p.grid[a]):
                raise ProgramError(f"{p.name}: input {i.name}: imap dim {d} does not split by {p.grid[a]}")
        if i.fmap >= len(i.shape) or (i.fmap >= 0 and i.shape[i.fmap] % p.loop):
            raise ProgramError(f"{p.name}: input {i.name}: fmap dim {i.fmap} does not split by loop {p.loop}")
    for region, ops, known in (
        ("body", p.body, BLOCK_OPS),
        ("acc", p.accs, ACCS),
        ("epi", p.epilogue, BLOCK_OPS),
    ):
        for o in ops:
            if o.kind not in known:
                raise ProgramError(f"{p.name}: unknown {region} op {o.kind!r}")
            for a in o.args:
                name = a[1:] if a.startswith("%") else a
                if name not in defined:
                    raise ProgramError(f"{p.name}: {o.kind} uses undefined {a}")
            defined.update(o.results)
    for o in p.outputs:
        if o.value[1:] not in defined:
            raise ProgramError(f"{p.name}: output {o.name} reads undefined {o.value}")
        if len(o.omap) != len(p.grid):
            raise ProgramError(f"{p.name}: output {o.name}: omap needs {len(p.grid)} entries")
    if p.paged:
        from mpkir.passes.superopt.paged import split_roles

        if set(p.paged) != {"k", "v"}:
            raise ProgramError(f"{p.name}: paged({', '.join(p.paged)}): only the k and v rows are paged")
        split_roles(p)  # the split-KV attention form (raises ProgramError)
