"""PNG plots of a sweep: mean R heatmap per method, and training success over iterations.

    python scripts/plots.py docs/data/quickstart [more sweeps ...] --out docs/figures/quickstart

Reads ``<sweep>/<method>/seed*/metrics.json`` (R, b, task ends) and the per-iteration
``rollout/success`` of the same folder (the success of the task being trained; TensorBoard events
or ``scalars.csv``, see ``scripts/run_scalars.py``).
Writes ``R_heatmaps.png`` and ``success_curves.png`` (mean over seeds, min-max band; dotted
lines at task boundaries; markers: evaluation (greedy, or sampled where metrics.json says greedy: false) of every task before training and at each task end).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_scalars import has_scalars, per_iteration  # noqa: E402


def rollout_success(run_dir: str) -> np.ndarray:
    return np.array(per_iteration(run_dir) if has_scalars(run_dir) else [], float)


def load(sweeps: list[str]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for sweep in sweeps:
        for run_dir in sorted(glob.glob(os.path.join(sweep, "*", "seed*"))):
            mfile = os.path.join(run_dir, "metrics.json")
            if not os.path.isfile(mfile):
                continue
            m = json.load(open(mfile))
            if not m.get("complete"):
                continue
            m["train_success"] = rollout_success(run_dir)
            runs.setdefault(os.path.basename(os.path.dirname(run_dir)), []).append(m)
    return runs


def plot(runs: dict[str, list[dict]], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    methods = list(runs)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.0), squeeze=False)
    for ax, name in zip(axes[0], methods):
        R = np.mean([r["R"] for r in runs[name]], 0)
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for j in range(R.shape[0]):
            for i in range(R.shape[1]):
                ax.text(i, j, f"{R[j, i]:.2f}", ha="center", va="center",
                        color="w" if R[j, i] < 0.6 else "k", fontsize=8)
        ax.set_title(f"{name} (n={len(runs[name])})")
        ax.set_xticks(range(R.shape[1]))
        ax.set_yticks(range(R.shape[0]))
        ax.set_xlabel("evaluated task i")
        ax.set_ylabel("after training task j")
    fig.tight_layout()
    paths = [os.path.join(out, "R_heatmaps.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(methods), 1, figsize=(7, 2.2 * len(methods)), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[:, 0], methods):
        rs = runs[name]
        with_curve = [r["train_success"] for r in rs if len(r["train_success"])]
        n = min(map(len, with_curve)) if with_curve else 0
        if n:
            curves = np.stack([c[:n] for c in with_curve])
            x = np.arange(1, n + 1)
            ax.plot(x, curves.mean(0), color="k", lw=1, label="rollout success (task in training)")
            ax.fill_between(x, curves.min(0), curves.max(0), color="k", alpha=0.15, lw=0)
        ends = [c["iteration"] for c in rs[0].get("curves", []) if c.get("task_end")]
        for e in ends:
            ax.axvline(e, color="grey", ls=":", lw=1)
        # evaluation of every task (greedy or sampled, as metrics.json says): before training (x = 0), then at every evaluation
        # the run made (task ends, and every N iterations with PerTaskEvaluation.every_n_iterations)
        grid = [0] + [c["iteration"] for c in rs[0].get("curves", [])]
        same = [r for r in rs if [0] + [c["iteration"] for c in r.get("curves", [])] == grid]
        K = len(rs[0]["R"])  # b null (starting model not scored): no point at x = 0
        evals = np.mean([[r["b"] or [np.nan] * K] + [c["success"] for c in r["curves"]] for r in same], 0)
        for i in range(evals.shape[1]):
            ax.plot(grid, evals[:, i], "o-", ms=3, lw=0.8, color=colors[i % len(colors)],
                    label=f"{'greedy' if rs[0].get('greedy', True) else 'sampled'} eval, task {i}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(name)
    axes[0, 0].legend(fontsize=7, loc="upper left", ncol=2)
    axes[-1, 0].set_xlabel("PPO iteration")
    fig.tight_layout()
    paths.append(os.path.join(out, "success_curves.png"))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="+")
    p.add_argument("--out", default="docs/figures")
    args = p.parse_args(argv)
    runs = load(args.sweep)
    if not runs:
        print(f"error: sweep={' '.join(args.sweep)!r}: no complete metrics.json under <method>/seed*/",
              file=sys.stderr)
        return 2
    for path in plot(runs, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
