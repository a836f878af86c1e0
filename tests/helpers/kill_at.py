"""A test-only callback: the run sends itself a real signal (SIGKILL, SIGTERM, SIGINT) at a chosen
point of iteration ``epoch``, so that tests can stop a run anywhere and resume it:

* ``collection``: at the policy's ``step``-th acting call of the iteration's rollout;
* ``update``: before PPO minibatch ``step``;
* ``evaluation``: at the ``step``-th evaluation episode batch after the iteration began (the
  after-task evaluation when ``epoch`` is a task's last iteration);
* ``checkpoint``: in the middle of the first checkpoint written at the iteration's end, after half
  of its bytes went to disk.

It patches the kit's classes in the process it kills (a ``train.py`` run, forked by
tests/train_forks.py); nothing else sees the patches.
"""
import io
import os
import signal

import torch
from lightning import Callback

POINTS = ("collection", "update", "evaluation", "checkpoint")


class KillAt(Callback):
    def __init__(self, point: str, epoch: int, signal_name: str = "SIGKILL", step: int = 1):
        assert point in POINTS, point
        self.point, self.epoch, self.step = point, epoch, step
        self.signum = getattr(signal, signal_name)

    def _fire(self) -> None:
        os.kill(os.getpid(), self.signum)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        calls = [0]

        def counted(original):
            def wrapper(*args, **kwargs):
                calls[0] += 1
                if calls[0] == self.step:
                    self._fire()
                return original(*args, **kwargs)
            return wrapper

        if self.point == "collection":
            from modules.rollout_policy import RolloutPolicy

            RolloutPolicy.forward = counted(RolloutPolicy.forward)
        elif self.point == "evaluation":
            from callbacks.evaluation import PerTaskEvaluation

            PerTaskEvaluation._run = counted(PerTaskEvaluation._run)
        elif self.point == "checkpoint":
            from modules import checkpoint_io

            real_save, fire = torch.save, self._fire

            def half_then_die(obj, f, *args, **kwargs):
                buffer = io.BytesIO()
                real_save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                fire()

            checkpoint_io.torch.save = half_then_die  # the kit's atomic writer calls torch.save(obj, file)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.point == "update" and trainer.current_epoch == self.epoch and batch_idx + 1 == self.step:
            self._fire()
