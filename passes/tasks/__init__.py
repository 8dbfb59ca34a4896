"""Task graph: operator→task decomposition, precise events, fusion, placement (data model: graph.py)."""

from mpkir.passes.tasks.build import build_task_graph, prepare
from mpkir.passes.tasks.gpus import GPUS, get_gpu
from mpkir.passes.tasks.graph import Access, Event, Placement, Task, TaskGraph, Tensor

__all__ = ["GPUS", "Access", "Event", "Placement", "Task", "TaskGraph", "Tensor", "build_task_graph",
           "get_gpu", "prepare"]
