"""Shared by the task-graph emitters (tasks, taskjson, dot): options and building the graph."""

from __future__ import annotations

import argparse
import contextlib


def add_arguments(p) -> None:
    """``--gpu`` / ``--workers`` for the task-graph emitters (added once, whichever emitter comes first)."""
    for flags, kw in ((("--gpu",), {"metavar": "NAME", "help": "task graph: target GPU (default: the serve "
                                    "block's target; h100, h200, a100, b200, l40s, rtx4090)"}),
                      (("--workers",), {"type": int, "metavar": "N",
                                        "help": "task graph: number of workers (default: the GPU's SMs)"})):
        with contextlib.suppress(argparse.ArgumentError):
            p.add_argument(*flags, **kw)


def build(module, analysis, args):
    from mpkir.passes.tasks import build_task_graph

    return build_task_graph(module, None, gpu=getattr(args, "gpu", None),
                            workers=getattr(args, "workers", None))
