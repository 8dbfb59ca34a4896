"""``mpkir opt FILE -p PIPELINE [--emit NAME]``: run passes and emit the result."""

from __future__ import annotations

import argparse
import sys

from mpkir.commands import UsageError, load, write_text
from mpkir.diagnostics import MpkError


def _list_passes() -> str:
    from mpkir.passes.manager import PASSES, describe

    lines = ["passes:"]
    for name in PASSES:
        try:
            doc = describe(name)
        except Exception as e:  # a pass whose module does not import: say so, list the rest
            doc = f"(unavailable: {type(e).__name__}: {e})"
        lines.append(f"  {name:<22} {doc}")
    for module, why in PASSES.broken.items():
        lines.append(f"  (module {module} failed to import: {why})")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from mpkir.emitters import discover
    from mpkir.passes.manager import (
        PASSES,
        PrintIR,
        Timing,
        VerifyEach,
        parse_pipeline,
        pipeline_spec,
        run_passes,
    )
    from mpkir.verify import analyze

    if args.list_passes:
        sys.stdout.write(_list_passes())
        return 0
    if args.path is None:
        raise UsageError("the following arguments are required: FILE")
    passes = parse_pipeline(args.passes or "")  # a bad spec is a usage error, reported before reading
    if args.dump_pass_pipeline:
        print(pipeline_spec(passes), file=sys.stderr)
    emitters = discover()
    emitter = emitters.get(args.emit)
    if emitter is None:
        raise UsageError(f"unknown emitter '{args.emit}' (choose from {', '.join(emitters)})")

    module, text = load(args.path)
    if not args.no_verify:
        a = analyze(module)
        if not a.ok:
            raise MpkError(a.diagnostics, text)
    instruments = []
    for name in (args.print_ir_before or []) + (args.print_ir_after or []):
        if name not in PASSES:
            raise UsageError(f"--print-ir-before/after: unknown pass '{name}' (passes: {', '.join(PASSES)})")
    if args.print_ir_before_all or args.print_ir_before:
        instruments.append(PrintIR(before=True, after=False,
                                   only=None if args.print_ir_before_all else args.print_ir_before))
    if args.print_ir_after_all or args.print_ir_after:
        instruments.append(PrintIR(only=None if args.print_ir_after_all else args.print_ir_after))
    timing = Timing() if args.timing else None
    if timing is not None:
        instruments.append(timing)
    if args.verify_each and not args.no_verify:
        instruments.append(VerifyEach())
    try:
        module = run_passes(module, passes, instruments)
    except MpkError as e:
        if e.source is None:
            e.source = text  # diagnostics located in the input file
        raise
    finally:
        if timing is not None:
            sys.stderr.write(timing.report())
    analysis = analyze(module)
    if not analysis.ok and (not args.no_verify or emitter.name != "mpk"):
        raise MpkError(analysis.diagnostics)
    write_text(args.output, emitter.emit(module, analysis, args))
    return 0


def register(sub) -> None:
    from mpkir.emitters import discover

    emitters = discover()
    p = sub.add_parser(
        "opt", help="run a pass pipeline over a .mpk file and emit the result",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Verify FILE, run the passes of PIPELINE in order, verify the result and write it "
                    "(.mpk text by default) to stdout or -o OUT.\n\n"
                    "PIPELINE is 'a,b{key=value,flag}', e.g. 'fold-constants,unroll,dce,infer-shapes'.\n"
                    "Run 'mpkir opt --list-passes' for the passes and what they do.")
    p.add_argument("path", nargs="?", metavar="FILE", help=".mpk file ('-' reads stdin)")
    p.add_argument("-p", "--passes", metavar="PIPELINE", default="",
                   help="comma-separated passes with {options}; none: just verify and emit")
    p.add_argument("-o", "--output", metavar="OUT", help="write to OUT (atomically) instead of stdout")
    p.add_argument("--emit", default="mpk", metavar="NAME",
                   help=f"output format: {', '.join(emitters)} (default: mpk)")
    for em in emitters.values():
        p.add_argument(f"--emit-{em.name}", dest="emit", action="store_const", const=em.name,
                       help=f"same as --emit {em.name}: {em.help}")
    p.add_argument("--print-ir-after-all", action="store_true",
                   help="print the IR after every pass to stderr under a banner "
                        "'// -----// IR Dump After PASS //----- //'")
    p.add_argument("--print-ir-before-all", action="store_true",
                   help="print the IR before every pass to stderr")
    p.add_argument("--print-ir-after", action="append", metavar="PASS",
                   help="print the IR after the named pass only (repeatable)")
    p.add_argument("--print-ir-before", action="append", metavar="PASS",
                   help="print the IR before the named pass only (repeatable)")
    p.add_argument("--timing", action="store_true", help="print the wall time of every pass to stderr")
    p.add_argument("--verify-each", action="store_true", help="verify the IR after every pass")
    p.add_argument("--no-verify", action="store_true",
                   help="skip verifying the input and the result (for debugging passes)")
    p.add_argument("--dump-pass-pipeline", action="store_true",
                   help="print the pipeline with its options to stderr before running it")
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    for em in emitters.values():
        if em.add_arguments is not None:
            em.add_arguments(p)
    p.set_defaults(func=run)
