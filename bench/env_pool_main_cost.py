"""Main-process CPU time per batched step of ``RobustEnvPool`` (what a lock-step batch waits
for besides its slowest worker), against the least a raw lock-step loop does, same script.

16 workers of torchrl's ``ToyVLAEnv`` (7-D action, uint8 3x224x224 image, one instruction for
all: the shape of a single-task LIBERO pool after OpenVLA's pipeline). Per batched step, CPU
time of the main process only (``time.process_time``: waiting for workers is not counted), for

* the pool with each step's instructions stacked per row (``NonTensorStack``, the baseline);
* the pool as the kit runs it: one ``NonTensorData`` when every worker has the same instruction;
* raw lock-step pipes: the main process sends each worker one byte and ``np.stack``s the
  pickled 3x224x224 image each sends back (bench/libero_env_throughput.py's baseline).

The pool's paths include ``EnvBase.step`` and ``step_mdp``, as in a rollout. The three
alternate within each rep; median over reps.

Usage: python bench/env_pool_main_cost.py [--workers 16 --steps 100 --reps 5]
"""
import argparse
import functools
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import time

import numpy as np
import torch
from tensordict import NonTensorData, TensorDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torchrl.envs.custom import ToyVLAEnv  # noqa: E402
from torchrl.envs.utils import step_mdp  # noqa: E402

from datamodules import robust_env  # noqa: E402
from datamodules.robust_env import RobustEnvPool  # noqa: E402
from datamodules.tasks import instructions_of  # noqa: E402

KIT = robust_env._batch


def batch_per_row_stack(rows: list[dict]):
    """``_batch`` with non-tensor leaves always stacked per row (the baseline)."""
    td = TensorDict(batch_size=[len(rows)])
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], (np.ndarray, np.generic)):
            td.set(key, torch.from_numpy(np.stack(values)))
        else:
            td.set(key, torch.stack([NonTensorData(v, batch_size=[]) for v in values]))
    return td


def make_env(seed: int):
    return ToyVLAEnv(action_dim=7, state_dim=8, from_pixels=True, render_size=224, batch_size=[], seed=seed,
                     instruction="put the bowl on the plate")


def raw_worker(conn):
    image = np.random.default_rng(0).integers(0, 255, (3, 224, 224), dtype=np.uint8)
    while conn.recv_bytes() != b"q":
        conn.send_bytes(pickle.dumps(image, protocol=pickle.HIGHEST_PROTOCOL))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    n, steps = args.workers, args.steps
    pool = RobustEnvPool([functools.partial(make_env, i) for i in range(n)], start_method="forkserver")
    ctx = mp.get_context("spawn")
    pipes = []
    for _ in range(n):
        a, b = ctx.Pipe()
        ctx.Process(target=raw_worker, args=(b,), daemon=True).start()
        pipes.append(a)
    action = torch.zeros(n, 7)

    def pool_path(batch):
        def run():
            robust_env._batch = batch
            try:
                td = pool.reset()
                t = time.process_time()
                for _ in range(steps):
                    td = step_mdp(pool.step(td.set("action", action.clone())))
                cpu = time.process_time() - t
            finally:
                robust_env._batch = KIT
            assert instructions_of(td) == ["put the bowl on the plate"] * n
            return cpu / steps * 1e3
        return run

    def raw_path():
        t = time.process_time()
        for _ in range(steps):
            for c in pipes:
                c.send_bytes(b"s")
            np.stack([pickle.loads(c.recv_bytes()) for c in pipes])
        return (time.process_time() - t) / steps * 1e3

    paths = {"pool, instructions stacked per row (baseline)": pool_path(batch_per_row_stack),
             "pool, one NonTensorData for a common instruction (the kit's)": pool_path(KIT),
             "raw lock-step pipes (np.stack of the images)": raw_path}
    for f in paths.values():
        f()  # warm-up
    res = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, f in paths.items():
            res[name].append(f())
    print(f"{n} ToyVLAEnv workers, {steps} steps x {args.reps} reps, {os.cpu_count()} cores; "
          f"main-process CPU ms per batched step, median (all)")
    for name, v in res.items():
        print(f"{name:56s} {statistics.median(v):6.2f}  (" + ", ".join(f"{x:.2f}" for x in v) + ")")
    for c in pipes:
        c.send_bytes(b"q")
    pool.close()


if __name__ == "__main__":
    main()
