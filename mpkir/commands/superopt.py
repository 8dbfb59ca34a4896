"""``mpkir superopt FILE [--budget 30s] [--report] [--seed N]``: search fused block programs for a model."""

from __future__ import annotations

import sys
import time


def _seconds(text: str) -> float:
    t = text.strip().lower()
    if t.endswith("ms"):
        return float(t[:-2]) / 1000
    if t.endswith("s"):
        return float(t[:-1])
    if t.endswith("m"):
        return float(t[:-1]) * 60
    return float(t)


def report_lines(results, errors) -> list[str]:
    lines = []
    for r in results:
        sg, st = r.subgraph, r.stats
        lines.append(
            f"== {sg.kind} {dict(sg.dims)} covers {', '.join('%' + c for c in sg.covers)}"
            + (" (cached)" if r.cached else "")
        )
        lines.append(
            f"   explored {st.explored}, pruned {st.pruned} (abstract-expression/Z3 + verification), "
            f"closed {st.closed}, structures {st.structures}, ranked {r.alternatives}, "
            f"Z3 subexpr queries {st.z3_queries}, search {st.seconds:.2f}s"
            + ("" if st.complete else " (budget hit: incomplete)")
        )
        c, b = r.cost, r.baseline
        lines.append(
            f"   chosen: {'; '.join(r.notes)}: predicted {c['time_ns'] / 1000:.1f} us vs unfused "
            f"{b['time_ns'] / 1000:.1f} us (gain {r.gain:.2f}x), HBM {c['bytes']} B, {c['flops']} FLOP, "
            f"smem {c['smem']} B, {c['tasks']} tasks"
        )
        hw = r.handwritten
        if hw:
            lines.append(
                f"   hand-written: {hw['body']}: predicted {hw['time_ns'] / 1000:.1f} us, "
                f"HBM {hw['bytes']} B, {hw.get('phases', 1)} phase(s) at the calibrated hand-written rate"
            )
        applied, why = r.decision
        lines.append(f"   decision: {'APPLY' if applied else 'KEEP'}: {why}")
        p = r.proof
        ff = "; ".join(f"{x['dims']}: {'ok' if x['ok'] else 'FAIL'}" for x in p["finite_field"])
        lines.append(
            f"   proof: finite field [{ff}]; Z3 {p['z3']['status']} at {p['z3']['dims']}; "
            f"float64 rel err {p.get('float64_rel_err', float('nan')):.2e}"
        )
        if sg.kind == "decode_attention":
            lines.append("   " + _paged_line(r))
        from mpkir.passes.superopt.program import print_fused

        lines += ["   " + x for x in print_fused(r.program).splitlines()]
    for kind, why in errors:
        lines.append(f"== {kind}: not found ({why})")
    return lines


def _paged_line(r) -> str:
    """The proof of the found split-KV program's tiling over the megakernel's paged KV cache."""
    from mpkir.passes.superopt.paged import prove_paged
    from mpkir.passes.superopt.program import ProgramError

    try:
        p = prove_paged(r.program, float(r.subgraph.c("scale")))
    except ProgramError as e:
        return f"paged form (megakernel KV cache): not a split-KV program ({e})"
    ff = sum(x["ok"] for x in p["finite_field"])
    z3 = ", ".join(f"len {x['length']}/S {x['splits']} {x['status']}" for x in p["z3"])
    return (
        f"paged form (megakernel KV cache, masked tail): {'proved' if p['proved'] else 'NOT proved'}: finite "
        f"field {ff}/{len(p['finite_field'])} (length, splits) cases, Z3 {z3}; assumed: {p['assumed']}"
    )


def run(args) -> int:
    from mpkir.commands import load
    from mpkir.diagnostics import MpkError
    from mpkir.passes.superopt.partition import partition
    from mpkir.passes.superopt.search import cached_search
    from mpkir.verify import analyze

    module, text = load(args.path)
    a = analyze(module)
    if not a.ok:
        raise MpkError(a.diagnostics, text)
    budget = _seconds(args.budget)
    t0 = time.monotonic()
    results, errors = [], []
    for sg in partition(module, a):
        try:
            results.append(cached_search(sg, args.cache_dir, seed=args.seed, budget_s=budget))
        except LookupError as e:
            errors.append((sg.kind, str(e)))
    lines = (
        report_lines(results, errors)
        if args.report
        else [
            f"{r.subgraph.kind}: gain {r.gain:.2f}x, proved={r.proof['proved']}, "
            f"{'applied' if r.decision[0] else 'not applied'}"
            for r in results
        ]
    )
    n_apply = sum(r.decision[0] for r in results)
    lines.append(
        f"total {time.monotonic() - t0:.2f}s, {len(results)} subgraph(s) searched, {n_apply} applied "
        "(predicted gain > 1 and faster than the hand-written body); MPKIR_SUPEROPT=1 puts applied ones (and "
        "MPKIR_SUPEROPT_FORCE kinds) into the megakernel (codegen/superopt_tasks.py)"
    )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "superopt", help="search fused block programs (Mirage-style), proved equal",
        description="Cut FILE's decode graph into subgraphs (norm+linear, silu*mul+down, head norm+rope, "
                    "decode attention), search block-level programs for each, keep those proved equal "
                    "(finite-field testing and Z3) and rank them against the hand-written task bodies with "
                    "the calibrated cost model. Prints one line per subgraph (--report: explored/pruned "
                    "counts, the chosen program, its proof and the decision). Results are cached on disk "
                    "by a hash of the subgraph and GPU, so a second run takes about a second. Writes no "
                    "other file.")
    p.add_argument("path", metavar="FILE", help=".mpk file")
    p.add_argument("--budget", default="30s", help="search time per subgraph (e.g. 30s; default 30s)")
    p.add_argument("--report", action="store_true", help="print the full search report")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's random choices (default 0)")
    p.add_argument("--cache-dir", default=None, help="default: $MPKIR_CACHE_DIR or ~/.cache/mpkir/superopt")
    p.set_defaults(func=run)
