"""Where a PPO iteration's time goes: named, nestable phases timed on the host clock.

Any part of the kit wraps its work in ``with phase("name"):`` (collection, acting, returns,
anchor targets, the update's forward / backward / optimiser, evaluation, checkpoint writes,
CUDA-graph capture and compilation). Nested phases are recorded under their path, e.g.
``collection/acting`` or ``evaluation/acting``, so acting during evaluation is not counted as
acting during collection. ``callbacks/iteration_timing.py`` reads and resets the totals once
per iteration and logs them.

On a GPU the device is synchronised at both edges of a phase, so asynchronous CUDA work is
charged to the phase that queued it rather than to whichever later phase waits for it. The
cost is a few synchronisations per phase; ``set_enabled(False)`` turns all timing off.

One timer per process (like ``torch.profiler.record_function``, a phase is marked where it
happens, without passing a handle through every call); under DDP each rank times itself.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self):
        self.enabled = True
        self._seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        self._stack.append(name)
        path = "/".join(self._stack)
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._seconds[path] += time.perf_counter() - start
            self._stack.pop()

    def peek(self) -> dict[str, float]:
        """Seconds per phase path since the last ``pop``."""
        return dict(self._seconds)

    def pop(self) -> dict[str, float]:
        """Seconds per phase path since the last ``pop``, and start over."""
        out = dict(self._seconds)
        self._seconds.clear()
        return out


TIMER = PhaseTimer()


def phase(name: str):
    """``with phase("update/forward"): ...`` on the process's timer."""
    return TIMER.phase(name)


def set_enabled(enabled: bool) -> None:
    TIMER.enabled = enabled


def total(seconds: dict[str, float], leaf: str) -> float:
    """Seconds of every phase path that ends in ``leaf`` (e.g. all ``compile_capture``)."""
    return sum(v for k, v in seconds.items() if k == leaf or k.endswith("/" + leaf))
