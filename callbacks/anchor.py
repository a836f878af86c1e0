"""AnchorCriticFreeze: CRL-VLA's dual critic at task boundaries.

At the end of stage k: the trainable MC critic is frozen as anchor head k (the earlier heads
stay), the policy is snapshotted as the frozen old policy, the MC critic starts over for the
next stage (``model.critic_init``), and stage k's goals are registered for the anchor samples
with head k, the one trained on them (modules/anchor_critics.py). Without this callback the
same run is plain sequential fine-tuning (no anchor samples, so L_KL = L_GCV = 0).
"""
from __future__ import annotations

from callbacks.task_boundary import ContinualMethod


class AnchorCriticFreeze(ContinualMethod):
    def on_task_end(self, trainer, pl_module, task_index: int) -> None:
        if task_index + 1 >= trainer.datamodule.num_tasks:
            return  # nothing follows the last task
        head = pl_module.freeze_anchor()
        trainer.datamodule.remember_task(task_index, head=head)
