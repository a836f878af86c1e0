"""Task boundaries as events between callbacks, and the continual-learning method's slot.

``TaskSwitch`` is the only place that decides when a task ends. It calls, on every
callback that defines them, ``on_task_start(trainer, pl_module, task_index)``,
``on_task_end(trainer, pl_module, task_index)`` (what training carries into the next task:
anchors, adapters, Fisher information) and then, after the task-end checkpoint is written,
``on_task_results(trainer, pl_module, task_index, iterations)`` (work that changes no training
state, such as the evaluation that fills R, after ``iterations`` iterations of the run: a run
resumed from that checkpoint does it again).

A run's continual-learning method (CRL-VLA's ``AnchorCriticFreeze``, ``OnlineEWC``,
``PerTaskAdapters``) is one ``ContinualMethod`` callback chosen by the top-level ``method:`` key
of the config, not an entry of ``trainer.callbacks``: an ablation file swaps the method in one
line (``method: null`` is sequential fine-tuning) and keeps the base config's callback list
(task budget, evaluation, checkpoints) as it is.
"""
from __future__ import annotations

from lightning import Callback


class TaskBoundaryHooks:
    def on_task_start(self, trainer, pl_module, task_index: int) -> None:
        pass

    def on_task_end(self, trainer, pl_module, task_index: int) -> None:
        pass

    def on_task_results(self, trainer, pl_module, task_index: int, iterations: int) -> None:
        pass


class ContinualMethod(Callback, TaskBoundaryHooks):
    """A continual-learning method: the callback that changes what the module trains at task
    boundaries (freezes anchors, consolidates weights, stores adapters)."""


def announce(trainer, pl_module, event: str, task_index: int, *args) -> None:
    for cb in trainer.callbacks:
        if isinstance(cb, TaskBoundaryHooks):
            getattr(cb, event)(trainer, pl_module, task_index, *args)


def with_method(callbacks, method: ContinualMethod | None) -> list:
    """``callbacks`` with ``method`` right after ``TaskSwitch`` (so that it acts on a task's end
    before the evaluation of that end runs), or first if there is no TaskSwitch."""
    from callbacks.task_switch import TaskSwitch

    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if method is None:
        return callbacks
    listed = [type(cb).__name__ for cb in callbacks if isinstance(cb, ContinualMethod)]
    if listed:
        raise ValueError(f"method={type(method).__module__}.{type(method).__name__}: trainer.callbacks "
                         f"already holds a continual-learning method ({', '.join(listed)}); keep one")
    at = max((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, TaskSwitch)), default=0)
    return callbacks[:at] + [method] + callbacks[at:]
