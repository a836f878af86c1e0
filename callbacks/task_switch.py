"""TaskSwitch: moves the datamodule along the task stream."""
from __future__ import annotations

import os

import torch
from lightning import Callback
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from callbacks.task_boundary import TaskBoundaryHooks, announce


class TaskSwitch(Callback, TaskBoundaryHooks):
    """Ends a task after ``iterations_per_task`` PPO iterations, or earlier once the rollout
    success, averaged over the task's last ``success_window`` iterations (and over all DDP
    ranks, so that every rank switches together), reaches ``success_threshold`` (after at least
    ``min_iterations``). At each task end it prints why the task ended (threshold or budget),
    logs ``task/iterations`` (the iterations it used; step = task index), announces the boundary, advances the stream and
    saves ``task{k}_end.ckpt`` (and, with LoRA, the task's adapter in PEFT's format under
    ``adapters/task{k}``) before the task's results (the evaluation of R's row k: a run resumed
    from that checkpoint evaluates again); after the last task it stops training.

    It acts after every other callback's end of iteration (it moves itself behind them, before
    the checkpoint callbacks): those see the iteration's own task, and the task-end checkpoint
    holds everything the iteration did.

    With ``branch_points`` it also saves ``task{k}_trained.ckpt`` when task k's training is done,
    before the task-end step of any callback (e.g. CRL-VLA's anchor freeze): a run resumed from
    it takes that step with its own callbacks. Runs of methods that act only at and after a task
    end (Seq-FT, CRL-VLA) are the same up to there, so another method's run can start from it
    (``scripts/sweep.py --branch``)."""

    def __init__(self, iterations_per_task: int = 20, success_threshold: float | None = None,
                 min_iterations: int = 1, success_window: int = 1, save_checkpoints: bool = True,
                 branch_points: bool = False):
        """
        Args:
            iterations_per_task: PPO iterations after which a task ends (its budget).
            success_threshold: end a task earlier once the rollout success, averaged over the last
                ``success_window`` iterations and all ranks, reaches it (null: budget only).
            min_iterations: iterations a task runs before the threshold may end it.
            success_window: iterations averaged for the threshold.
            save_checkpoints: save ``task{k}_end.ckpt`` (and LoRA adapters) at every task end.
            branch_points: also save ``task{k}_trained.ckpt`` before the task-end steps (a point
                another method's run can start from).
        """
        if iterations_per_task <= 0:
            raise ValueError(f"TaskSwitch.iterations_per_task={iterations_per_task!r}: must be > 0")
        if success_threshold is not None and not 0 < success_threshold <= 1:
            raise ValueError(f"TaskSwitch.success_threshold={success_threshold!r}: must be in (0, 1]")
        if success_window < 1:
            raise ValueError(f"TaskSwitch.success_window={success_window!r}: must be >= 1")
        if min_iterations < 0:
            raise ValueError(f"TaskSwitch.min_iterations={min_iterations!r}: must be >= 0")
        self.iterations_per_task = iterations_per_task
        self.success_threshold = success_threshold
        self.min_iterations = min_iterations
        self.success_window = success_window
        self.save_checkpoints = save_checkpoints
        self.branch_points = branch_points
        self.pending_end: tuple | None = None  # in a task{k}_trained.ckpt: (why it ended, iterations), end not taken
        self.iteration_in_task = 0
        self.recent_success: list[float] = []  # this task's last success_window rollout successes
        self.finished = False
        self.task_started = False  # on_task_start announced for the current task
        self.pending_results: tuple | None = None  # in the task-end checkpoint: (task, iterations), not evaluated yet

    def setup(self, trainer, pl_module, stage: str) -> None:
        others = [c for c in trainer.callbacks if c is not self]
        first_checkpoint = next((i for i, c in enumerate(others) if isinstance(c, Checkpoint)), len(others))
        # a new list: Lightning's loop over the callbacks' setup in progress goes on over the old one
        trainer.callbacks = others[:first_checkpoint] + [self] + others[first_checkpoint:]

    def on_train_start(self, trainer, pl_module):
        if self.pending_end is not None:  # resumed from a task{k}_trained.ckpt: the task's end, here
            (reason, iterations), self.pending_end = self.pending_end, None
            self._end_task(trainer, pl_module, reason, iterations)
            return
        if self.pending_results is not None:  # resumed from a task-end checkpoint: the evaluation again
            (k, iterations), self.pending_results = self.pending_results, None
            announce(trainer, pl_module, "on_task_results", k, iterations)
        if self.finished:
            trainer.should_stop = True
        elif not self.task_started:
            self._start_task(trainer, pl_module, trainer.datamodule.task_index)

    def _start_task(self, trainer, pl_module, k: int) -> None:
        self.task_started = True
        announce(trainer, pl_module, "on_task_start", k)

    @staticmethod
    def _rollout_success(pl_module) -> float | None:
        """This iteration's rollout success over all ranks: successes / episodes ended."""
        stats = pl_module.rollout_stats
        episodes = stats.get("rollout/episodes", 0.0)
        wins = stats.get("rollout/success", 0.0) * episodes
        total = pl_module.all_gather(torch.tensor([wins, episodes], dtype=torch.float64,
                                                  device=pl_module.device)).reshape(-1, 2).sum(0)
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _task_done(self, pl_module) -> str | None:
        """Why the task ends after this iteration (the success threshold or the budget), or None."""
        if self.success_threshold is not None:
            success = self._rollout_success(pl_module)
            if success is not None:
                self.recent_success = (self.recent_success + [success])[-self.success_window:]
            mean = sum(self.recent_success) / max(len(self.recent_success), 1)
            if (self.iteration_in_task >= self.min_iterations and len(self.recent_success) == self.success_window
                    and mean >= self.success_threshold):
                return (f"rollout success {mean:.3f} over the last {self.success_window} iteration(s) "
                        f">= {self.success_threshold}")
        if self.iteration_in_task >= self.iterations_per_task:
            return f"budget of {self.iterations_per_task} iterations"
        return None

    def on_train_epoch_end(self, trainer, pl_module):
        self.iteration_in_task += 1
        reason = self._task_done(pl_module)
        if reason is None:
            return
        iterations = trainer.current_epoch + 1
        if self.branch_points and trainer.log_dir:  # every rank asks (a broadcast under DDP)
            self.pending_end = (reason, iterations)
            trainer.save_checkpoint(os.path.join(trainer.log_dir, "checkpoints",
                                                 f"task{trainer.datamodule.task_index}_trained.ckpt"), weights_only=False)
            self.pending_end = None
        self._end_task(trainer, pl_module, reason, iterations)

    def _end_task(self, trainer, pl_module, reason: str, iterations: int) -> None:
        dm = trainer.datamodule
        k = dm.task_index
        rank_zero_info(f"[task {k}] ends after {self.iteration_in_task} iterations: {reason}")
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"task/iterations": float(self.iteration_in_task)}, step=k)
        log_dir = trainer.log_dir  # every rank asks (a broadcast under DDP)
        if self.save_checkpoints and log_dir and pl_module.policy.uses_lora and trainer.is_global_zero:
            # the task's adapter in PEFT format, before any boundary callback resets it
            pl_module.policy.save_adapter(os.path.join(log_dir, "adapters", f"task{k}"))
        announce(trainer, pl_module, "on_task_end", k)
        self.iteration_in_task = 0
        self.recent_success = []
        self.task_started = False
        if k + 1 < dm.num_tasks:
            dm.set_task(k + 1)
        else:
            self.finished = True
            trainer.should_stop = True
        if self.save_checkpoints and log_dir:  # the full state, before the evaluation: a kill there loses nothing
            self.pending_results = (k, iterations)
            trainer.save_checkpoint(os.path.join(log_dir, "checkpoints", f"task{k}_end.ckpt"), weights_only=False)
            self.pending_results = None
        announce(trainer, pl_module, "on_task_results", k, iterations)
        if not self.finished:
            self._start_task(trainer, pl_module, k + 1)

    def state_dict(self):
        return {"iteration_in_task": self.iteration_in_task, "finished": self.finished,
                "recent_success": list(self.recent_success), "task_started": self.task_started,
                "pending_results": self.pending_results, "pending_end": self.pending_end}

    def load_state_dict(self, state):
        self.iteration_in_task = state["iteration_in_task"]
        self.finished = state["finished"]
        self.recent_success = list(state.get("recent_success", []))
        # older checkpoints: a task had started if it had run an iteration
        self.task_started = state.get("task_started", self.iteration_in_task > 0)
        self.pending_results = state.get("pending_results")
        self.pending_end = tuple(state["pending_end"]) if state.get("pending_end") else None


def stopped_before_stream_end(trainer) -> bool:
    """True when the trainer has a TaskSwitch whose stream did not reach its last task's end
    (a run stopped by a signal, max_epochs or max_time)."""
    switch = next((cb for cb in trainer.callbacks if isinstance(cb, TaskSwitch)), None)
    return switch is not None and not switch.finished
