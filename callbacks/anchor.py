"""AnchorCriticFreeze: CRL-VLA's dual critic at task boundaries.

At the end of task k: the trainable MC critic becomes the frozen anchor critic, the policy
is snapshotted as the frozen old policy, a fresh MC critic starts, and task k's goal is
registered for the anchor samples. Without this callback the same run is plain sequential
fine-tuning (no anchor samples, so L_KL = L_GCV = 0).
"""
from __future__ import annotations

from callbacks.task_boundary import ContinualMethod


class AnchorCriticFreeze(ContinualMethod):
    def on_task_end(self, trainer, pl_module, task_index: int) -> None:
        if task_index + 1 >= trainer.datamodule.num_tasks:
            return  # nothing follows the last task
        trainer.datamodule.remember_task(task_index)
        pl_module.freeze_anchor()
