"""``opt --emit-tasks``: task graph as text: tasks, tiles read/written, events, placement, stats."""

from __future__ import annotations

from mpkir.emitters import Emitter
from mpkir.emitters._taskgraph import add_arguments, build


def emit(module, analysis, args) -> str:
    from mpkir.passes.tasks.text import format_dot, format_json, format_text  # noqa: F401

    tg = build(module, analysis, args)
    return format_text(tg)


EMITTER = Emitter(
    name="tasks",
    help="task graph as text: tasks, tiles read/written, events, placement, stats",
    emit=emit, add_arguments=add_arguments)
