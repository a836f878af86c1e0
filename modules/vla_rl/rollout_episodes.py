"""Finished episodes of collected [envs, T] rollouts as ``Trajectory``s (the online RPRM's data).

A rollout cuts episodes at its edges: each env's unfinished tail is kept and continued by the
next rollout of the same env (``reset()`` when the datamodule builds a new env). An episode's
frames are the *next* observations o_{t+1} of its steps (what each step produced, up to the
terminal frame): the frames the reward shaping scores, so the RPRM trains on what it will see.
Gripper and end-effector positions come from ``("next", "observation", "state")`` in torchrl
LiberoEnv's layout [eef_pos (3), eef_quat (4), gripper_qpos (2)]; envs without it (BabyAI) get
zeros, which give no gripper events and no speed minima: only the final-frames rule labels them.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from datamodules.tasks import instructions_of
from modules.vla_rl.libero_demos import gripper_from_fingers
from modules.vla_rl.pseudo_labels import Trajectory

STATE_KEY = ("next", "observation", "state")
EE_POS, FINGERS = slice(0, 3), slice(7, 9)  # LiberoEnv's default proprio_keys


class EpisodeSplitter:
    def __init__(self):
        self.partial: dict[int, list[dict]] = {}  # env -> chunks of its unfinished episode
        self.count = 0

    def reset(self) -> None:
        self.partial.clear()

    def add(self, rollout) -> Iterator[Trajectory]:
        """Yield the episodes that end in ``rollout`` (in env, then time order)."""
        n, T = rollout.batch_size
        images = rollout.get(("next", "observation", "image"))
        done = rollout.get(("next", "done")).reshape(n, T)
        success = rollout.get(("next", "success")).reshape(n, T)
        state = rollout.get(STATE_KEY, None)
        texts = instructions_of(rollout)  # row-major over [n, T]
        for i in range(n):
            start = 0
            for t in done[i].nonzero().flatten().tolist():
                chunks = self.partial.pop(i, []) + [self._chunk(images[i], state, i, start, t + 1)]
                yield self._trajectory(chunks, bool(success[i, t]), texts[i * T + t])
                start = t + 1
            if start < T:
                self.partial.setdefault(i, []).append(self._chunk(images[i], state, i, start, T))

    @staticmethod
    def _chunk(images, state, i, start, stop) -> dict:
        return {"images": images[start:stop].cpu(),
                "state": None if state is None else state[i, start:stop].cpu()}

    def _trajectory(self, chunks: list[dict], success: bool, instruction: str) -> Trajectory:
        images = torch.cat([c["images"] for c in chunks]).numpy()
        n = len(images)
        if chunks[0]["state"] is not None:
            state = torch.cat([c["state"] for c in chunks]).double().numpy()
            ee_pos, gripper = state[:, EE_POS], gripper_from_fingers(state[:, FINGERS])
        else:
            ee_pos, gripper = np.zeros((n, 3)), np.zeros(n)
        self.count += 1
        return Trajectory(images=images, gripper=gripper, ee_pos=ee_pos, success=success,
                          instruction=instruction, episode=f"rollout_episode_{self.count - 1}")
