"""Per-iteration training scalars of a run, and a small copy of finished runs for docs/data.

    python scripts/run_scalars.py SRC DST [--tags rollout/success ...]

A run folder holds TensorBoard events; ``per_iteration`` reads one scalar per PPO iteration from
them, or from the run's ``scalars.csv`` when the events are gone. The command copies every run
under SRC (a folder holding ``metrics.json``) to the same relative path under DST with only its
small files (``--files``; default ``metrics*.json``, ``wall_s.txt``, ``rprm.log``), ``scalars.csv`` (the per-iteration
scalars of ``--tags`` and their wall-clock seconds since the first log, written from the events)
and, once per method folder, the first seed's ``config.yaml``. That is the form of docs/data: the
numbers behind the published tables and figures, without event files (``scripts/plots.py``,
``scripts/learning_curve.py`` and ``scripts/results_table.py`` read both forms).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import shutil
import sys

SCALARS_FILE = "scalars.csv"
WALL = "wall_time"
DEFAULT_TAGS = ("rollout/success", "rollout/explained_variance", "train/entropy")
SMALL_FILES = ("metrics.json", "metrics_greedy.json", "wall_s.txt", "rprm.log")


def _from_events(run_dir: str, tag: str, wall: bool) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)
    # events.out.tfevents.<unix time>...: a resumed run's later file wins per step
    files.sort(key=lambda p: (int(os.path.basename(p).split(".")[3]), p))
    values: dict[int, float] = {}
    for f in files:
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.wall_time if wall else e.value for e in acc.Scalars(tag)})
    return values


def _from_csv(path: str, tag: str, wall: bool) -> dict[int, float]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    column = WALL if wall else tag
    return {int(r["step"]): float(r[column]) for r in rows if r.get(column) not in (None, "")}


def has_scalars(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, SCALARS_FILE)) or bool(
        glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True))


def per_iteration(run_dir: str, tag: str = "rollout/success", wall: bool = False) -> list[float]:
    """A scalar logged once per iteration, in step order (``wall``: the seconds it was logged at)."""
    csv_path = os.path.join(run_dir, SCALARS_FILE)
    if glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True):
        values = _from_events(run_dir, tag, wall)
    elif os.path.isfile(csv_path):
        values = _from_csv(csv_path, tag, wall)
    else:
        raise SystemExit(f"run_dir={run_dir!r}: no TensorBoard events or {SCALARS_FILE} under it")
    return [values[k] for k in sorted(values)]


def write_scalars(run_dir: str, out_csv: str, tags=DEFAULT_TAGS) -> int:
    """``scalars.csv`` of a run from its events: step, wall_time (s since the first log), tags."""
    columns = {t: _from_events(run_dir, t, False) for t in tags}
    wall = _from_events(run_dir, tags[0], True)
    steps = sorted(set().union(*columns.values()))
    if not steps:
        return 0
    t0 = min(wall.values()) if wall else 0.0
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", WALL, *tags])
        for s in steps:
            w.writerow([s, f"{wall[s] - t0:.1f}" if s in wall else "",
                        *(f"{columns[t][s]:.4g}" if s in columns[t] else "" for t in tags)])
    return len(steps)


def export(src: str, dst: str, tags=DEFAULT_TAGS, files=SMALL_FILES, config: bool = True) -> list[str]:
    """Copy every run under ``src`` to ``dst`` with only its small files; returns the runs."""
    runs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(src, "**", "metrics.json"), recursive=True))
    configs_done = set()
    for run in runs:
        rel = os.path.relpath(run, src)
        out = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(out, exist_ok=True)
        for name in files:
            if os.path.isfile(os.path.join(run, name)):
                shutil.copyfile(os.path.join(run, name), os.path.join(out, name))
        if glob.glob(os.path.join(run, "**", "events.out.tfevents.*"), recursive=True):
            write_scalars(run, os.path.join(out, SCALARS_FILE), tags)
        method = os.path.dirname(out) if os.path.basename(out).startswith("seed") else out
        if config and method not in configs_done and os.path.isfile(os.path.join(run, "config.yaml")):
            shutil.copyfile(os.path.join(run, "config.yaml"), os.path.join(method, "config.yaml"))
            configs_done.add(method)
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS), help="the scalars written to scalars.csv")
    p.add_argument("--files", nargs="+", default=list(SMALL_FILES), help="the run files copied as they are")
    p.add_argument("--no_config", action="store_true", help="copy no config.yaml")
    args = p.parse_args(argv)
    runs = export(args.src, args.dst, tuple(args.tags), tuple(args.files), not args.no_config)
    if not runs:
        print(f"error: src={args.src!r}: no run folder (one holding metrics.json) under it", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
