"""``opt --emit-taskjson``: task graph as JSON (tasks, events, tensors, placement, stats)."""

from __future__ import annotations

from mpkir.emitters import Emitter
from mpkir.emitters._taskgraph import add_arguments, build


def emit(module, analysis, args) -> str:
    from mpkir.passes.tasks.text import format_dot, format_json, format_text  # noqa: F401

    tg = build(module, analysis, args)
    return format_json(tg)


EMITTER = Emitter(
    name="taskjson",
    help="task graph as JSON (tasks, events, tensors, placement, stats)",
    emit=emit, add_arguments=add_arguments)
