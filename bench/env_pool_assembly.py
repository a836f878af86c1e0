"""Main-process cost of assembling one batched step from N workers' answers (no workers, no
pipes): the old way (a TensorDict per worker, then ``torch.stack``) vs ``RobustEnvPool``'s
``_batch`` (one ``np.stack`` per key). Rows have a LIBERO observation's shape after OpenVLA's
pipeline (uint8 3x224x224 image, 8-D state, instruction string, flags). Median of 30.

Usage: python bench/env_pool_assembly.py [--rows 16]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from tensordict import TensorDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datamodules.robust_env import _batch  # noqa: E402


def row(rng) -> dict:
    flag = np.zeros(1, bool)
    return {("observation", "image"): rng.integers(0, 255, (3, 224, 224), dtype=np.uint8),
            ("observation", "state"): np.zeros(8, np.float32), ("observation", "init_state_id"): np.zeros(1, np.int64),
            ("language_instruction",): "put the bowl on the plate", ("success",): flag.copy(),
            ("reward",): np.zeros(1, np.float32), ("done",): flag.copy(), ("terminated",): flag.copy(),
            ("truncated",): flag.copy(), ("env_failed",): flag.copy()}


def nested(flat: dict) -> dict:
    out = {}
    for key, value in flat.items():
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = [row(rng) for _ in range(args.rows)]
    paths = {"TensorDict per worker + torch.stack (before)": lambda: torch.stack(
                 [TensorDict(nested(r), batch_size=[]) for r in rows]),
             "_batch: one np.stack per key (now)": lambda: _batch(rows)}
    a, b = (f() for f in paths.values())
    assert all(torch.equal(a.get(k), b.get(k)) for k in b.keys(True, True) if k != "language_instruction")
    for name, f in paths.items():
        ts = []
        for _ in range(30):
            t = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t) * 1e3)
        print(f"{name:46s} {statistics.median(ts):6.2f} ms for {args.rows} rows (median of 30)")


if __name__ == "__main__":
    main()
