"""Printers of a task graph: text, JSON and DOT (used by the emitters)."""

from __future__ import annotations

import json

from mpkir.passes.tasks.graph import TaskGraph

STAT_ORDER = ("gpu", "workers", "tasks", "ops", "variants", "edges_raw", "edges", "events_before_fusion",
              "waits_before_fusion", "events_after_fusion", "waits_after_fusion", "chains_collapsed",
              "events",
              "waits", "events_removed", "waits_removed", "waits_per_task", "max_signals_per_task",
              "critical_path_us", "est_step_us", "work_us", "time_total_s")


def format_stats(tg: TaskGraph) -> str:
    keys = [k for k in STAT_ORDER if k in tg.stats] + sorted(set(tg.stats) - set(STAT_ORDER))
    return "\n".join(f"// {k:<22} {tg.stats[k]}" for k in keys)


def _box(box) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"


def format_text(tg: TaskGraph, limit: int | None = None) -> str:
    """A readable listing: stats, tensors, tasks (reads/writes/wait/signals/worker), events."""
    out = [f"// task graph of {tg.model or '?'} graph {tg.graph} for {tg.gpu} ({tg.num_workers} workers)",
           format_stats(tg), ""]
    for t in tg.tensors.values():
        extra = f" = view of {t.base}" if t.base else (f' = "{t.checkpoint}"' if t.checkpoint else "")
        out.append(f"tensor {t.name} : {t.dtype}{list(t.shape)} {t.kind}{extra}")
    out.append("")
    tasks = tg.tasks if limit is None else tg.tasks[:limit]
    boxes: dict = {}

    def acc(a) -> str:
        b = boxes.get(a.box)
        if b is None:
            b = boxes[a.box] = _box(a.box)
        return a.tensor + b

    for t in tasks:
        rs = ", ".join(map(acc, t.reads))
        ws = ", ".join(map(acc, t.writes))
        wait = f"e{t.wait}" if t.wait is not None else (f"after t{t.after}" if t.after is not None else "-")
        sig = ",".join(f"e{e}" for e in t.signals) or "-"
        attrs = "".join(f" {k}={v}" for k, v in t.attrs)
        out.append(f"t{t.id} {t.kind}{attrs} -> {t.node} on w{t.worker}: wait {wait} signal {sig} "
                   f"cost {t.cost_ns / 1e3:.2f}us\n    reads {rs}\n    writes {ws}")
    if limit is not None and len(tg.tasks) > limit:
        out.append(f"... {len(tg.tasks) - limit} more tasks")
    out.append("")
    for e in tg.events:
        out.append(f"e{e.id} {e.kind} triggers={e.num_triggers} producers={_ids(e.producers)} "
                   f"consumers={_ids(e.consumers)}")
    return "\n".join(out) + "\n"


def _ids(ids) -> str:
    """Compact ``t3..t9,t12``."""
    if not ids:
        return "-"
    runs, start, prev = [], ids[0], ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"t{start}" if start == prev else f"t{start}..t{prev}")
        if i is not None:
            start = prev = i
    return ",".join(runs)


def format_json(tg: TaskGraph) -> str:
    return json.dumps(tg.to_dict(), indent=1) + "\n"


def format_dot(tg: TaskGraph, max_tasks: int = 2000) -> str:
    """Tasks as boxes (clustered by op), events as ellipses; big graphs are cut at ``max_tasks``."""
    lines = [f'digraph "{tg.model or tg.graph}" {{', "  rankdir=TB; node [fontsize=10];",
             f'  label="{tg.model} {tg.graph} on {tg.gpu}: {tg.stats.get("tasks")} tasks, '
             f'{tg.stats.get("events")} events"; labelloc=t;']
    shown = {t.id for t in tg.tasks[:max_tasks]}
    by_node: dict[str, list[int]] = {}
    for t in tg.tasks[:max_tasks]:
        by_node.setdefault(t.node, []).append(t.id)
    for i, (node, ids) in enumerate(by_node.items()):
        lines.append(f'  subgraph cluster_{i} {{ label="{node}"; style=dashed;')
        for tid in ids:
            t = tg.tasks[tid]
            lines.append(f'    t{tid} [shape=box, label="t{tid} {t.kind}\\nw{t.worker}"];')
        lines.append("  }")
    for e in tg.events:
        if not (set(e.producers) & shown or set(e.consumers) & shown):
            continue
        style = ', style=dashed' if e.kind == "end" else ""
        lines.append(f'  e{e.id} [shape=ellipse, label="e{e.id} ×{e.num_triggers}"{style}];')
        lines += [f"  t{p} -> e{e.id};" for p in e.producers if p in shown]
        lines += [f"  e{e.id} -> t{c}{' [style=dashed]' if e.kind == 'end' else ''};"
                  for c in e.consumers if c in shown]
    for t in tg.tasks[:max_tasks]:
        if t.after is not None and t.after in shown:
            lines.append(f'  t{t.after} -> t{t.id} [color=blue, label="same worker"];')
    if len(tg.tasks) > max_tasks:
        lines.append(f'  more [shape=plaintext, label="... {len(tg.tasks) - max_tasks} more tasks"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
