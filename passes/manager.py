"""The pass manager: the pass registry, pipeline specs (``"a,b{key=value,flag}"``) and instrumentation.

A pass is a frozen dataclass with ``name: ClassVar[str]`` and ``run(module) -> Module``; its fields
are its options (``superopt{timeout-s=60}`` sets ``timeout_s``; a bare ``{flag}`` sets a bool to true).

Registering a pass is one line: either an entry in :data:`_BUILTIN` (``"name": "module:Class"``,
imported only when that pass is looked up) or the :func:`register` decorator on the class in any
module under ``mpkir.passes`` (found by importing the pass modules the first time a name is not in
the table, or when all passes are listed).  Importing this manager imports neither z3 nor CUDA code.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import time
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TextIO

from mpkir import ir
from mpkir.diagnostics import Diagnostic, MpkError

# name -> "module:Class", imported on first use.  Add a pass here.
_BUILTIN: dict[str, str] = {
    "verify": "mpkir.passes.verify_pass:Verify",
    "infer-shapes": "mpkir.passes.infer_shapes:InferShapes",
    "unroll": "mpkir.passes.unroll:Unroll",
    "dce": "mpkir.passes.dce:DeadCodeElimination",
    "fold-constants": "mpkir.passes.fold:FoldConstants",
}


class Pass(Protocol):
    """What a pass looks like (a frozen dataclass whose fields are its options)."""

    name: ClassVar[str]

    def run(self, module: ir.Module) -> ir.Module: ...


class PipelineError(MpkError):
    """A pipeline spec that cannot be used (unknown pass or option, bad value): a usage error."""

    def __init__(self, message: str, *notes: str):
        super().__init__(Diagnostic(message, notes=tuple(notes)))


class _Registry(Mapping[str, type]):
    """``PASSES``: pass name -> pass class, importing each pass's module on first lookup."""

    def __init__(self, lazy: dict[str, str]):
        self._lazy = lazy
        self._loaded: dict[str, type] = {}
        self._discovered = False
        self.broken: dict[str, str] = {}  # pass module -> why it failed to import during discovery

    def discover(self) -> None:
        """Import every module under ``mpkir.passes`` once, so that ``@register`` passes are known."""
        if self._discovered:
            return
        self._discovered = True
        import pkgutil

        import mpkir.passes as pkg

        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=lambda name: None):
            if info.name.rsplit(".", 1)[-1].startswith("_") or info.name == __name__:
                continue
            try:
                importlib.import_module(info.name)
            except Exception as e:  # one broken pass module must not hide the others
                self.broken[info.name] = f"{type(e).__name__}: {e}"

    def add(self, cls: type) -> type:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} needs a class attribute 'name: ClassVar[str]'")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"pass {name!r}: {cls.__name__} must be a (frozen) dataclass")
        self._loaded[name] = cls
        return cls

    def __getitem__(self, name: str) -> type:
        if name in self._loaded:
            return self._loaded[name]
        target = self._lazy.get(name)
        if target is None:
            self.discover()
            if name in self._loaded:
                return self._loaded[name]
            raise KeyError(name)
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        self._loaded[name] = cls
        return cls

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(sorted({*self._lazy, *self._loaded}))

    def __len__(self) -> int:
        self.discover()
        return len({*self._lazy, *self._loaded})

    def __contains__(self, name: object) -> bool:
        if name in self._lazy or name in self._loaded:
            return True
        self.discover()
        return name in self._loaded


PASSES = _Registry(_BUILTIN)


def register(cls: type) -> type:
    """Class decorator: make a pass available by its ``name`` (idempotent)."""
    return PASSES.add(cls)


def describe(name: str) -> str:
    """The first line of a pass's docstring (imports its module)."""
    doc = (PASSES[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


# --------------------------------------------------------------------------------- pipeline specs

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


def _split_top(spec: str) -> list[str]:
    """Split on commas that are not inside ``{...}``."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"pipeline '{spec}': unbalanced '}}'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise PipelineError(f"pipeline '{spec}': unbalanced '{{'")
    parts.append("".join(cur))
    return parts


def _options(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _hint(cls: type, field: str) -> Any:
    try:
        hint = typing.get_type_hints(cls).get(field, str)
    except Exception:  # an annotation that cannot be resolved: treat the value as text
        return str
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return hint


def _convert(pass_name: str, key: str, raw: str | None, hint: Any) -> Any:
    where = f"option '{key}' of pass '{pass_name}'"
    if hint is bool:
        if raw is None or raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise PipelineError(f"{where} expects true or false, got '{raw}'")
    if raw is None:
        raise PipelineError(f"{where} needs a value ({key}=...)")
    try:
        if hint is int:
            return int(raw, 0)
        if hint is float:
            return float(raw)
    except ValueError:
        want = "an integer" if hint is int else "a number"
        raise PipelineError(f"{where} expects {want}, got '{raw}'") from None
    if typing.get_origin(hint) is tuple:
        item = (typing.get_args(hint) or (str,))[0]
        return tuple(_convert(pass_name, key, x.strip(), item) for x in raw.split(":") if x.strip())
    return raw


def make_pass(name: str, options: Mapping[str, str | None] | None = None) -> Pass:
    """Instantiate a registered pass from textual options (``None`` value = bare flag)."""
    if name not in PASSES:
        raise PipelineError(f"unknown pass '{name}'", "valid passes: " + ", ".join(PASSES))
    cls = PASSES[name]
    fields = _options(cls)
    kwargs: dict[str, Any] = {}
    for key, raw in (options or {}).items():
        attr = key.replace("-", "_")
        if attr not in fields:
            valid = ", ".join(f.replace("_", "-") for f in fields) or "none"
            raise PipelineError(f"pass '{name}' has no option '{key}'", f"its options: {valid}")
        kwargs[attr] = _convert(name, key, raw, _hint(cls, attr))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"pass '{name}': {e}") from None


def parse_pipeline(spec: str) -> tuple[Pass, ...]:
    """``"unroll,dce,superopt{timeout-s=60,verbose}"`` -> pass instances (raises PipelineError)."""
    out: list[Pass] = []
    if not spec.strip():
        return ()
    for part in _split_top(spec):
        part = part.strip()
        if not part:
            raise PipelineError(f"pipeline '{spec}' has an empty pass name")
        name, brace, rest = part.partition("{")
        name = name.strip()
        if not _NAME.match(name):
            raise PipelineError(f"pipeline '{spec}': '{name}' is not a pass name")
        options: dict[str, str | None] = {}
        if brace:
            if not rest.endswith("}"):
                raise PipelineError(f"pipeline '{spec}': text after '}}' in '{part}'")
            for item in rest[:-1].split(","):
                item = item.strip()
                if not item:
                    continue
                key, eq, value = item.partition("=")
                options[key.strip()] = value.strip() if eq else None
        out.append(make_pass(name, options))
    return tuple(out)


def pipeline_spec(passes: Sequence[Pass]) -> str:
    """Print passes back as a spec that :func:`parse_pipeline` reads (options that differ from defaults)."""

    def one(p: Pass) -> str:
        opts = []
        for f in dataclasses.fields(p):  # type: ignore[arg-type]
            v = getattr(p, f.name)
            if f.init and (f.default is dataclasses.MISSING or v != f.default):
                if isinstance(v, bool):
                    v = "true" if v else "false"
                elif isinstance(v, tuple):
                    v = ":".join(str(x) for x in v)
                opts.append(f"{f.name.replace('_', '-')}={v}")
        return p.name + ("{" + ",".join(opts) + "}" if opts else "")

    return ",".join(one(p) for p in passes)


# --------------------------------------------------------------------------------- running

class Instrument:
    """Hooks called around every pass (override what you need)."""

    def before(self, p: Pass, module: ir.Module) -> None:
        pass

    def after(self, p: Pass, module: ir.Module, seconds: float) -> None:
        pass


class PrintIR(Instrument):
    """Print the module around passes, under MLIR's banner, to ``stream`` (default stderr).

    ``before``/``after`` select the dumps; ``only`` restricts them to the named passes.
    """

    def __init__(self, stream: TextIO | None = None, *, before: bool = False, after: bool = True,
                 only: Sequence[str] | None = None):
        self.stream = stream
        self.when = {"Before": before, "After": after}
        self.only = set(only) if only else None

    def _dump(self, when: str, p: Pass, module: ir.Module) -> None:
        from mpkir.printer import print_module

        if not self.when[when] or (self.only is not None and p.name not in self.only):
            return
        out = self.stream or sys.stderr
        out.write(f"// -----// IR Dump {when} {p.name} //----- //\n")
        out.write(print_module(module))
        out.flush()

    def before(self, p: Pass, module: ir.Module) -> None:
        self._dump("Before", p, module)

    def after(self, p: Pass, module: ir.Module, seconds: float) -> None:
        self._dump("After", p, module)


class PrintIRAfterAll(PrintIR):
    """``--print-ir-after-all``: the module after every pass (``// -----// IR Dump After P //----- //``)."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream)


class Timing(Instrument):
    """``--timing``: wall time per pass; :meth:`report` prints MLIR's execution time report."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def after(self, p: Pass, module: ir.Module, seconds: float) -> None:
        self.times.append((p.name, seconds))

    def report(self) -> str:
        total = sum(t for _, t in self.times)
        bar = "===" + "-" * 73 + "==="
        lines = [bar, "... Execution time report ...".center(len(bar)).rstrip(), bar,
                 f"  Total Execution Time: {total:.4f} seconds", "", "  ----Wall Time----  ----Name----"]
        for name, t in [*self.times, ("Total", total)]:
            pct = 100.0 * t / total if total > 0 else 0.0
            lines.append(f"  {t:8.4f} ({pct:5.1f}%)  {name}")
        return "\n".join(lines) + "\n"


class VerifyEach(Instrument):
    """``--verify-each``: run the verifier after every pass; a failure names the pass that broke the IR."""

    def after(self, p: Pass, module: ir.Module, seconds: float) -> None:
        from mpkir.verify import analyze

        a = analyze(module)
        if not a.ok:
            diags = [dataclasses.replace(d, notes=(*d.notes, f"in the IR after pass '{p.name}'"))
                     for d in a.diagnostics if d.severity == "error"]
            raise MpkError(diags)


def run_passes(module: ir.Module, passes: Sequence[Pass] | str,
               instruments: Sequence[Instrument] = ()) -> ir.Module:
    """Run passes (instances or a spec string) in order, calling every instrument around each."""
    if isinstance(passes, str):
        passes = parse_pipeline(passes)
    for p in passes:
        for ins in instruments:
            ins.before(p, module)
        t0 = time.perf_counter()
        module = p.run(module)
        dt = time.perf_counter() - t0
        for ins in instruments:
            ins.after(p, module, dt)
    return module
