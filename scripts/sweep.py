"""Run methods x seeds on one stream, a bounded number of processes at a time.

    python scripts/sweep.py --config configs/quickstart.yaml \
        --method crl= --method seq_ft=configs/ablations/seq_ft.yaml \
        --seeds 0 1 2 --parallel 1 --out runs/sweep [-- --trainer.accelerator gpu]

Each run writes ``<out>/<method>/seed<s>/`` (metrics.json, R.csv, TensorBoard, checkpoints,
train.log). A run that fails keeps its log and is reported; the others go on.
Then: ``python scripts/results_table.py <out>`` writes the table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="base config(s), in order")
    p.add_argument("--method", action="append", required=True,
                   help="NAME=ABLATION_YAML[,ABLATION_YAML...] (in order; empty after '=' for the "
                        "base config alone), e.g. seq_ft_lora=configs/ablations/seq_ft.yaml,configs/ablations/lora.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / parallel)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--resume", action="store_true",
                   help="runs with a checkpoint and no complete metrics.json go on from the newest one (last.ckpt, "
                        "or a task-end checkpoint written after it, before that task's evaluation), exactly: the "
                        "same results as one uninterrupted run, docs/reliability.md; complete runs are skipped")
    p.add_argument("--time_limit", type=float, default=None,
                   help="seconds; runs still going then are stopped (SIGTERM: each stops at once with its "
                        "last.ckpt, written after every iteration) and can --resume later")
    p.add_argument("extra", nargs="*", help="after '--': more train.py arguments for every run")
    args = p.parse_args(argv)
    methods = []
    for m in args.method:
        if "=" not in m:
            p.error(f"--method {m!r}: expected NAME=ABLATION_YAML")
        name, yamls = m.split("=", 1)
        yamls = [y for y in yamls.split(",") if y]
        for yaml in yamls:
            if not os.path.isfile(yaml):
                p.error(f"--method {m!r}: no such file {yaml!r}")
        methods.append((name, yamls))
    if args.parallel <= 0:
        p.error(f"--parallel {args.parallel}: must be > 0")
    args.out = os.path.abspath(args.out)  # train.py runs from the repo root
    return args, methods


def command(args, name, yamls, seed, ckpt=None):
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    for c in args.config + list(yamls):
        cmd += ["--config", c]
    cmd += ["--seed", str(seed), "--data.seed", str(seed),
            "--trainer.logger.init_args.save_dir", args.out,
            "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", f"seed{seed}",
            *args.extra]
    return cmd + (["--ckpt_path", ckpt] if ckpt else [])


def newest_checkpoint(run_dir: str) -> str | None:
    """The run's latest state on disk: the newest of ``checkpoints/*.ckpt`` (``last.ckpt`` after
    every iteration; ``task{k}_end.ckpt``, written at a task's end before its evaluation, is newer
    when the run stopped during that evaluation). Half-written files (``.*.partial``) never count."""
    found = glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt"))
    return max(found, key=os.path.getmtime) if found else None


def _complete(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            return bool(json.load(f).get("complete"))
    except (OSError, ValueError):
        return False


def run_one(args, threads, name, yamls, seed):
    run_dir = os.path.join(args.out, name, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    wall_file = os.path.join(run_dir, "wall_s.txt")
    newest = newest_checkpoint(run_dir)
    ckpt, earlier = None, 0.0
    if args.resume and _complete(run_dir):
        print(f"{name} seed {seed}: complete, skipped", flush=True)
        return name, seed, 0, 0.0
    if args.deadline is not None and time.time() >= args.deadline:
        return name, seed, "not started (--time_limit)", 0.0
    if args.resume and newest is not None:
        ckpt = newest  # the wall time adds up over the segments
        earlier = float(open(wall_file).read()) if os.path.exists(wall_file) else 0.0
    elif os.path.exists(wall_file):  # from an earlier sweep into the same folder
        os.remove(wall_file)
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)
    start = time.time()
    with open(os.path.join(run_dir, "train.log"), "a" if ckpt else "w") as log:
        proc = subprocess.Popen(command(args, name, yamls, seed, ckpt), stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            rc = proc.wait(None if args.deadline is None else max(0.0, args.deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            rc = "stopped at --time_limit"
    wall = earlier + time.time() - start
    with open(wall_file, "w") as f:
        f.write(f"{wall:.1f}\n")
    print(f"{name} seed {seed}: rc={rc} wall={wall:.0f}s -> {run_dir}", flush=True)
    return name, seed, rc, wall


def main(argv=None) -> int:
    args, methods = parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    jobs = [(name, yamls, s) for s in args.seeds for name, yamls in methods]
    start = time.time()
    args.deadline = None if args.time_limit is None else start + args.time_limit
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: run_one(args, threads, *j), jobs))
    stopped = [(n, s) for n, s, rc, _ in results if isinstance(rc, str)]
    failed = [(n, s) for n, s, rc, _ in results if rc != 0 and not isinstance(rc, str)]
    print(f"sweep: {len(jobs)} runs, {len(failed)} failed, {len(stopped)} stopped or not started "
          f"(--resume goes on), wall {time.time() - start:.0f}s")
    return 1 if failed or stopped else 0


if __name__ == "__main__":
    sys.exit(main())
