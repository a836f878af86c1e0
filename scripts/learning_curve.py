"""Where each run's rollout success crosses thresholds: the learning curve of a probe.

    python scripts/learning_curve.py RUN_DIR [RUN_DIR ...] [--window 3] [--thresholds 0.8 0.85 0.9]
        [--mean train/entropy 55 62]

RUN_DIR: a run's folder (TensorBoard events, searched recursively, or ``scalars.csv``). Reads
``rollout/success`` (the mean success of the episodes that ended in each iteration's rollout),
one value per iteration in logging order; w = its mean over the last ``window`` iterations.
Prints per run the take-off (the first iteration with rollout success >= ``--takeoff``), the
first iteration (1-based) where w >= each threshold ("-" if never), the iterations logged and
w at the end.
``--mean TAG A B``: one more column, the mean of another per-iteration scalar (e.g.
``train/entropy``) over iterations A..B (1-based, inclusive; "-" if the run has none there).
``--span A B``: only iterations A..B (1-based, inclusive; e.g. one task of a stream: 31 60),
numbered from 1 again; the other options read the whole run.
``--seconds A B`` (repeatable): the median wall-clock seconds from one iteration's log to the
next over iterations A..B (e.g. per task of a quickstart: 1 50, 51 100, 101 150).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_scalars import per_iteration  # noqa: E402


def first_crossings(curve: list[float], window: int, thresholds: list[float]) -> tuple[list[int | None], float]:
    """1-based iteration where the trailing mean over ``window`` first reaches each threshold."""
    windows = [curve[max(0, i + 1 - window): i + 1] for i in range(len(curve))]
    means = [sum(w) / len(w) for w in windows]
    # 1e-9: a mean of ratios that equals the threshold (e.g. (0.6 + 0.9 + 0.9) / 3) must count
    hits = [next((i + 1 for i, m in enumerate(means) if m >= t - 1e-9), None) for t in thresholds]
    return hits, (means[-1] if means else float("nan"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.85, 0.9])
    p.add_argument("--takeoff", type=float, default=0.5)
    p.add_argument("--mean", nargs=3, metavar=("TAG", "A", "B"), default=None)
    p.add_argument("--seconds", nargs=2, type=int, metavar=("A", "B"), action="append", default=[])
    p.add_argument("--span", nargs=2, type=int, metavar=("A", "B"), default=None)
    args = p.parse_args(argv)
    head = " | ".join(f"w{args.window}>={t:g}" for t in args.thresholds)
    extra = f" {args.mean[0]} mean {args.mean[1]}-{args.mean[2]} |" if args.mean else ""
    extra += "".join(f" s/iteration {a}-{b} |" for a, b in args.seconds)
    print(f"| run | take-off | {head} | iterations | w{args.window} at end |{extra}")
    print("|" + " --- |" * (len(args.thresholds) + 4 + bool(args.mean) + len(args.seconds)))
    for run in args.runs:
        curve = per_iteration(run)
        if args.span:
            curve = curve[args.span[0] - 1:args.span[1]]
        hits, last = first_crossings(curve, args.window, args.thresholds)
        (takeoff,), _ = first_crossings(curve, 1, [args.takeoff])
        cells = " | ".join("-" if h is None else str(h) for h in [takeoff, *hits])
        if args.mean:
            values = per_iteration(run, args.mean[0])[int(args.mean[1]) - 1:int(args.mean[2])]
            cells += f" | {len(curve)} | {last:.2f} | " + (f"{sum(values) / len(values):.2f}" if values else "-")
        else:
            cells += f" | {len(curve)} | {last:.2f}"
        if args.seconds:
            wall = per_iteration(run, wall=True)
            for a, b in args.seconds:
                gaps = [t1 - t0 for t0, t1 in zip(wall[a - 1:b - 1], wall[a:b])]
                cells += f" | {statistics.median(gaps):.2f}" if gaps else " | -"
        print(f"| {run} | {cells} |")


if __name__ == "__main__":
    main()
