"""Per-step overhead of the kit's env worker pool (``RobustEnvPool``) against torchrl's
``ParallelEnv`` over the same workers, with a cheap env so that the pool's own cost shows.

Each worker runs torchrl's ``ToyVLAEnv`` (7-D action, a 3x224x224 uint8 image observation plus
a language instruction: the size of a LIBERO observation after OpenVLA's pipeline, a cheap
step). Reports the median ms per batched step over reps (the two pools alternate) and the
in-process cost of one env step, so ``pool - env`` is what the pool adds.

Usage: python bench/env_pool_overhead.py [--workers 8 --steps 50 --reps 3]
"""
import argparse
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torchrl.envs import ParallelEnv  # noqa: E402
from torchrl.envs.custom import ToyVLAEnv  # noqa: E402

from datamodules.robust_env import RobustEnvPool  # noqa: E402


def make_env(seed: int):
    return ToyVLAEnv(action_dim=7, state_dim=8, from_pixels=True, render_size=224, batch_size=[], seed=seed)


def ms_per_step(env, steps: int, batch: tuple) -> float:
    td = env.reset()
    action = torch.zeros(*batch, 7)
    t = time.perf_counter()
    for _ in range(steps):
        td = env.step(td.set("action", action.clone()))["next"]
    return (time.perf_counter() - t) / steps * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    n = args.workers
    makers = [functools.partial(make_env, i) for i in range(n)]
    pool = RobustEnvPool(makers)
    penv = ParallelEnv(n, makers, use_buffers=False)  # ENVIRONMENT.md: faster than the default
    single = make_env(0)
    for env, batch in ((pool, (n,)), (penv, (n,)), (single, ())):
        ms_per_step(env, 5, batch)  # warm-up
    res = {"RobustEnvPool": [], "ParallelEnv": [], "one env in-process": []}
    for _ in range(args.reps):
        res["RobustEnvPool"].append(ms_per_step(pool, args.steps, (n,)))
        res["ParallelEnv"].append(ms_per_step(penv, args.steps, (n,)))
        res["one env in-process"].append(ms_per_step(single, args.steps, ()))
    print(f"{n} workers, {args.steps} steps x {args.reps} reps, {os.cpu_count()} cores")
    for k, v in res.items():
        print(f"{k:20s} ms/step median {statistics.median(v):6.2f}  (all: " + ", ".join(f"{x:.2f}" for x in v) + ")")
    print(f"ratio RobustEnvPool / ParallelEnv (medians): "
          f"{statistics.median(res['RobustEnvPool']) / statistics.median(res['ParallelEnv']):.2f}")
    pool.close()
    penv.close()


if __name__ == "__main__":
    main()
