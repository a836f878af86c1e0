"""ExperienceReplay: the replay baseline's memory of old-task transitions.

At the end of every stage but the last, ``data.memory_per_task`` transitions of the stage's
last rollout (image, instruction, action, behaviour log-prob, advantage) go into the
datamodule's bounded CPU memory (``data.memory_size``; checkpointed with the datamodule).
From then on every PPO minibatch carries a share of the stored transitions, which the module
trains on with ER's terms (modules/losses.py ``experience_replay``: the clipped surrogate with
the stored advantage, ``model.replay_pg_coef``, and behaviour cloning of the stored actions,
``model.replay_bc_coef``). It is the run's continual-learning method (``method:``,
``configs/ablations/er.yaml``), in place of AnchorCriticFreeze.

This is experience replay as continual RL defines it (old data through the policy's own
learning loss), not the KL-to-old-policy on stored states of ``configs/ablations/lwf_memory.yaml``.
"""
from __future__ import annotations

from callbacks.task_boundary import ContinualMethod


class ExperienceReplay(ContinualMethod):
    def setup(self, trainer, pl_module, stage: str) -> None:
        if not pl_module.replays:
            raise ValueError("method=callbacks.replay.ExperienceReplay: needs model.replay_pg_coef or "
                             "model.replay_bc_coef > 0 (nothing would replay the memory)")
        if trainer.datamodule.memory_per_task <= 0:
            raise ValueError(f"data.memory_per_task={trainer.datamodule.memory_per_task!r}: "
                             "ExperienceReplay needs > 0")

    def on_task_end(self, trainer, pl_module, task_index: int) -> None:
        if task_index + 1 < trainer.datamodule.num_tasks:  # nothing follows the last stage
            trainer.datamodule.remember_task(task_index, keep_states=True)
