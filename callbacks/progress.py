"""A progress bar that shows the task k/K, the PPO iteration, the recent success and where the
iteration's time went (collection, anchor targets, update; ``callbacks/iteration_timing.py``).

On a terminal it is Lightning's tqdm bar; when the output is not a terminal (a log file,
CI, a sweep) it prints one line per iteration instead of a redrawn bar per minibatch.
"""
from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from modules.timing import TIMER


class TaskProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 line_per_iteration: bool | None = None):
        """
        Args:
            refresh_rate: tqdm's refresh rate in minibatches (on a terminal).
            process_position: tqdm's bar position (several bars at once).
            leave: keep the finished bar on screen.
            line_per_iteration: one printed line per PPO iteration instead of a bar (null: when
                stderr is not a terminal).
        """
        self.line_per_iteration = (not sys.stderr.isatty()) if line_per_iteration is None else line_per_iteration
        super().__init__(refresh_rate=0 if self.line_per_iteration else refresh_rate,
                         process_position=process_position, leave=leave)
        self._epoch_start = time.time()

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        dm = trainer.datamodule
        items["task"] = f"{dm.task_index + 1}/{dm.num_tasks}"
        items["iter"] = trainer.current_epoch
        return items

    def on_train_epoch_start(self, trainer, *_):
        self._epoch_start = time.time()
        self._task_at_start = trainer.datamodule.task_index
        super().on_train_epoch_start(trainer)
        dm = trainer.datamodule
        self.train_progress_bar.set_description(f"task {dm.task_index + 1}/{dm.num_tasks} iter {trainer.current_epoch}")

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if not self.line_per_iteration:
            return
        stats = pl_module.rollout_stats  # this iteration's rollout (logged after the callbacks)
        parts = [f"task {self._task_at_start + 1}/{trainer.datamodule.num_tasks}",
                 f"iter {trainer.current_epoch}"]
        for key, label in (("rollout/success", "success"), ("rollout/explained_variance", "ev")):
            if key in stats:
                parts.append(f"{label} {float(stats[key]):.3f}")
        seconds = TIMER.peek()  # this iteration's phases so far (callbacks/iteration_timing.py logs all)
        update = sum(v for k, v in seconds.items() if k.startswith("update/"))
        for label, value in (("collect", seconds.get("collection")), ("rprm", seconds.get("reward_shaping")),
                             ("anchors", seconds.get("anchor_targets")), ("update", update or None)):
            if value is not None:
                parts.append(f"{label} {value:.1f}s")
        parts.append(f"{time.time() - self._epoch_start:.1f}s")
        rank_zero_info("  ".join(parts))
