"""Per-iteration timing breakdown, logged by the kit itself (no profiler needed).

Every PPO iteration gets one row: the seconds of each phase (``modules/timing.py``), the
iteration's wall time, env steps per second end to end and the peak GPU memory. Rows go to
TensorBoard (``time/<phase>``, ``perf/*``, step = the iteration) and to ``timings.json`` in the
run's log directory; the progress line (``callbacks/progress.py``) prints the main phases.

Phases (seconds, per rank):
  collection               the collector's rollout (acting + env stepping + its overhead)
  collection/acting        the policy's forward when acting (``RolloutPolicy``)
  collection/env_start     building the training envs (once per task)
  collection/env           derived: collection - acting - env_start (env stepping, pipes, the
                           image pipeline where it runs in the workers)
  collection/env_step      of which the env pool's steps (the slowest worker sets each one)
  collection/env_reset     of which the resets of the envs whose episode ended (every worker of
                           a lock-step pool waits for them)
  reward_shaping           the RPRM's scores of the rollout's frames (VLA-RL's process reward)
  rollout_targets          values, V(s') at truncations, GAE and MC returns
  anchor_targets           old-goal samples: the old policy's action distribution, V_old
  update/forward, update/backward, update/optimizer   the PPO minibatches
  evaluation               PerTaskEvaluation (before training, periodic, after each task)
  checkpoint               writing checkpoints
  compile_capture          torch.compile and CUDA-graph capture of the decode step (summed over
                           every phase it happened in)

``perf/env_steps_per_s`` = frames / (collection + reward_shaping + rollout_targets + anchor_targets + update):
the training loop's throughput, evaluation and checkpoints apart; ``perf/env_steps_per_s_wall``
divides by the whole iteration (everything included). ``perf/update_samples``: samples (current
+ anchor) through the update's forward and backward (fewer when the approximate-KL stop ends
the epochs early), ``perf/update_samples_per_s`` per second of update. ``perf/peak_gpu_mem_gib``:
the largest allocation of the iteration (``torch.cuda.max_memory_allocated``; GPU only).

Evaluation and checkpoint writes that follow an iteration (its after-task evaluation, its
``ModelCheckpoint`` save) are charged to that iteration: a row is closed when the next
iteration starts or training ends. Work before the first iteration (the starting model's
evaluation) is the row ``"iteration": "start"``.
"""
from __future__ import annotations

import json
import os
import time

import torch
from lightning.pytorch.callbacks import Callback

from modules.timing import TIMER, phase, set_enabled, total

LOOP_PHASES = ("collection", "reward_shaping", "rollout_targets", "anchor_targets", "update")


def summarize(seconds: dict[str, float], frames: int, wall: float | None) -> dict[str, float]:
    """Phase totals of one iteration -> the logged row (``time/*`` and ``perf/*``)."""
    row = {f"time/{k}": v for k, v in sorted(seconds.items()) if "compile_capture" not in k}
    if "collection" in seconds:
        row["time/collection/env"] = (seconds["collection"] - seconds.get("collection/acting", 0.0)
                                      - seconds.get("collection/env_start", 0.0))
    update = sum(v for k, v in seconds.items() if k.startswith("update/"))
    if update:
        row["time/update"] = update
    row["time/compile_capture"] = total(seconds, "compile_capture")
    loop = sum(seconds.get(k, 0.0) for k in LOOP_PHASES[:-1]) + update
    if frames and loop > 0:
        row["perf/env_steps_per_s"] = frames / loop
    if wall is not None:
        row["time/iteration"] = wall
        if frames and wall > 0:
            row["perf/env_steps_per_s_wall"] = frames / wall
    return row


class IterationTiming(Callback):
    def __init__(self, enabled: bool = True, file: str = "timings.json"):
        """Args:
            enabled: time the phases (False: no timing and no GPU synchronisations).
            file: the rows' file in the run's log directory (rank 0 writes it).
        """
        self.enabled, self.file = enabled, file
        self._log_dir = None
        self.rows: list[dict] = []
        self._start: float | None = None
        self._iteration = None
        self._saves_wrapped = False

    # -- phases outside the module: checkpoint writes -----------------------------------
    def _wrap_checkpoint_io(self, trainer) -> None:
        """Time every checkpoint write, whichever ``CheckpointIO`` the strategy uses."""
        io = trainer.strategy.checkpoint_io
        if self._saves_wrapped or io is None:
            return
        save = io.save_checkpoint

        def timed_save(*args, **kwargs):
            with phase("checkpoint"):
                return save(*args, **kwargs)

        io.save_checkpoint = timed_save
        self._saves_wrapped = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        set_enabled(self.enabled)
        # trainer.log_dir is a collective under DDP: resolve it here, where every rank calls it
        self._log_dir = trainer.log_dir
        if self.enabled:
            self._wrap_checkpoint_io(trainer)

    # -- rows -------------------------------------------------------------------------------
    def _close_row(self, trainer) -> None:
        if not self.enabled:
            return
        seconds = TIMER.pop()
        wall = None if self._start is None else time.perf_counter() - self._start
        frames = trainer.datamodule.frames_per_batch if self._iteration is not None else 0
        row = summarize(seconds, frames, wall)
        module = trainer.lightning_module
        rows, module.update_rows = getattr(module, "update_rows", 0), 0
        if rows:
            row["perf/update_samples"] = float(rows)
            if row.get("time/update"):
                row["perf/update_samples_per_s"] = rows / row["time/update"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            row["perf/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        if not seconds and wall is None:
            return
        step = self._iteration if self._iteration is not None else 0
        if trainer.logger is not None:
            trainer.logger.log_metrics(row, step=step)
        self.rows.append({"iteration": "start" if self._iteration is None else self._iteration, **row})
        log_dir = self._log_dir
        if trainer.global_rank == 0 and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            tmp = os.path.join(log_dir, self.file + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self.rows, f, indent=1)
            os.replace(tmp, os.path.join(log_dir, self.file))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._close_row(trainer)
        self._iteration, self._start = trainer.current_epoch, time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_row(trainer)
        self._iteration, self._start = None, None

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state.get("rows", []))
