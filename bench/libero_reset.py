"""What one LIBERO episode start costs: robosuite's hard reset against the kit's soft reset.

One kit worker env (``OpenVLALiberoEnv``, libero_goal task 8 by default, init state 0): its whole
reset (robosuite's reset, the stored initial state, the settle steps, the first observation) with
``hard_reset`` true (LIBERO's default: the model is rebuilt from its XML and the sim and renderer
are created anew on every reset) and false (the kit's default: the same sim is reset; the same
layout and simulator state for the same numpy state, tests/test_libero.py), alternating within
each rep; and the env's step for scale. Median seconds. An episode of L steps costs one reset
plus L steps, so the last lines give env steps/s for a few episode lengths.

Usage: MUJOCO_GL=egl python bench/libero_reset.py [--render 128 --reps 5 --steps 20]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from datamodules.libero import LIBERO_OPTIONS, worker_env  # noqa: E402
from datamodules.libero_setup import setup_libero  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", type=int, default=8, help="libero_goal task id")
    p.add_argument("--render", type=int, default=128, help="render size (px); the policy image is the same size")
    p.add_argument("--reps", type=int, default=5, help="resets per mode (alternating)")
    p.add_argument("--steps", type=int, default=20, help="steps timed for the step's cost")
    args = p.parse_args()
    setup_libero()
    torch.set_num_threads(1)
    options = {**LIBERO_OPTIONS, "render_size": args.render, "image_size": args.render}
    env = worker_env("libero_goal", args.task, seed=0, max_steps=10_000, init_state_id=0, render_gpu=None,
                     options=options)
    sim_env = env._env.env
    env.reset()  # warm-up
    times = {True: [], False: []}
    for _ in range(args.reps):
        for hard in (True, False):
            sim_env.hard_reset = hard
            t = time.perf_counter()
            td = env.reset()
            times[hard].append(time.perf_counter() - t)
    td.set("action", torch.tensor([0.0] * 6 + [1.0]))
    steps = []
    for _ in range(args.steps):
        t = time.perf_counter()
        env.step(td)
        steps.append(time.perf_counter() - t)
    env.close()
    hard, soft, step = (statistics.median(x) for x in (times[True], times[False], steps))
    print(f"libero_goal:{args.task}, render {args.render} px, settle steps {options['settle_steps']}, "
          f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}, {args.reps} resets per mode, median s")
    print(f"reset, hard (LIBERO's default)   {hard:.3f}   per rep: {[round(x, 3) for x in times[True]]}")
    print(f"reset, soft (the kit's default)  {soft:.3f}   per rep: {[round(x, 3) for x in times[False]]}")
    print(f"soft / hard                      {soft / hard:.3f}")
    print(f"env step                         {step:.4f}")
    for length in (100, 150, 300):
        rate = {name: length / (r + length * step) for name, r in (("hard", hard), ("soft", soft))}
        print(f"episodes of {length} steps: env steps/s hard {rate['hard']:.1f}, soft {rate['soft']:.1f}, "
              f"soft / hard {rate['soft'] / rate['hard']:.2f}")


if __name__ == "__main__":
    main()
