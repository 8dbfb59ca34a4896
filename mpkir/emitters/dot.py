"""``opt --emit-dot``: task graph as Graphviz DOT (tasks clustered by op, events)."""

from __future__ import annotations

from mpkir.emitters import Emitter
from mpkir.emitters._taskgraph import add_arguments, build


def emit(module, analysis, args) -> str:
    from mpkir.passes.tasks.text import format_dot, format_json, format_text  # noqa: F401

    tg = build(module, analysis, args)
    return format_dot(tg)


EMITTER = Emitter(
    name="dot",
    help="task graph as Graphviz DOT (tasks clustered by op, events)",
    emit=emit, add_arguments=add_arguments)
