"""The quickstart policy's matmul shapes on this CPU: ms and GFLOP/s per shape.

    python bench/cpu_matmul_shapes.py [--threads 2 --reps 30]

The tiny Llava's update step (batch 256, 67 tokens: 17,152 rows, hidden 32, MLP 128) is made of
skinny products like these. Run it twice, once plainly and once with an environment change
(e.g. ``LD_PRELOAD`` of a shim that makes MKL take its Intel code path on an AMD CPU, see
docs/benchmarks.md), to see what a BLAS dispatch choice costs per shape.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

ROWS = 256 * 67  # one quickstart minibatch's tokens
SHAPES = [((ROWS, 32), (32, 32)), ((ROWS, 32), (32, 128)),
          ((ROWS, 128), (128, 32)), ((128, ROWS), (ROWS, 32))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.reps} reps (medians)")
    for a, b in SHAPES:
        x, y = torch.randn(*a), torch.randn(*b)
        for _ in range(5):
            x @ y
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        m = statistics.median(times)
        gflops = 2 * a[0] * a[1] * b[1] / m / 1e9
        print(f"{str(a):14s} @ {str(b):12s} {m * 1e3:6.2f} ms  {gflops:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
