"""Write scripted-expert demonstrations in LIBERO's own HDF5 layout.

    python scripts/write_libero_demos.py --tasks 8 1 4 --demos 50 --out data/libero_goal_scripted \
        [--size 128] [--no_noops] [--init random] [--processes 16]

One ``<task name>_demo.hdf5`` per task (LIBERO's file names and keys: datamodules/libero_hdf5.py),
``dataset_statistics.json`` (OpenVLA's action statistics, key ``<suite>_scripted[_no_noops]``;
``--statistics_only KEY`` writes only it, for demo files already there)
and ``collection.json`` (attempts, successes and lengths per task, the command, machine and
date). Only successful episodes are written (as OpenVLA's regenerated LIBERO data); failed
attempts are retried with new layouts, up to ``--max_attempts`` x N per task.

``--init random`` (default): each demo starts from a fresh layout drawn by LIBERO's own
placement sampler (seeded: the same command writes the same files), so LIBERO's 50 fixed
evaluation states stay held out; ``fixed``: demo i starts from evaluation state i mod 50.
``--action_noise`` perturbs the executed pose actions (the closed-loop expert corrects them;
the recorded actions are the executed ones). Both cameras (agentview, robot0_eye_in_hand) are
rendered at ``--size`` px (LIBERO: 128;
OpenVLA regenerated at 256). With ``--processes`` > 1 the episodes run in parallel worker
processes (on a GPU machine with MUJOCO_GL=egl each renders on a GPU).
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


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="libero_goal", choices=["libero_goal"])
    p.add_argument("--tasks", type=int, nargs="+")
    p.add_argument("--demos", type=int, default=50, help="successful demonstrations per task")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=128, help="camera resolution (px)")
    p.add_argument("--no_noops", action="store_true", help="OpenVLA's no-op filter")
    p.add_argument("--init", default="random", choices=["random", "fixed"])
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--max_attempts", type=float, default=2.0, help="give up a task after this many x --demos")
    p.add_argument("--seed", type=int, default=0, help="layout seeds: seed + 100000 * task + attempt")
    p.add_argument("--action_noise", type=float, default=0.0,
                   help="std of Gaussian noise on the executed pose actions (action units; the expert corrects it)")
    p.add_argument("--statistics_only", metavar="KEY", default=None,
                   help="only (re)write dataset_statistics.json for the *_demo.hdf5 files already in --out, "
                        "under this key (e.g. for LIBERO's released demos)")
    args = p.parse_args(argv)
    if args.statistics_only is not None:
        return args
    if not args.tasks:
        p.error("--tasks: required (the LIBERO-Goal task ids)")
    for name in ("demos", "size", "processes", "max_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be >= 1")
    if os.path.exists(args.out) and any(f.endswith("_demo.hdf5") for f in os.listdir(args.out)):
        p.error(f"--out={args.out}: already holds demonstration files; choose a new folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from datamodules.libero_hdf5 import DemoFile, episode_arrays, write_statistics

    if args.statistics_only is not None:
        print(f"wrote {write_statistics(args.out, args.statistics_only)}")
        return 0
    from modules.experts.collect import CAMERAS, Job, run_jobs
    from modules.experts.episode import task_bddl
    from modules.experts.libero_goal import PLANS

    missing = [t for t in args.tasks if t not in PLANS]
    if missing:
        print(f"error: --tasks={missing[0]}: no scripted expert (have: {sorted(PLANS)})", file=sys.stderr)
        return 2
    from datamodules.libero_setup import setup_libero

    setup_libero()  # LIBERO's config, written before libero.libero is imported (it would prompt)
    from libero.libero.envs.bddl_utils import get_problem_info

    start = time.time()
    files, report = {}, {}
    for t in args.tasks:
        task, bddl, _ = task_bddl(args.suite, t)
        env_kwargs = {"bddl_file_name": bddl, "camera_names": list(CAMERAS), "camera_heights": args.size,
                      "camera_widths": args.size, "controller": "OSC_POSE", "control_freq": 20}
        files[t] = DemoFile(os.path.join(args.out, f"{task.name}_demo.hdf5"), bddl,
                            get_problem_info(bddl), env_kwargs)
        report[t] = {"task": task.name, "instruction": task.language, "attempts": 0, "successes": 0,
                     "lengths": [], "dropped_noops": 0}
    next_index = {t: 0 for t in args.tasks}
    while True:
        jobs = []
        for t in args.tasks:
            need = args.demos - files[t].num_demos
            budget = int(args.max_attempts * args.demos) - report[t]["attempts"]
            for _ in range(max(0, min(need, budget))):
                i = next_index[t]
                next_index[t] += 1
                index = i if args.init == "fixed" else args.seed + 100_000 * t + i
                jobs.append(Job(args.suite, t, index, args.init, True, args.size, args.max_steps,
                                action_noise=args.action_noise))
        if not jobs:
            break
        for job, ep in run_jobs(jobs, args.processes):
            rep, out = report[job.task_id], files[job.task_id]
            rep["attempts"] += 1
            if not ep.success or out.num_demos >= args.demos:
                continue
            arrays = episode_arrays(ep, args.no_noops)
            rep["successes"] += 1
            rep["dropped_noops"] += len(ep.actions) - len(arrays["actions"])
            rep["lengths"].append(len(arrays["actions"]))
            out.add(arrays, ep.model_xml)
            print(f"task {job.task_id}: demo {out.num_demos}/{args.demos} ({len(arrays['actions'])} steps; "
                  f"{rep['attempts']} attempts)", flush=True)
    for t in args.tasks:
        files[t].close()
    key = f"{args.suite}_scripted" + ("_no_noops" if args.no_noops else "")
    stats = write_statistics(args.out, key)
    elapsed = time.time() - start
    summary = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(elapsed, 1), "unnorm_key": key, "size": args.size, "no_noops": args.no_noops,
        "init": args.init, "action_noise": args.action_noise, "tasks": {str(t): r for t, r in report.items()},
    }
    with open(os.path.join(args.out, "collection.json"), "w") as f:
        json.dump(summary, f, indent=2)
    short = [t for t in args.tasks if files[t].num_demos < args.demos]
    for t in args.tasks:
        r = report[t]
        print(f"task {t}: {r['successes']} demos from {r['attempts']} attempts")
    print(f"wrote {len(args.tasks)} files, {stats} and collection.json to {args.out} in {elapsed:.0f} s "
          f"(unnorm_key {key})")
    if short:
        print(f"error: tasks {short}: fewer than --demos={args.demos} successes within --max_attempts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
