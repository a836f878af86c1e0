"""Pseudo-labels for the RPRM from successful trajectories (VLA-RL, "Robotic Process Reward Model").

VLA-RL labels the frames of *successful* trajectories: a frame is positive ("this step completes a
sub-task") when it lies near a gripper open/close change, near a minimum of the end-effector speed
(the arm pauses between sub-motions), or among the last frames (the task is done); every other
frame is negative. Windows, offsets, thresholds and the negative stride are the knobs
(``PseudoLabeler``'s fields, YAML ``data.labeler`` in configs/rprm.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Trajectory:
    """One episode. ``gripper``: command or state in [-1, 1] with +1 = closed (LIBERO's
    action convention); ``ee_pos``: end-effector position per frame."""

    images: np.ndarray  # uint8 [T, H, W, 3] or [T, 3, H, W]
    gripper: np.ndarray  # [T]
    ee_pos: np.ndarray  # [T, 3]
    success: bool
    instruction: str
    episode: str = ""

    def images_chw(self) -> np.ndarray:
        """uint8 [T, 3, H, W] (the kit's image layout)."""
        return channels_first(self.images)


def channels_first(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images of shape {images.shape}: expected [T, H, W, 3] or [T, 3, H, W]")
    if images.shape[-1] == 3:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if images.shape[1] == 3:
        return images
    raise ValueError(f"images of shape {images.shape}: expected [T, H, W, 3] or [T, 3, H, W]")


@dataclass
class FrameLabels:
    label: np.ndarray  # bool [T]: positive = completes a sub-task
    keep: np.ndarray  # bool [T]: frames written to the dataset (all positives + strided negatives)
    gripper_events: np.ndarray  # int [E]: first frame with the new gripper value
    speed_minima: np.ndarray  # int [M]: frames where the end-effector speed has a local minimum


def _window(n: int, centres: np.ndarray, half: int, offset: int) -> np.ndarray:
    """Boolean [n]: True within ``half`` frames of each ``centre + offset`` (clipped to [0, n))."""
    out = np.zeros(n, bool)
    for c in np.asarray(centres, int) + offset:
        lo, hi = max(0, c - half), min(n, c + half + 1)
        if lo < hi:
            out[lo:hi] = True
    return out


@dataclass
class PseudoLabeler:
    """VLA-RL's pseudo-labelling rule; every field is a YAML knob.

    gripper_threshold: gripper value above which the gripper counts as closed.
    gripper_window / gripper_offset: positives at event + offset +- window (an event = the
        first frame whose closed/open state differs from the previous frame's).
    speed_threshold: a speed minimum counts only below this (a fraction of the trajectory's
        peak speed when ``speed_relative``, else in position units per frame).
    speed_order: a minimum is the lowest speed (first of ties) within +- order frames;
        frames closer than ``order`` to either end are not candidates.
    speed_smooth: moving-average length applied to the speed before the search (1 = none).
    speed_window / speed_offset: positives at minimum + offset +- window.
    final_k: the last k frames of a successful trajectory are positive (task completed).
    negative_stride: keep every n-th negative frame (t % n == 0) to limit the class imbalance.
    """

    gripper_threshold: float = 0.0
    gripper_window: int = 2
    gripper_offset: int = 0
    speed_threshold: float = 0.2
    speed_relative: bool = True
    speed_order: int = 3
    speed_smooth: int = 1
    speed_window: int = 2
    speed_offset: int = 0
    final_k: int = 5
    negative_stride: int = 1

    def __post_init__(self):
        for name in ("gripper_window", "speed_window", "final_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.labeler.{name}={getattr(self, name)!r}: must be >= 0")
        for name in ("speed_order", "speed_smooth", "negative_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.labeler.{name}={getattr(self, name)!r}: must be >= 1")
        if self.speed_threshold < 0:
            raise ValueError(f"data.labeler.speed_threshold={self.speed_threshold!r}: must be >= 0")

    # -- the three sources of positives ----------------------------------------------------
    def gripper_events(self, gripper: np.ndarray) -> np.ndarray:
        """Frames where the gripper changes between open and closed (VLA-RL: grasp/release)."""
        closed = np.asarray(gripper, float).reshape(-1) > self.gripper_threshold
        return np.flatnonzero(closed[1:] != closed[:-1]) + 1

    def speed(self, ee_pos: np.ndarray) -> np.ndarray:
        """End-effector speed per frame (central differences), optionally smoothed."""
        pos = np.asarray(ee_pos, float)
        if len(pos) < 2:
            return np.zeros(len(pos))
        v = np.linalg.norm(np.gradient(pos, axis=0), axis=-1)
        if self.speed_smooth > 1:
            k = self.speed_smooth
            padded = np.pad(v, (k // 2, k - 1 - k // 2), mode="edge")
            v = np.convolve(padded, np.ones(k) / k, mode="valid")
        return v

    def speed_minima(self, ee_pos: np.ndarray) -> np.ndarray:
        """Local minima of the end-effector speed below the threshold (VLA-RL: the arm pauses
        at the end of a sub-motion)."""
        v = self.speed(ee_pos)
        n, k = len(v), self.speed_order
        limit = self.speed_threshold * (v.max() if self.speed_relative and n else 1.0)
        out = []
        for t in range(k, n - k):
            seg = v[t - k: t + k + 1]
            if int(np.argmin(seg)) == k and v[t] < limit:  # first lowest frame of its window
                out.append(t)
        return np.asarray(out, int)

    def __call__(self, traj: Trajectory) -> FrameLabels:
        n = len(traj.gripper)
        if len(traj.ee_pos) != n or len(traj.images) != n:
            raise ValueError(f"episode {traj.episode!r}: images ({len(traj.images)}), gripper ({n}) and "
                             f"ee_pos ({len(traj.ee_pos)}) must have one entry per frame")
        events, minima = self.gripper_events(traj.gripper), self.speed_minima(traj.ee_pos)
        label = _window(n, events, self.gripper_window, self.gripper_offset)  # around grasp/release
        label |= _window(n, minima, self.speed_window, self.speed_offset)  # around speed minima
        if traj.success and self.final_k:
            label[max(0, n - self.final_k):] = True  # the last frames complete the task
        keep = label | (np.arange(n) % self.negative_stride == 0)
        return FrameLabels(label, keep, events, minima)
