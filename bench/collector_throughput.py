"""Collector env frames/s vs stepping the same vectorised BabyAI env, same random policy,
same process. Usage: python bench/collector_throughput.py [--num_envs 64 --steps 128 --reps 5]"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torchrl.collectors import Collector  # noqa: E402
from torchrl.envs.utils import step_mdp  # noqa: E402

from datamodules.babyai import BabyAIEnv  # noqa: E402


def random_policy(td):
    td.set("action", torch.randint(0, 3, td.batch_size))
    return td


def baseline(n, steps):
    env = BabyAIEnv(target="red ball", num_envs=n, seed=0)
    td = env.reset()
    t = time.perf_counter()
    for _ in range(steps):
        td = env.step_and_maybe_reset(random_policy(td))[1]
    return n * steps / (time.perf_counter() - t)


def collector(n, steps):
    env = BabyAIEnv(target="red ball", num_envs=n, seed=0)
    c = Collector(env, random_policy, frames_per_batch=n * steps, total_frames=-1)
    it = iter(c)
    next(it)  # warm-up
    t = time.perf_counter()
    next(it)
    fps = n * steps / (time.perf_counter() - t)
    c.shutdown()
    return fps


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_envs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    base, coll = [], []
    for _ in range(a.reps):
        base.append(baseline(a.num_envs, a.steps))
        coll.append(collector(a.num_envs, a.steps))
    b, c = statistics.median(base), statistics.median(coll)
    print(f"raw env step_and_maybe_reset: {b:.0f} frames/s (median of {a.reps})")
    print(f"torchrl Collector:            {c:.0f} frames/s (median of {a.reps})")
    print(f"ratio collector/raw: {c / b:.2f}")
