"""Running a scripted expert on a raw LIBERO env under the evaluation protocol.

The protocol is the one the kit's LIBERO envs and OpenVLA's evaluation use: reset, set one of
the task's fixed initial states, ``settle_steps`` no-op steps (gripper open), then at most
``max_steps`` expert steps; the episode succeeds when LIBERO's own predicate
(``env.check_success()``, the BDDL goal) holds, and ends there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from modules.experts.scene import Scene

NOOP = np.array([0, 0, 0, 0, 0, 0, -1], float)  # LIBERO's dummy action (gripper open)


def task_bddl(suite: str, task_id: int):
    """(task, bddl file path, initial states [50, D]) from LIBERO's benchmark registry."""
    from datamodules.libero_setup import setup_libero

    setup_libero()
    from libero.libero import benchmark, get_libero_path

    bench = benchmark.get_benchmark_dict()[suite]()
    task = bench.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    return task, bddl, bench.get_task_init_states(task_id)


def make_raw_env(bddl: str, cameras: tuple[str, ...] = (), size: int = 128, render_gpu: int = -1):
    """LIBERO's ``OffScreenRenderEnv`` rendering ``cameras`` at ``size`` px, or (no cameras)
    its ``ControlEnv`` without any renderer: the simulation alone."""
    from libero.libero.envs.env_wrapper import ControlEnv, OffScreenRenderEnv

    if not cameras:
        return ControlEnv(bddl_file_name=bddl, use_camera_obs=False, has_renderer=False,
                          has_offscreen_renderer=False)
    return OffScreenRenderEnv(bddl_file_name=bddl, camera_names=list(cameras), camera_heights=size,
                              camera_widths=size, render_gpu_device_id=render_gpu)


@dataclass
class Episode:
    success: bool
    steps: int  # expert steps taken (settle steps excluded)
    init_state: int
    phase: str  # the expert's phase when the episode ended
    init_state_vector: np.ndarray | None = None  # the flattened sim state it started from
    model_xml: str = ""  # the MJCF model (recorded episodes: LIBERO's demo files keep it)
    # recorded per expert step t (``record=True``): the observation before action t, the
    # flattened sim state before action t, and action t
    obs: list[dict] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)


def run_episode(env, expert, init_state: np.ndarray, init_state_id: int = 0, max_steps: int = 300,
                settle_steps: int = 10, record: bool = False, action_noise: float = 0.0,
                seed: int = 0) -> Episode:
    """``action_noise``: Gaussian noise (std, in action units) added to the six pose dimensions of
    every executed action, clipped to [-1, 1] (the recorded action is the executed one, so a demo
    file replays exactly); the closed-loop expert corrects it, which spreads the states a
    demonstration visits."""
    rng = np.random.default_rng(seed)
    env.reset()
    obs = env.set_init_state(init_state)
    for _ in range(settle_steps):
        obs, _, _, _ = env.step(NOOP)
    expert.reset()
    scene = Scene(env)
    episode = Episode(False, 0, init_state_id, "start", np.asarray(init_state).copy())
    for t in range(max_steps):
        action = expert.act(scene)
        if action_noise > 0:
            action = action.copy()
            action[:6] = np.clip(action[:6] + rng.normal(0.0, action_noise, 6), -1.0, 1.0)
        if record:
            episode.obs.append(obs)
            episode.states.append(env.get_sim_state().copy())
            episode.actions.append(action)
        obs, _, _, _ = env.step(action)
        if env.check_success():
            episode.success, episode.steps = True, t + 1
            break
    else:
        episode.steps = max_steps
    episode.phase = expert.phase
    if record:
        episode.model_xml = env.sim.model.get_xml()
    return episode
