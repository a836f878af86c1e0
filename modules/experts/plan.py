"""Scripted experts as a sequence of phases, each a closed-loop move of the grip site.

A ``Phase`` names a target grip-site position (a function of the privileged ``Scene``, read
again on every step, so targets follow the objects), a gripper command, a yaw, and when it
is over: the target is reached within ``tol`` after at least ``min_steps`` steps, or an
extra ``until`` condition holds, or ``max_steps`` have passed (the expert then moves on,
and the episode may fail: LIBERO's success predicate is the judge). After the last phase
the expert holds still.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from modules.experts.scene import OPEN, Scene, down, pose_action

Target = Callable[[Scene], np.ndarray]


@dataclass
class Phase:
    name: str
    target: Target
    gripper: float = OPEN
    yaw: float = 0.0
    tol: float = 0.01
    min_steps: int = 0
    max_steps: int = 80
    speed: float = 1.0  # cap on the position action's norm (1 = 0.05 m per step)
    until: Callable[[Scene], bool] | None = None  # ends the phase early when true
    orientation: np.ndarray | None = None  # a full grip-site orientation; None: pointing down at ``yaw``

    def over(self, scene: Scene, steps: int) -> bool:
        if steps >= self.max_steps:
            return True
        if steps < self.min_steps:
            return False
        if self.until is not None:
            return bool(self.until(scene))
        return float(np.linalg.norm(self.target(scene) - scene.eef_pos)) < self.tol


class PhaseExpert:
    """Runs ``plan(scene) -> list[Phase]`` (built at the first step of an episode, so a plan
    can look at the initial state, e.g. to pick a grasp side)."""

    def __init__(self, plan: Callable[[Scene], list[Phase]]):
        self.plan = plan
        self.phases: list[Phase] | None = None
        self.index = self.steps = 0

    def reset(self) -> None:
        self.phases, self.index, self.steps = None, 0, 0

    @property
    def phase(self) -> str:
        if self.phases is None:
            return "start"
        return self.phases[self.index].name if self.index < len(self.phases) else "done"

    def act(self, scene: Scene) -> np.ndarray:
        if self.phases is None:
            self.phases = self.plan(scene)
        while self.index < len(self.phases) and self.phases[self.index].over(scene, self.steps):
            self.index, self.steps = self.index + 1, 0
        phase = self.phases[min(self.index, len(self.phases) - 1)]
        self.steps += 1
        if self.index >= len(self.phases):  # done: hold the last phase's pose and gripper
            target, speed = scene.eef_pos, 0.0
        else:
            target, speed = phase.target(scene), phase.speed
        rot = phase.orientation if phase.orientation is not None else down(phase.yaw)
        return pose_action(scene.eef_pos, scene.eef_mat, target, rot, phase.gripper, speed)
