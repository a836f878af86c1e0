"""LIBERO demonstrations (robomimic-style HDF5) -> ``Trajectory`` objects for pseudo-labelling.

Layout read: ``data/demo_N/obs/agentview_rgb`` uint8 [T, H, W, 3], ``data/demo_N/obs/ee_pos``
[T, 3], ``data/demo_N/obs/gripper_states`` [T, 2] (finger joint positions), ``data/demo_N/actions``
[T, 7] whose last dim is the gripper command (-1 open, +1 close), optional ``dones``; the
instruction is ``json.loads(data.attrs["problem_info"])["language_instruction"]``, else the file
name. h5py is imported only here, on use.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import numpy as np

from modules.vla_rl.pseudo_labels import Trajectory

GRIPPER_SOURCES = ("action", "state")


def _h5py():
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading LIBERO HDF5 demonstrations needs h5py, which is not installed: "
                          "pip install h5py (only the dataset-building step needs it)") from err
    return h5py


def instruction_from_filename(path: str) -> str:
    """LIBERO names files after the instruction: ``KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5``
    -> "turn on the stove" (the upper-case scene prefix of libero_90/10 dropped)."""
    stem = re.sub(r"_demo$", "", os.path.splitext(os.path.basename(path))[0])
    words = stem.split("_")
    while words and (words[0].isupper() or words[0].isdigit()):
        words = words[1:]
    return " ".join(words)


def _instruction(data, path: str) -> str:
    info = data.attrs.get("problem_info")
    if info is not None:
        if isinstance(info, bytes):
            info = info.decode()
        text = json.loads(info).get("language_instruction")
        if text:
            return str(text).strip().strip('"')
    return instruction_from_filename(path)


def _gripper(demo, source: str) -> np.ndarray:
    if source == "action":  # the commanded gripper: -1 open, +1 close
        return np.asarray(demo["actions"][()], float)[:, -1]
    return gripper_from_fingers(demo["obs/gripper_states"][()])


def gripper_from_fingers(fingers) -> np.ndarray:
    """Measured finger joint positions [T, 2] (or a width [T]) -> [-1, 1] with +1 = most
    closed in this trajectory (the PseudoLabeler's convention)."""
    fingers = np.asarray(fingers, float)
    width = np.abs(fingers[:, 0] - fingers[:, 1]) if fingers.ndim == 2 and fingers.shape[1] > 1 else fingers
    width = width.reshape(-1)
    lo, hi = width.min(), width.max()
    return 1.0 - 2.0 * (width - lo) / max(hi - lo, 1e-8)


def read_libero_demos(path: str, flip_180: bool = True, gripper_source: str = "action",
                      image_key: str = "agentview_rgb") -> Iterator[Trajectory]:
    """Yield one ``Trajectory`` per ``data/demo_N`` (in N order). ``flip_180``: LIBERO renders
    upside down; flip so the frames look like the (flipped) frames the RPRM scores online."""
    if gripper_source not in GRIPPER_SOURCES:
        raise ValueError(f"gripper_source={gripper_source!r}: expected one of {GRIPPER_SOURCES}")
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path}: no 'data' group (not a LIBERO/robomimic demonstration file)")
        data = f["data"]
        instruction = _instruction(data, path)
        names = sorted((k for k in data if k.startswith("demo_")), key=lambda s: int(s.split("_")[-1]))
        stem = os.path.splitext(os.path.basename(path))[0]
        for name in names:
            demo = data[name]
            images = np.asarray(demo[f"obs/{image_key}"][()], np.uint8)
            if flip_180:
                images = np.ascontiguousarray(images[:, ::-1, ::-1])
            dones = demo["dones"][()] if "dones" in demo else None
            yield Trajectory(
                images=images, gripper=_gripper(demo, gripper_source),
                ee_pos=np.asarray(demo["obs/ee_pos"][()], float),
                success=bool(dones[-1]) if dones is not None and len(dones) else True,  # demos succeed
                instruction=instruction, episode=f"{stem}/{name}")
