"""``mpkir check FILE...``: parse and verify; print every error, or nothing."""

from __future__ import annotations

import sys

from mpkir.commands import display_name, read_source
from mpkir.diagnostics import MpkError


def check_file(path: str) -> bool:
    """Print every diagnostic about one file to stderr; True when it has no error."""
    from mpkir.cli import render_error
    from mpkir.parser import parse
    from mpkir.verify import analyze

    try:
        text = read_source(path)
        module = parse(text, display_name(path))
    except MpkError as e:
        print(render_error(e, display_name(path)), file=sys.stderr)
        return False
    analysis = analyze(module)
    if analysis.diagnostics:
        print(render_error(MpkError(analysis.diagnostics, text), display_name(path)), file=sys.stderr)
    return analysis.ok


def run(args) -> int:
    ok = [check_file(p) for p in args.files]
    return 0 if all(ok) else 1


def register(sub) -> None:
    p = sub.add_parser(
        "check", help="parse and verify .mpk files",
        description="Parse and verify .mpk files. Prints nothing and exits 0 when they are valid; otherwise "
                    "prints every error as FILE:LINE:COL: error: MESSAGE with the source line and a caret "
                    "to stderr and exits 1.")
    p.add_argument("files", nargs="+", metavar="FILE", help=".mpk file to check ('-' reads stdin)")
    p.set_defaults(func=run)
