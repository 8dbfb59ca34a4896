"""``python -m mpkir VERB ...``: the command line.

Verbs are the modules of :mod:`mpkir.commands`, found automatically: each defines
``register(subparsers)``, which adds its parser and sets ``func`` (``args -> exit status``).

Exit status: 0 success, 1 diagnostics about the input, 2 usage errors, 3 internal errors (a bug).
Results go to stdout, diagnostics and dumps to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import traceback
from collections.abc import Sequence

from mpkir import __version__
from mpkir.diagnostics import MpkError

PROG = "mpkir"


def _broken_command(sub, name: str, exc: BaseException) -> None:
    """A command module that fails to import still shows up, and says why when run."""
    p = sub.add_parser(name, help=f"(unavailable: {type(exc).__name__} on import)", add_help=True)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def func(args) -> int:
        raise RuntimeError(f"command module mpkir.commands.{name} failed to import: "
                           f"{type(exc).__name__}: {exc}") from exc

    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per module of :mod:`mpkir.commands`."""
    import mpkir.commands as commands

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compile an LLM forward pass written in .mpk into one persistent CUDA megakernel.",
        epilog="Run 'mpkir VERB --help' for a verb's options. Exit status: 0 ok, 1 errors in the input, "
               "2 usage errors, 3 internal errors.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show the Python traceback of an internal error (also MPKIR_TRACEBACK=1)")
    sub = parser.add_subparsers(dest="command", metavar="VERB", title="verbs")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{commands.__name__}.{info.name}")
            register = mod.register
        except Exception as e:  # one broken verb must not take the others down
            _broken_command(sub, info.name, e)
            continue
        register(sub)
    return parser


def _source_for(e: MpkError, path: str | None, cache: dict[str, str | None]) -> str | None:
    if e.source is not None:
        return e.source
    if path is None or path.startswith("<"):
        return None
    if path not in cache:
        try:
            with open(path, encoding="utf-8") as f:
                cache[path] = f.read()
        except (OSError, UnicodeDecodeError):
            cache[path] = None
    return cache[path]


def render_error(e: MpkError, path: str | None = None) -> str:
    """Every diagnostic of ``e``, each with its source line and caret when the file can be read.

    A diagnostic without a location is prefixed with ``path`` (the file it is about), if given.
    """
    cache: dict[str, str | None] = {}
    out = []
    for d in e.diagnostics:
        src = _source_for(e, d.span.file if d.span else None, cache)
        text = d.render(src)
        out.append(f"{path}: {text}" if d.span is None and path else text)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse usage errors return 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    from mpkir.commands import UsageError
    from mpkir.passes.manager import PipelineError

    try:
        return int(args.func(args) or 0)
    except PipelineError as e:
        print(f"{PROG} {args.command}: error: " + render_error(e).removeprefix("error: "), file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MpkError as e:
        print(render_error(e), file=sys.stderr)
        return 1
    except RecursionError:
        print(f"{PROG}: error: the input is nested too deeply to process", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except Exception as e:
        if args.traceback or os.environ.get("MPKIR_TRACEBACK"):
            traceback.print_exc()
        print(f"{PROG}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        print("hint: this is a bug in mpkir, not in your input; rerun with --traceback (before the verb) "
              "for details and report it", file=sys.stderr)
        return 3

