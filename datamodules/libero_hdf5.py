"""Demonstrations in LIBERO's own HDF5 layout, and the action statistics of a demo folder.

One file per task, named as LIBERO names its released files (``<task name>_demo.hdf5``), with
the groups and attributes of LIBERO's ``scripts/create_dataset.py`` (and OpenVLA's
``regenerate_libero_dataset.py``, which keeps the same keys):

* ``data`` attrs: ``env_name``, ``problem_info`` (JSON: problem_name, domain_name,
  language_instruction), ``macros_image_convention``, ``bddl_file_name``, ``bddl_file_content``,
  ``env_args`` (JSON: type, env_name, problem_name, bddl_file, env_kwargs), ``num_demos``,
  ``total``;
* ``data/demo_i`` (i = 0, 1, ... in order): ``actions`` [T, 7] float64 (LIBERO's convention:
  delta pose in [-1, 1], gripper -1 open / +1 close), ``states`` [T, S] (flattened MuJoCo state
  before each action), ``robot_states`` [T, 9] (gripper qpos, eef pos, eef quat), ``rewards`` and
  ``dones`` [T] uint8 (1 at the last step), ``obs/agentview_rgb`` and ``obs/eye_in_hand_rgb``
  [T, H, W, 3] uint8 as robosuite renders them (upside down: OpenGL convention), ``obs/gripper_states``
  [T, 2], ``obs/joint_states`` [T, 7], ``obs/ee_states`` [T, 6] (pos + axis-angle), ``obs/ee_pos``,
  ``obs/ee_ori``; attrs ``num_samples``, ``model_file`` (the MJCF XML), ``init_state`` (= ``states[0]``,
  the state after the settle steps: replaying ``actions`` from it reproduces the episode).

``no_noops``: OpenVLA's filter of no-op transitions (position and rotation all below 1e-4 and
the gripper command unchanged from the previous kept action), applied while writing.

``dataset_statistics.json`` (written next to the files): OpenVLA's per-dataset action
statistics ({key: {action: {mean, std, max, min, q01, q99, mask}, num_transitions,
num_trajectories}}) over the actions in OpenVLA's convention (gripper 1 open / 0 closed, not
normalised: mask false), which the kit's action codecs read (``norm_stats``/``unnorm_key``).
"""
from __future__ import annotations

import json
import os

import numpy as np

STATISTICS_FILE = "dataset_statistics.json"


def import_h5py():
    try:
        import h5py
    except ImportError as err:
        raise ImportError("writing LIBERO HDF5 demonstrations needs h5py: pip install h5py") from err
    return h5py


def is_noop(action: np.ndarray, prev_action: np.ndarray | None, threshold: float = 1e-4) -> bool:
    """OpenVLA's ``is_noop``: the 6 pose dimensions near zero and (when there is a previous
    kept action) the same gripper command as before."""
    if prev_action is None:
        return bool(np.linalg.norm(action[:-1]) < threshold)
    return bool(np.linalg.norm(action[:-1]) < threshold and action[-1] == prev_action[-1])


def openvla_actions(actions: np.ndarray) -> np.ndarray:
    """LIBERO actions (gripper -1 open, +1 close) -> OpenVLA's convention (gripper 1 open,
    0 closed), as OpenVLA's LIBERO dataset transform: 1 - clip(g, 0, 1)."""
    out = np.asarray(actions, np.float64).copy()
    out[..., -1] = 1.0 - np.clip(out[..., -1], 0.0, 1.0)
    return out


def episode_arrays(episode, no_noops: bool = False) -> dict[str, np.ndarray] | None:
    """A recorded expert episode (modules/experts/episode.py) -> the arrays of one ``demo_i``
    group; None when nothing is left."""
    import robosuite.utils.transform_utils as T

    keep, prev = [], None
    for t, action in enumerate(episode.actions):
        if no_noops and is_noop(action, prev):
            continue
        keep.append(t)
        prev = action
    if not keep:
        return None
    obs = [episode.obs[t] for t in keep]
    ee = np.stack([np.concatenate([o["robot0_eef_pos"], T.quat2axisangle(o["robot0_eef_quat"])]) for o in obs])
    n = len(keep)
    marks = np.zeros(n, np.uint8)
    marks[-1] = 1
    return {
        "actions": np.stack([episode.actions[t] for t in keep]).astype(np.float64),
        "states": np.stack([episode.states[t] for t in keep]),
        "robot_states": np.stack([np.concatenate([o["robot0_gripper_qpos"], o["robot0_eef_pos"], o["robot0_eef_quat"]])
                                  for o in obs]),
        "rewards": marks.copy(), "dones": marks,
        "obs/agentview_rgb": np.stack([o["agentview_image"] for o in obs]).astype(np.uint8),
        "obs/eye_in_hand_rgb": np.stack([o["robot0_eye_in_hand_image"] for o in obs]).astype(np.uint8),
        "obs/gripper_states": np.stack([o["robot0_gripper_qpos"] for o in obs]),
        "obs/joint_states": np.stack([o["robot0_joint_pos"] for o in obs]),
        "obs/ee_states": ee, "obs/ee_pos": ee[:, :3], "obs/ee_ori": ee[:, 3:],
    }


class DemoFile:
    """Writes one task's demonstrations; the file appears under its final name only when
    ``close()`` has written the totals (a crash leaves ``<path>.partial``, never a file that
    looks complete)."""

    def __init__(self, path: str, bddl_file: str, problem_info: dict, env_kwargs: dict):
        import robosuite.macros as macros

        h5py = import_h5py()
        self.path, self.tmp = path, path + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        self.data = self.file.create_group("data")
        problem_name = problem_info["problem_name"]
        attrs = self.data.attrs
        attrs["env_name"] = problem_name
        attrs["problem_info"] = json.dumps(problem_info)
        attrs["macros_image_convention"] = macros.IMAGE_CONVENTION
        attrs["bddl_file_name"] = bddl_file
        with open(bddl_file) as f:
            attrs["bddl_file_content"] = f.read()
        attrs["env_args"] = json.dumps({"type": 1, "env_name": problem_name, "problem_name": problem_name,
                                        "bddl_file": bddl_file, "env_kwargs": env_kwargs})
        self.num_demos = self.total = 0

    def add(self, arrays: dict[str, np.ndarray], model_xml: str) -> None:
        group = self.data.create_group(f"demo_{self.num_demos}")
        for key, value in arrays.items():
            group.create_dataset(key, data=value)
        n = len(arrays["actions"])
        group.attrs["num_samples"] = n
        group.attrs["model_file"] = model_xml
        group.attrs["init_state"] = arrays["states"][0]  # as LIBERO's create_dataset.py: the first recorded state
        self.num_demos += 1
        self.total += n

    def close(self) -> str:
        self.data.attrs["num_demos"] = self.num_demos
        self.data.attrs["total"] = self.total
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path


def demo_files(folder: str) -> list[str]:
    """The ``*_demo.hdf5`` files of a folder, sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r}: no such demonstration folder")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith("_demo.hdf5"))


def dataset_statistics(files: list[str], key: str) -> dict:
    """OpenVLA's action statistics over every demo of ``files`` (actions in OpenVLA's
    convention; the gripper dimension unnormalised)."""
    h5py = import_h5py()
    actions, trajectories = [], 0
    for path in files:
        with h5py.File(path, "r") as f:
            for name in f["data"]:
                actions.append(openvla_actions(f["data"][name]["actions"][()]))
                trajectories += 1
    if not actions:
        raise ValueError(f"no demonstrations in {files}")
    a = np.concatenate(actions)
    mask = [True] * (a.shape[1] - 1) + [False]
    stats = {"mean": a.mean(0), "std": a.std(0), "max": a.max(0), "min": a.min(0),
             "q01": np.quantile(a, 0.01, axis=0), "q99": np.quantile(a, 0.99, axis=0)}
    return {key: {"action": {**{k: v.tolist() for k, v in stats.items()}, "mask": mask},
                  "num_transitions": int(len(a)), "num_trajectories": trajectories}}


def write_statistics(folder: str, key: str) -> str:
    path = os.path.join(folder, STATISTICS_FILE)
    stats = dataset_statistics(demo_files(folder), key)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=2)
    os.replace(tmp, path)
    return path


def demo_file_for(folder: str, suite: str, task_id: int) -> str:
    """The demo file of LIBERO task ``task_id`` of ``suite`` in ``folder``: ``<task name>_demo.hdf5``."""
    from datamodules.libero_setup import setup_libero

    setup_libero()
    from libero.libero import benchmark

    name = benchmark.get_benchmark_dict()[suite]().get_task(task_id).name
    path = os.path.join(folder, f"{name}_demo.hdf5")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.demos={folder!r}: no {name}_demo.hdf5 for {suite} task {task_id} "
                                "(scripts/write_libero_demos.py writes it)")
    return path


def read_statistics(folder: str, key: str | None = None) -> tuple[dict, str]:
    """(the folder's dataset_statistics.json, the chosen key); ``key`` None: the only one."""
    path = os.path.join(folder, STATISTICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.demos={folder!r}: no {STATISTICS_FILE} (scripts/write_libero_demos.py "
                                "writes it; for other demos: python scripts/write_libero_demos.py --statistics_only)")
    with open(path) as f:
        stats = json.load(f)
    if key is None:
        if len(stats) != 1:
            raise ValueError(f"data.unnorm_key=None: {path} has several keys {sorted(stats)}; name one")
        key = next(iter(stats))
    if key not in stats:
        raise ValueError(f"data.unnorm_key={key!r}: not in {path} (available: {sorted(stats)})")
    return stats, key
