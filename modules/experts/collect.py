"""Scripted-expert episodes in parallel worker processes (one LIBERO env per task and worker).

A ``Job`` is one episode: a task, where its initial state comes from (``fixed``: the task's
stored initial state ``index``, LIBERO's evaluation protocol; ``random``: a fresh layout from
the env's own placement sampler, seeded with ``index``) and whether to record it (camera
images at ``size`` px, proprioception, sim states, actions) for a demonstration file.
Workers render on GPU ``worker % n_gpus`` when MUJOCO_GL=egl and GPUs are present.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np

CAMERAS = ("agentview", "robot0_eye_in_hand")
INIT_SOURCES = ("fixed", "random")


@dataclass(frozen=True)
class Job:
    suite: str
    task_id: int
    index: int  # fixed: the stored initial state's index; random: the layout's seed
    init: str = "fixed"
    record: bool = False
    size: int = 128
    max_steps: int = 300
    settle_steps: int = 10
    action_noise: float = 0.0  # std of the noise on the executed pose actions (modules/experts/episode.py)


_ENVS: dict = {}  # per worker: (suite, task_id, record, size) -> (env, expert, initial states)


def _worker_env(job: Job):
    from modules.experts.episode import make_raw_env, task_bddl
    from modules.experts.libero_goal import libero_goal_expert

    key = (job.suite, job.task_id, job.record, job.size)
    if key not in _ENVS:
        _, bddl, inits = task_bddl(job.suite, job.task_id)
        gpu = -1
        if os.environ.get("MUJOCO_GL") == "egl" and job.record:
            import torch

            n = torch.cuda.device_count()
            gpu = (mp.current_process()._identity or (0,))[0] % n if n else -1
        env = make_raw_env(bddl, CAMERAS if job.record else (), job.size, gpu)
        _ENVS[key] = (env, libero_goal_expert(job.task_id), inits)
    return _ENVS[key]


def run_job(job: Job):
    """One episode -> ``Episode`` (with its recording when ``job.record``)."""
    from modules.experts.episode import run_episode

    env, expert, inits = _worker_env(job)
    # Every reset rebuilds the scene and draws the fixtures' places (cabinet, stove, rack: not in
    # the stored state) and the objects' from numpy's global RNG; seeding it first makes an
    # episode reproducible (the kit's LIBERO env seeds it the same way: env.set_seed(seed)).
    if job.init == "fixed":
        init = inits[job.index % len(inits)]
    else:
        env.seed(job.index)
        env.reset()
        init = env.get_sim_state().copy()
    env.seed(job.index)
    return job, run_episode(env, expert, init, job.index, job.max_steps, job.settle_steps, record=job.record,
                            action_noise=job.action_noise, seed=job.index)


def close_envs() -> None:
    """Close this process's envs (their GL contexts go before the interpreter's teardown)."""
    while _ENVS:
        env, _, _ = _ENVS.popitem()[1]
        env.close()


def run_jobs(jobs: list[Job], processes: int = 1):
    """Yield (job, episode) in the order of ``jobs``; ``processes`` > 1: a pool of spawned
    workers (each imports LIBERO once and keeps one env per task)."""
    if processes <= 1:
        try:
            for job in jobs:
                yield run_job(job)
        finally:
            close_envs()
        return
    from datamodules.libero_setup import setup_libero

    setup_libero()  # MUJOCO_GL, EGL_PLATFORM, LIBERO's config: inherited by the workers
    with mp.get_context("spawn").Pool(processes) as pool:
        yield from pool.imap(run_job, jobs, chunksize=1)


def success_table(results) -> dict[int, dict]:
    """{task_id: {episodes, successes, success, mean_steps_success}} from (job, episode) pairs."""
    table: dict[int, dict] = {}
    for job, ep in results:
        row = table.setdefault(job.task_id, {"episodes": 0, "successes": 0, "steps": []})
        row["episodes"] += 1
        row["successes"] += int(ep.success)
        if ep.success:
            row["steps"].append(ep.steps)
    for row in table.values():
        row["success"] = row["successes"] / row["episodes"]
        steps = row.pop("steps")
        row["mean_steps_success"] = float(np.mean(steps)) if steps else None
    return table
