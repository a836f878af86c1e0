"""PerTaskAdapters: one LoRA adapter per task, chosen by the task's instruction (the isolation
baseline: an upper bound on stability, no transfer between tasks).

At the end of task k the trainable adapter's weights are stored as adapter ``task<k>``, the
task's instruction is routed to it (acting and evaluation on that instruction use it), and
the trainable adapter is re-initialised (B = 0) with a fresh optimiser state for the next
task. Needs ``model.policy.init_args.lora``.
"""
from __future__ import annotations

from callbacks.task_boundary import ContinualMethod
from modules.policy.lora import reset_adapter, snapshot_adapter


class PerTaskAdapters(ContinualMethod):
    def __init__(self):
        self._policy = None
        self._loaded_routes: dict[str, str] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not pl_module.policy.uses_lora:
            raise ValueError("trainer.callbacks PerTaskAdapters: needs model.policy.init_args.lora")
        self._policy = pl_module.policy

    def on_task_end(self, trainer, pl_module, task_index: int) -> None:
        policy, dm = pl_module.policy, trainer.datamodule
        name = f"task{task_index}"
        snapshot_adapter(policy.backbone.model, dst=name)
        policy.adapter_routes[dm.tasks[task_index].instruction] = name
        if task_index + 1 < dm.num_tasks:
            reset_adapter(policy.backbone.model)
            trainer.optimizers[0].state.clear()

    # the routes live on the policy; checkpoints carry them through this callback's state
    def state_dict(self):
        return {"routes": dict(self._policy.adapter_routes) if self._policy else {}}

    def load_state_dict(self, state) -> None:
        self._loaded_routes = dict(state.get("routes", {}))

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.policy.adapter_routes.update(self._loaded_routes)

    on_test_start = on_train_start  # train.py test of a checkpoint: each task with its adapter
