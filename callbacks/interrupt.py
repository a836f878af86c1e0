"""StopOnSignal: SIGINT (Ctrl-C) and SIGTERM (a scheduler, ``scripts/sweep.py --time_limit``) end a
run with a checkpoint on disk, the command that resumes it, and a non-zero exit status (128 + N).

Resuming is exact from the end of any iteration (docs/reliability.md), so on a signal:
* if the state after the last finished iteration is already on disk (``last.ckpt`` is written
  every iteration by default, or a task-end checkpoint), the run stops at once: the iteration in
  progress is dropped and the resumed run does it again, identically;
* otherwise (checkpoints every N > 1 iterations) the iteration in progress finishes, ``last.ckpt``
  is written, and the run stops; a second signal stops it at once.
train.py adds this callback to every run (it is not a YAML knob) and prints the message.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys

from lightning import Callback

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def resume_command(argv: list[str], ckpt: str) -> str:
    """``python train.py ARGV --ckpt_path CKPT`` (an earlier --ckpt_path dropped)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--ckpt_path":
            skip = True
        elif not a.startswith("--ckpt_path="):
            args.append(a)
    return shlex.join(["python", "train.py", *args, "--ckpt_path", ckpt])


class StopOnSignal(Callback):
    def __init__(self, argv: list[str]):
        self.argv = list(argv)
        self.completed: int | None = None  # the last iteration (epoch) whose end-of-iteration work is done
        self.pending: int | None = None  # a signal waiting for the end of the iteration
        self._previous: dict = {}
        self._trainer = None

    # -- handlers -----------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        try:
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # e.g. Lightning's SIGTERM notifier (DDP launchers)
        name = signal.Signals(signum).name
        saved, done = self._saved(), self._done()
        if self.pending is not None or saved is None or saved[1] >= done:
            raise RunInterrupted(signum, self._message(name, saved))
        self.pending = signum
        print(f"[{name}] stopping at the end of this iteration to write a checkpoint (send {name} again to stop "
              "now)", file=sys.stderr, flush=True)

    # -- the end of each iteration -------------------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Runs after every other callback (train.py appends it last), ModelCheckpoint included."""
        self.completed = trainer.current_epoch
        if self.pending is None:
            return
        saved = self._saved()
        if saved is None or saved[1] < self.completed:
            callback = trainer.checkpoint_callback
            folder = callback.dirpath if callback is not None and callback.dirpath else \
                os.path.join(trainer.log_dir or ".", "checkpoints")
            trainer.save_checkpoint(os.path.join(folder, "last.ckpt"), weights_only=False)
        raise RunInterrupted(self.pending, self._message(signal.Signals(self.pending).name, self._saved()))

    # -----------------------------------------------------------------------------------------
    def _done(self) -> int:
        """The last iteration whose end-of-iteration work is done (-1: none)."""
        if self.completed is not None:
            return self.completed
        return self._trainer.current_epoch - 1 if self._trainer is not None else -1  # a resumed run's start

    def _saved(self) -> tuple[str, int] | None:
        """(path, iteration) of the latest checkpoint on disk: written by this run, else resumed from."""
        t = self._trainer
        if t is None:
            return None
        saved = getattr(t.strategy.checkpoint_io, "last_saved", None)
        if saved is None and t.ckpt_path:
            saved = (os.path.abspath(t.ckpt_path), t.current_epoch - 1)
        return saved

    def _message(self, name: str, saved) -> str:
        if saved is None:
            return f"[{name}] stopped before the first iteration ended: nothing to resume; run the same command again"
        return (f"[{name}] stopped; the last checkpoint is {saved[0]} (after {saved[1] + 1} iterations); "
                "resume with:\n"
                f"{resume_command(self.argv, saved[0])}")
