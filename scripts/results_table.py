"""Collect ``<sweep>/<method>/seed*/metrics.json`` into a markdown table (mean +- std over seeds).

    python scripts/results_table.py runs/sweep [more sweeps ...] [LABEL=runs/other] [--out table.md] [--tasks K]
        [--metrics_file metrics_greedy.json] [--ci] [--compare crl=lwf ...] [--paired]

A sweep given as ``LABEL=path`` (another stream, say) has its methods listed as
``method [LABEL]`` in the same table; streams of different lengths share the table (R[i,i]
columns up to the longest; "-" where a stream has fewer tasks).

Runs evaluated every N iterations (``PerTaskEvaluation.every_n_iterations``) also get a
learning-curve table: the success averaged over the stream's tasks at each evaluated iteration.
Runs whose metrics.json is missing or incomplete are listed, not averaged. ``--tasks K``
scores the first K tasks only (the K x K corner of R, metrics recomputed on it), so runs cut
short after task K-1 still count. ``--metrics_file`` reads another evaluation of the same runs,
e.g. ``metrics_greedy.json`` (``PerTaskEvaluation(tag=greedy)``); the wall time is the run's.
``--ci`` adds a table of FAR / BWT / FT / F / FWT (LIBERO's forward transfer: with evaluations at
task ends only, the mean of R's diagonal, how well each new task is learned) as the mean over seeds with its 95% bootstrap
interval (percentile, 10,000 resamples of the seeds); ``--compare A=B`` the difference of means
A - B with its 95% bootstrap interval (each method's seeds resampled on their own), e.g.
``crl=lwf``: does the anchor-critic term change forgetting beyond the KL term? ``--paired``
compares by seed instead: the mean of the per-seed differences over the seeds both methods ran,
with the seeds resampled together (runs of one seed share the starting model, the env seeds and,
for methods that differ only at task boundaries, the whole first task).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from callbacks.metrics import continual_metrics  # noqa: E402

METRICS = ("FAR", "BWT", "F", "FT", "FWT", "NBT", "AUC")


def first_tasks(res: dict, K: int) -> dict | None:
    """The run restricted to its first K tasks, or None if R's first K rows are not all there."""
    rows = res["R"][:K]
    if len(rows) < K or any(r is None for r in rows):
        return None
    R = [r[:K] for r in rows]
    b = res["b"][:K] if res["b"] is not None else None  # null: the starting model was not scored
    return dict(res, R=R, b=b, complete=True, metrics=continual_metrics(R, b))


def load(sweeps: list[str], tasks: int | None = None, metrics_file: str = "metrics.json"):
    runs, broken = {}, []
    paths = []
    for sweep in sweeps:
        label, _, folder = sweep.rpartition("=")
        paths += [(label, p) for p in sorted(glob.glob(os.path.join(folder, "*", "seed*")))]
    for label, path in paths:
        method, seed = path.split(os.sep)[-2:]
        method = f"{method} [{label}]" if label else method
        mfile = os.path.join(path, metrics_file)
        res = json.load(open(mfile)) if os.path.isfile(mfile) else None
        if res is not None and tasks:
            res = first_tasks(res, tasks)
        if res is None or not res.get("complete"):
            broken.append(f"{method}/{seed}")
            continue
        wall = os.path.join(path, "wall_s.txt")
        res["wall_s"] = float(open(wall).read()) if os.path.isfile(wall) else float("nan")
        res["seed"] = seed
        runs.setdefault(method, []).append(res)
    return runs, broken


def fmt(values) -> str:
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]  # e.g. a run without wall_s.txt
    if not len(v):
        return "n/a"
    if len(v) == 1:  # one seed: no spread to show
        return f"{v[0]:.2f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


CI_METRICS = ("FAR", "BWT", "FT", "F", "FWT")


def bootstrap_ci(values, other=None, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` (minus the mean of ``other``) and its 95% percentile bootstrap interval."""
    rng = np.random.default_rng(seed)
    v = np.asarray(values, float)
    stat = v[rng.integers(len(v), size=(resamples, len(v)))].mean(1)
    mean = v.mean()
    if other is not None:
        o = np.asarray(other, float)
        stat = stat - o[rng.integers(len(o), size=(resamples, len(o)))].mean(1)
        mean -= o.mean()
    lo, hi = np.percentile(stat, [2.5, 97.5])
    return float(mean), float(lo), float(hi)


def paired_ci(a: list[dict], b: list[dict], metric: str) -> tuple[float, float, float, int]:
    """The mean per-seed difference of ``metric`` between two methods' runs over their common seeds,
    its 95% bootstrap interval (the seeds resampled together) and the number of seeds."""
    mine, theirs = ({r["seed"]: r["metrics"][metric] for r in rs} for rs in (a, b))
    seeds = sorted(set(mine) & set(theirs))
    return (*bootstrap_ci([mine[s] - theirs[s] for s in seeds]), len(seeds))


def ci_table(runs: dict, compare: list[tuple[str, str]], paired: bool = False) -> list[str]:
    """Means with 95% bootstrap intervals, and the differences asked for with ``--compare``
    (``paired``: per seed, over the seeds both methods ran)."""
    lines = ["Mean over seeds [95% bootstrap interval]:", "",
             "| method | seeds | " + " | ".join(CI_METRICS) + " |", "|" + "---|" * (len(CI_METRICS) + 2)]
    for method, rs in runs.items():
        cells = ["{:.2f} [{:.2f}, {:.2f}]".format(*bootstrap_ci([r["metrics"][m] for r in rs])) for m in CI_METRICS]
        lines.append(f"| {method} | {len(rs)} | " + " | ".join(cells) + " |")
    lines.append("")
    if compare and paired:
        lines += ["Differences A - B paired by seed (the seeds both ran) [95% bootstrap interval]:", "",
                  "| A - B | seeds | " + " | ".join(CI_METRICS) + " |", "|" + "---|" * (len(CI_METRICS) + 2)]
        for a, b in compare:
            stats = [paired_ci(runs[a], runs[b], m) for m in CI_METRICS]
            cells = ["{:+.2f} [{:+.2f}, {:+.2f}]".format(*st[:3]) for st in stats]
            lines.append(f"| {a} - {b} | {stats[0][3]} | " + " | ".join(cells) + " |")
        lines.append("")
    elif compare:
        lines += ["Differences of means A - B [95% bootstrap interval]:", "",
                  "| A - B | " + " | ".join(CI_METRICS) + " |", "|" + "---|" * (len(CI_METRICS) + 1)]
        for a, b in compare:
            cells = ["{:+.2f} [{:+.2f}, {:+.2f}]".format(*bootstrap_ci([r["metrics"][m] for r in runs[a]],
                                                                       [r["metrics"][m] for r in runs[b]]))
                     for m in CI_METRICS]
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def table(runs: dict, ci: bool = False, compare: list[tuple[str, str]] = (), paired: bool = False) -> str:
    K = max(len(r["R"]) for rs in runs.values() for r in rs)
    timed = any(not np.isnan(r["wall_s"]) for rs in runs.values() for r in rs)  # else no wall column
    head = (["method", "seeds", "before (mean b)"] + [f"R[{i},{i}]" for i in range(K)]
            + list(METRICS) + ["wall (min)"] * timed)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rs in runs.items():
        R = np.array([r["R"] for r in rs], float)
        row = [method, str(len(rs)), fmt([np.mean(r["b"]) for r in rs]) if all(r["b"] is not None for r in rs) else "-"]
        row += [fmt(R[:, i, i]) if i < R.shape[1] else "-" for i in range(K)]
        row += [fmt([r["metrics"][m] for r in rs]) for m in METRICS]
        row += [fmt([r["wall_s"] / 60 for r in rs])] * timed
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if ci or compare:
        lines += ci_table(runs, list(compare), paired)
    lines += seed_table(runs)
    lines += curve_table(runs)
    for method, rs in runs.items():
        R = np.mean([r["R"] for r in rs], 0)
        lines.append(f"Mean R for {method} (row j: after task j; column i: task i):")
        lines.append("")
        lines.append("| after | " + " | ".join(f"task {i}" for i in range(len(R))) + " |")
        lines.append("|" + "---|" * (len(R) + 1))
        lines += [f"| {j} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for j, row in enumerate(R)]
        lines.append("")
    return "\n".join(lines)


def seed_table(runs: dict) -> list[str]:
    """Each run's final row of R and its FAR / BWT / F, one column per seed."""
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs}, key=lambda s: (len(s), s))
    lines = ["Per seed (final row of R; FAR / BWT / F):", "",
             "| method | " + " | ".join(seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    for method, rs in runs.items():
        by_seed = {r["seed"]: r for r in rs}
        cells = []
        for seed in seeds:
            r = by_seed.get(seed)
            if r is None:
                cells.append("")
                continue
            m = r["metrics"]
            bwt, f = (("n/a" if m[k] is None else format(m[k], spec)) for k, spec in (("BWT", "+.2f"), ("F", ".2f")))
            cells.append(" ".join(f"{v:.2f}" for v in r["R"][-1]) + f" ({m['FAR']:.2f} / {bwt} / {f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def curve_table(runs: dict) -> list[str]:
    """Mean success over tasks at each evaluated iteration (mean ± std over seeds); empty when
    no run was evaluated between task ends."""
    if not any(not c.get("task_end", True) for rs in runs.values() for r in rs for c in r.get("curves", [])):
        return []
    its = sorted({c["iteration"] for rs in runs.values() for r in rs for c in r["curves"]})
    lines = ["Success over training iterations (mean over tasks; mean ± std over seeds):", "",
             "| method | " + " | ".join(f"it {i}" for i in its) + " |", "|" + "---|" * (len(its) + 1)]
    for method, rs in runs.items():
        cells = []
        for it in its:
            vals = [np.mean(c["success"]) for r in rs for c in r["curves"] if c["iteration"] == it]
            cells.append(fmt(vals) if vals else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sweep", nargs="+", help="sweep folder(s): <sweep>/<method>/seed*/metrics.json")
    p.add_argument("--out", default=None)
    p.add_argument("--tasks", type=int, default=None, help="score only the first K tasks")
    p.add_argument("--metrics_file", default="metrics.json",
                   help="which evaluation of each run, e.g. metrics_greedy.json")
    p.add_argument("--ci", action="store_true", help="means with 95%% bootstrap intervals")
    p.add_argument("--compare", action="append", default=[], metavar="A=B",
                   help="the difference of means A - B with its 95%% bootstrap interval (repeatable)")
    p.add_argument("--paired", action="store_true",
                   help="--compare by seed: the mean per-seed difference over the seeds both methods ran")
    args = p.parse_args(argv)
    if args.tasks is not None and args.tasks <= 0:
        print(f"error: --tasks={args.tasks}: must be > 0", file=sys.stderr)
        return 2
    runs, broken = load(args.sweep, args.tasks, args.metrics_file)
    if not runs:
        print(f"error: sweep={' '.join(args.sweep)!r}: no complete {args.metrics_file} under <method>/seed*/",
              file=sys.stderr)
        return 2
    pairs = [tuple(c.split("=", 1)) for c in args.compare]
    for c, pair in zip(args.compare, pairs):
        if len(pair) != 2 or not all(m in runs for m in pair):
            print(f"error: --compare={c!r}: expected A=B, two of the methods {sorted(runs)}", file=sys.stderr)
            return 2
    if args.paired:
        for a, b in pairs:
            if not {r["seed"] for r in runs[a]} & {r["seed"] for r in runs[b]}:
                print(f"error: --paired --compare={a}={b}: the two methods share no seed", file=sys.stderr)
                return 2
    text = table(runs, args.ci, pairs, args.paired)
    if broken:
        text += "\nIncomplete or failed runs (not averaged): " + ", ".join(broken) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
