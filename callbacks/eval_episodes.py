"""The outcome of every finished evaluation episode, on disk as the episodes end.

An evaluation cut short (a time limit, a crash, a machine taken back) goes on where it stopped
when the run resumes: the episodes already recorded for the same evaluation of the same weights
are not played again. ``PerTaskEvaluation`` keeps one file per evaluation and rank,
``<log dir>/eval_episodes<_tag>/<label>.rank<r>.json``:
``{"key": {...}, "episodes": [[task, episode, success], ...]}``. ``key`` names what was
evaluated (the evaluation's label and settings, the training step, a checksum of the acting
policy's weights); a file whose key differs belongs to another evaluation and is started over.
The files stay as the record of each episode's outcome.

Per-task pools skip a batch of episodes only when all of its outcomes are recorded, so a resumed
evaluation plays the rest as the uninterrupted one would have, sampled actions included (their
stream is seeded per batch). In one pool every episode is skipped or played on its own: greedy
episodes are the same, sampled ones draw other actions than they would have (the pool's action
stream is one per evaluation).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from modules.checkpoint_io import atomic_write_text


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A checksum of ``module``'s parameters: the float64 sum and sum of squares of each tensor."""
    sums = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
            for p in module.parameters()]
    data = torch.stack(sums).cpu().numpy().tobytes() if sums else b""
    return hashlib.sha1(data).hexdigest()[:16]


class EpisodeOutcomes:
    """{(task, episode): success} of one evaluation, loaded from ``path`` when its key matches;
    ``add`` records in memory, ``flush`` writes the file (atomically). ``path`` None: memory only."""

    def __init__(self, path: str | None, key: dict):
        self.path, self.key = path, key
        self.outcomes: dict[tuple[int, int], bool] = {}
        if path is not None and os.path.isfile(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = None  # unreadable: play the episodes again
            if isinstance(saved, dict) and saved.get("key") == key:
                self.outcomes = {(int(k), int(e)): bool(s) for k, e, s in saved["episodes"]}
        self.recorded = len(self.outcomes)  # episodes known before this evaluation played any

    def get(self, task: int, episode: int) -> bool | None:
        return self.outcomes.get((task, episode))

    def add(self, task: int, episode: int, success: bool) -> None:
        self.outcomes[(task, episode)] = bool(success)

    def flush(self) -> None:
        if self.path is None:
            return
        episodes = [[k, e, s] for (k, e), s in sorted(self.outcomes.items())]
        atomic_write_text(self.path, json.dumps({"key": self.key, "episodes": episodes}))
