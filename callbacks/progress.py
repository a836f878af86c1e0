"""A progress bar that shows the task k/K and the PPO iteration."""
from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class TaskProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        dm = trainer.datamodule
        items["task"] = f"{dm.task_index + 1}/{dm.num_tasks}"
        items["iter"] = trainer.current_epoch
        return items

    def on_train_epoch_start(self, trainer, *_):
        super().on_train_epoch_start(trainer)
        dm = trainer.datamodule
        self.train_progress_bar.set_description(f"task {dm.task_index + 1}/{dm.num_tasks} iter {trainer.current_epoch}")
