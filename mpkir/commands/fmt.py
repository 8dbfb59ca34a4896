"""``mpkir fmt FILE [-i | -o OUT | --check]``: print a file in canonical form."""

from __future__ import annotations

import os
import sys

from mpkir.commands import UsageError, load, write_text


def run(args) -> int:
    from mpkir.comments import scan_layout
    from mpkir.printer import print_module

    if args.in_place and args.path == "-":
        raise UsageError("-i needs a file, not stdin")
    module, text = load(args.path)  # raises (exit 1, nothing written) unless the file parses
    out = print_module(module, scan_layout(text))
    if args.check:
        if out != text:
            print(f"{args.path}: not in canonical form (run 'mpkir fmt -i {args.path}')", file=sys.stderr)
            return 1
        return 0
    if args.in_place:
        if out != text:
            target = os.path.realpath(args.path)  # through a symlink, rewrite the file it points to
            write_text(target, out, mode=os.stat(target).st_mode & 0o7777)
        return 0
    write_text(args.output, out)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "fmt", help="print a .mpk file in canonical form",
        description="Print a .mpk file in canonical form. Comments are kept (above the declaration or "
                    "statement they preceded, or after the line they trailed), and so are blank lines "
                    "between declarations and statements (one for several). The file must parse; nothing "
                    "is written otherwise. Output goes to stdout unless -i or -o is given.")
    p.add_argument("path", metavar="FILE", help=".mpk file ('-' reads stdin)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("-i", "--in-place", action="store_true",
                     help="rewrite FILE in place (atomically, and only if it parses and changes)")
    how.add_argument("-o", "--output", metavar="OUT", help="write to OUT (atomically) instead of stdout")
    how.add_argument("--check", action="store_true",
                     help="write nothing; exit 1 if FILE is not in canonical form")
    p.set_defaults(func=run)
