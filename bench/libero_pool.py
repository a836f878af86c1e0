"""A lock-step pool of LIBERO envs with and without spare workers.

In the kit's env pool every step waits for its slowest worker, and a worker whose episode ended
resets inside the pool's reset call, so every episode start stalls all workers. Spare workers
(the ``spare_envs`` LIBERO option, ``datamodules/robust_env.py``) reset in advance and take
the ended episode's slot. This script steps the same pool (``make_libero_env``: libero_goal
task 8, random actions, episodes cut at ``--episode`` steps so every worker resets every
``--episode`` steps) with 0 and with ``--spares`` spare workers, and prints env steps/s, the
share of the time spent in resets, and the ratio. Medians over ``--reps`` alternating runs.

Usage: MUJOCO_GL=egl python bench/libero_pool.py [--envs 16 --spares 4 --episode 100 --steps 300]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from datamodules.libero import make_libero_env  # noqa: E402
from modules.timing import TIMER, phase  # noqa: E402


def run(args, spares: int) -> dict:
    options = {"render_size": args.render, "image_size": args.render, "spare_envs": spares}
    env = make_libero_env("libero_goal", args.task, args.envs, seed=0, max_steps=args.episode, options=options)
    try:
        gen = torch.Generator().manual_seed(0)
        td = env.reset()
        TIMER.pop()
        start = time.perf_counter()
        with phase("collection"):
            for _ in range(args.steps):
                td.set("action", torch.rand(args.envs, 7, generator=gen) * 2 - 1)
                _, td = env.step_and_maybe_reset(td)
        wall = time.perf_counter() - start
        seconds = TIMER.pop()
        return {"steps_per_s": args.envs * args.steps / wall, "wall": wall,
                "reset_share": seconds.get("collection/env_reset", 0.0) / wall, "swaps": env.spare_swaps}
    finally:
        env.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--envs", type=int, default=16, help="slots (workers stepped each lock-step)")
    p.add_argument("--spares", type=int, default=4, help="spare workers in the compared pool")
    p.add_argument("--episode", type=int, default=100, help="episode length (steps) before the reset")
    p.add_argument("--steps", type=int, default=300, help="lock-steps timed per run")
    p.add_argument("--task", type=int, default=8, help="libero_goal task id")
    p.add_argument("--render", type=int, default=128, help="render size (px)")
    p.add_argument("--reps", type=int, default=1, help="alternating runs per pool")
    args = p.parse_args()
    results = {0: [], args.spares: []}
    for _ in range(args.reps):
        for spares in results:
            results[spares].append(run(args, spares))
    print(f"libero_goal:{args.task}, {args.envs} envs, episodes of {args.episode} steps, {args.steps} lock-steps, "
          f"render {args.render} px, MUJOCO_GL={os.environ.get('MUJOCO_GL')}, {os.cpu_count()} cores, "
          f"median of {args.reps}")
    rate = {}
    for spares, rows in results.items():
        rate[spares] = statistics.median(r["steps_per_s"] for r in rows)
        share = statistics.median(r["reset_share"] for r in rows)
        print(f"spares {spares:2d}: {rate[spares]:7.1f} env steps/s, resets {100 * share:4.1f}% of the time, "
              f"episode starts served by a spare: {rows[-1]['swaps']}")
    print(f"spares {args.spares} / spares 0: {rate[args.spares] / rate[0]:.2f}x env steps/s")


if __name__ == "__main__":
    main()
