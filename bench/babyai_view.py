"""GoToObjectRoom's observation: the room's cached encoding (datamodules/babyai.py) vs minigrid's
own ``MiniGridEnv.gen_obs`` (per-cell slice, rotate, encode), same process, same seeds and actions.

    python bench/babyai_view.py [--num_envs 32 --steps 64 --reps 7]

Times the batched ``BabyAIEnv`` step loop of one quickstart rollout (num_envs x steps env steps,
random navigation actions, resets included) with each ``gen_obs``, alternating, and prints
medians, the ratio, and the time per rollout. The observations of both are asserted equal.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minigrid.minigrid_env import MiniGridEnv  # noqa: E402

from datamodules import babyai  # noqa: E402


class MinigridViewRoom(babyai.GoToObjectRoom):
    """The same room observed through minigrid's own gen_obs (the baseline)."""

    gen_obs = MiniGridEnv.gen_obs


def rollout(room_cls, num_envs: int, steps: int, seed: int) -> tuple[float, np.ndarray]:
    original = babyai.GoToObjectRoom
    babyai.GoToObjectRoom = room_cls  # make_minigrid builds this class
    try:
        env = babyai.BabyAIEnv(target="red ball", num_envs=num_envs, seed=seed)
    finally:
        babyai.GoToObjectRoom = original
    actions = torch.randint(0, 3, (steps, num_envs), generator=torch.Generator().manual_seed(seed))
    td = env.reset()
    views = []
    t = time.perf_counter()
    for k in range(steps):
        td.set("action", actions[k])
        td = env.step_and_maybe_reset(td)[1]
        views.append(env._views.copy())
    return time.perf_counter() - t, np.stack(views)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_envs", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu} ({os.cpu_count()} cores), numpy {np.__version__}, torch {torch.__version__}")
    times = {"minigrid gen_obs": [], "cached room encoding": []}
    for rep in range(args.reps + 1):  # rep 0: warm-up
        t_ref, v_ref = rollout(MinigridViewRoom, args.num_envs, args.steps, seed=rep)
        t_new, v_new = rollout(babyai.GoToObjectRoom, args.num_envs, args.steps, seed=rep)
        assert np.array_equal(v_ref, v_new), "observations differ"
        if rep:
            times["minigrid gen_obs"].append(t_ref)
            times["cached room encoding"].append(t_new)
    frames = args.num_envs * args.steps
    print(f"{args.num_envs} envs x {args.steps} steps = {frames} env steps per rollout, {args.reps} reps, "
          f"observations equal")
    for name, ts in times.items():
        print(f"{name:22s} {statistics.median(ts) * 1000:8.1f} ms per rollout "
              f"({frames / statistics.median(ts):8.0f} steps/s)  all: {', '.join(f'{x * 1000:.0f}' for x in ts)}")
    ratio = statistics.median(times["cached room encoding"]) / statistics.median(times["minigrid gen_obs"])
    print(f"ratio cached / minigrid (medians) {ratio:.2f}")


if __name__ == "__main__":
    main()
