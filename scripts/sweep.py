"""Run methods x seeds on one stream, a bounded number of processes at a time.

    python scripts/sweep.py --config configs/quickstart.yaml \
        --method crl= --method seq_ft=configs/ablations/seq_ft.yaml \
        --seeds 0 1 2 --parallel 1 --out runs/sweep [-- --trainer.accelerator gpu]

Each run writes ``<out>/<method>/seed<s>/`` (metrics.json, R.csv, TensorBoard, checkpoints,
train.log). A run that fails keeps its log and is reported; the others go on.

``--branch seq_ft=crl``: methods that act only at and after a task's end (Seq-FT and CRL-VLA,
whose anchor terms need an old task) train the first task alike; each seq_ft run starts from
the crl run of its seed at the end of its first task's training (``task0_trained.ckpt``, saved
with ``TaskSwitch.branch_points: true``, and the outcomes of the evaluation after that task,
which the same policy need not play again): the same run as one from scratch
(tests/test_sweep.py). Its ``wall_s.txt`` counts its own time only.
Then: ``python scripts/results_table.py <out>`` writes the table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
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
    p.add_argument("--branch", action="append", default=[],
                   help="NAME=SOURCE: method NAME's runs start from method SOURCE's run of the same seed at the end "
                        "of its first task's training (SOURCE's config: TaskSwitch.branch_points true)")
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
    names = [n for n, _ in methods]
    args.branches = {}
    for b in args.branch:
        name, _, source = b.partition("=")
        if name not in names or source not in names or name == source:
            p.error(f"--branch {b!r}: expected NAME=SOURCE, two different --method names")
        args.branches[name] = source
    if any(source in args.branches for source in args.branches.values()):
        p.error(f"--branch {args.branch}: a SOURCE cannot be branched itself")
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


def _metrics(run_dir: str) -> dict:
    """The run's metrics.json ({} while there is none or it cannot be read)."""
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _complete(run_dir: str) -> bool:
    return bool(_metrics(run_dir).get("complete"))


def first_task_done(run_dir: str) -> bool:
    """The run's first task is trained (``task0_trained.ckpt``) and evaluated (R's first row)."""
    rows = _metrics(run_dir).get("R") or [None]
    return rows[0] is not None and os.path.isfile(os.path.join(run_dir, "checkpoints", "task0_trained.ckpt"))


def branch(source_dir: str, run_dir: str) -> str:
    """``run_dir`` starts where ``source_dir``'s run stood when its first task's training was
    done: its ``task0_trained.ckpt`` and the recorded episodes of the evaluation after that task
    (callbacks/eval_episodes.py: used where the policy's weights are the same). Returns the
    checkpoint to resume from."""
    ckpt = os.path.join(run_dir, "checkpoints", "task0_trained.ckpt")
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    for episodes in glob.glob(os.path.join(source_dir, "eval_episodes*", "after_task0.rank*.json")):
        target = os.path.join(run_dir, os.path.relpath(episodes, source_dir))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(episodes, target)
    shutil.copyfile(os.path.join(source_dir, "checkpoints", "task0_trained.ckpt"), ckpt + ".partial")
    os.replace(ckpt + ".partial", ckpt)  # last: a half-made branch has no checkpoint and is made again
    return ckpt


def run_one(args, threads, name, yamls, seed):
    run_dir = os.path.join(args.out, name, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    wall_file = os.path.join(run_dir, "wall_s.txt")
    newest = newest_checkpoint(run_dir)
    source, branched = args.branches.get(name), False
    if source is not None and newest is None:
        source_dir = os.path.join(args.out, source, f"seed{seed}")
        while not first_task_done(source_dir):  # its source runs beside it, or ran before
            if (source, seed) in args.finished or (args.deadline is not None and time.time() >= args.deadline):
                return name, seed, f"not started (waiting for {source} seed {seed}'s first task)", 0.0
            time.sleep(5)
        newest = branch(source_dir, run_dir)
        if os.path.exists(wall_file):
            os.remove(wall_file)
        branched = True
    ckpt, earlier = None, 0.0
    if args.resume and _complete(run_dir):
        print(f"{name} seed {seed}: complete, skipped", flush=True)
        return name, seed, 0, 0.0
    if args.deadline is not None and time.time() >= args.deadline:
        return name, seed, "not started (--time_limit)", 0.0
    if branched:
        ckpt = newest
    elif args.resume and newest is not None:
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
    # seed by seed, a branched method after its source (a job waiting for its source holds a slot)
    ordered = sorted(methods, key=lambda m: m[0] in args.branches)
    jobs = [(name, yamls, s) for s in args.seeds for name, yamls in ordered]
    start = time.time()
    args.deadline = None if args.time_limit is None else start + args.time_limit
    args.finished = set()

    def job(j):
        try:
            return run_one(args, threads, *j)
        finally:
            args.finished.add((j[0], j[2]))

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(job, jobs))
    stopped = [(n, s) for n, s, rc, _ in results if isinstance(rc, str)]
    failed = [(n, s) for n, s, rc, _ in results if rc != 0 and not isinstance(rc, str)]
    print(f"sweep: {len(jobs)} runs, {len(failed)} failed, {len(stopped)} stopped or not started "
          f"(--resume goes on), wall {time.time() - start:.0f}s")
    return 1 if failed or stopped else 0


if __name__ == "__main__":
    sys.exit(main())
