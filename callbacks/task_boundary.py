"""Task boundaries as events between callbacks.

``TaskSwitch`` is the only place that decides when a task ends. It calls, on every
callback that defines them, ``on_task_start(trainer, pl_module, task_index)``,
``on_task_end(trainer, pl_module, task_index)`` (what training carries into the next task:
anchors, adapters, Fisher information) and then, after the task-end checkpoint is written,
``on_task_results(trainer, pl_module, task_index, iterations)`` (work that changes no training
state, such as the evaluation that fills R, after ``iterations`` iterations of the run: a run
resumed from that checkpoint does it again).
"""
from __future__ import annotations


class TaskBoundaryHooks:
    def on_task_start(self, trainer, pl_module, task_index: int) -> None:
        pass

    def on_task_end(self, trainer, pl_module, task_index: int) -> None:
        pass

    def on_task_results(self, trainer, pl_module, task_index: int, iterations: int) -> None:
        pass


def announce(trainer, pl_module, event: str, task_index: int, *args) -> None:
    for cb in trainer.callbacks:
        if isinstance(cb, TaskBoundaryHooks):
            getattr(cb, event)(trainer, pl_module, task_index, *args)
