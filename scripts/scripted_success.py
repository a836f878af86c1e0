"""Success of the scripted LIBERO-Goal experts over LIBERO's fixed initial states.

    python scripts/scripted_success.py --tasks 8 1 4 [--episodes 50] [--processes 16] [--out FILE.json]

Episode e starts from the task's stored initial state e, settles 10 no-op steps and runs at
most 300 expert steps (the LIBERO-Goal evaluation protocol of the kit and OpenVLA); success is
LIBERO's own BDDL predicate. No camera is rendered. Prints one line per task and, with
``--out``, writes the table as JSON (with the command, machine and date).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="libero_goal", choices=["libero_goal"])
    p.add_argument("--tasks", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--episodes", type=int, default=50, help="initial states 0..N-1 per task")
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--out", default=None, help="write the table here (JSON)")
    args = p.parse_args(argv)
    from modules.experts.collect import Job, run_jobs, success_table
    from modules.experts.libero_goal import PLANS

    missing = [t for t in args.tasks if t not in PLANS]
    if missing:
        print(f"error: --tasks={missing[0]}: no scripted expert (have: {sorted(PLANS)})", file=sys.stderr)
        return 2
    if not 1 <= args.episodes <= 50:
        print(f"error: --episodes={args.episodes}: LIBERO has 50 initial states per task", file=sys.stderr)
        return 2
    from datamodules.libero_setup import task_language

    start = time.time()
    jobs = [Job(args.suite, t, e, max_steps=args.max_steps) for t in args.tasks for e in range(args.episodes)]
    results = []
    for job, ep in run_jobs(jobs, args.processes):
        results.append((job, ep))
        if not ep.success:
            print(f"  task {job.task_id} init state {job.index}: failed in phase '{ep.phase}'", flush=True)
    table = success_table(results)
    for t in args.tasks:
        row = table[t]
        print(f"task {t} ({task_language(args.suite, t)}): {row['successes']}/{row['episodes']} = {row['success']:.2f}, "
              f"{row['mean_steps_success']:.0f} steps on average when successful" if row["successes"] else
              f"task {t}: 0/{row['episodes']}", flush=True)
    elapsed = time.time() - start
    print(f"{len(jobs)} episodes in {elapsed:.0f} s with {args.processes} process(es)")
    if args.out:
        out = {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
               "machine": f"{platform.node()} ({os.cpu_count()} cores)",
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "seconds": round(elapsed, 1), "suite": args.suite,
               "tasks": {str(t): {"instruction": task_language(args.suite, t), **table[t]} for t in args.tasks}}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
