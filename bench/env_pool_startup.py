"""Start-up of a LIBERO env pool: workers started by ``spawn`` vs ``forkserver`` (LIBERO option
``start_method``), same script, alternating. A training run builds such a pool per task and per
evaluation; each spawned worker imports torch and torchrl again, forkserver workers fork from
one process that imported them once.

Times pool construction + first reset (every worker built and settled) and close, per rep.
The forkserver process starts with the first forkserver pool (its imports count in that rep,
shown as ``first``); the medians are over the later reps.

Usage: python bench/env_pool_startup.py [--num_envs 2 --reps 4 --suite libero_goal --task 8]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datamodules.libero import make_libero_env


def startup_s(method: str, args) -> float:
    t = time.perf_counter()
    env = make_libero_env(args.suite, args.task, args.num_envs, seed=0, max_steps=8,
                          options={"start_method": method, "render_size": args.render, "image_size": 64})
    env.reset()
    env.close()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_envs", type=int, default=2)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--suite", default="libero_goal")
    p.add_argument("--task", type=int, default=8)
    p.add_argument("--render", type=int, default=128)
    args = p.parse_args()
    times = {"spawn": [], "forkserver": []}
    for rep in range(args.reps):
        for method in (("forkserver", "spawn") if rep % 2 else ("spawn", "forkserver")):
            times[method].append(startup_s(method, args))
            print(f"rep {rep} {method:10s} {times[method][-1]:6.1f} s", flush=True)
    print(f"{args.num_envs} workers, {args.suite} task {args.task}, {args.render} px, {os.cpu_count()} cores")
    for method, ts in times.items():
        print(f"{method:10s} first {ts[0]:6.1f} s   median of the other {len(ts) - 1}: {statistics.median(ts[1:]):6.1f} s")
    print(f"forkserver / spawn (medians without the first rep): "
          f"{statistics.median(times['forkserver'][1:]) / statistics.median(times['spawn'][1:]):.2f}")


if __name__ == "__main__":
    main()
