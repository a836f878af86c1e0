"""What one LIBERO episode start costs: robosuite's hard reset against the kit's soft reset.

One kit worker env (``OpenVLALiberoEnv``, libero_goal task 8 by default, init state 0): its whole
reset (robosuite's reset, the stored initial state, the settle steps, the first observation) with
``hard_reset`` true (LIBERO's default: the model is rebuilt from its XML and the sim and renderer
are created anew on every reset) and false (the kit's default: the same sim is reset; the same
layout and simulator state for the same numpy state, tests/test_libero.py), alternating within
each rep; and the env's step for scale, split into its observation (the camera renders and the
image pipeline: robosuite's ``_get_observations``) and the rest (physics, controller). Median
seconds. An episode of L steps costs one reset plus L steps, so the last lines give env steps/s
for a few episode lengths.

``--workers N`` then steps N such envs at once, one process each (as the kit's env pool runs
them, rendering on GPU ``i % gpus`` under EGL), and prints each worker's median step and the
sum of their step rates: what the pool could reach with no waiting on each other or the policy.

Usage: MUJOCO_GL=egl python bench/libero_reset.py [--render 128 --reps 5 --steps 20 --workers 16]
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from datamodules.libero import LIBERO_OPTIONS, worker_env  # noqa: E402
from datamodules.libero_setup import setup_libero  # noqa: E402


def gl_renderer() -> str:
    """The OpenGL renderer MuJoCo's offscreen context gets (a GPU, or llvmpipe: software)."""
    try:
        import mujoco
        from OpenGL import GL
        ctx = mujoco.GLContext(64, 64)
        ctx.make_current()
        name = GL.glGetString(GL.GL_RENDERER).decode()
        ctx.free()
        return name
    except Exception as e:  # noqa: BLE001 - a diagnostic line, not a failure
        return f"unknown ({type(e).__name__}: {e})"


def make_env(task: int, render: int, render_gpu: int | None, seed: int = 0):
    options = {**LIBERO_OPTIONS, "render_size": render, "image_size": render}
    return worker_env("libero_goal", task, seed=seed, max_steps=10_000, init_state_id=0, render_gpu=render_gpu,
                      options=options), options


def time_steps(env, steps: int) -> tuple[float, float]:
    """Median seconds of the env's step and of its observation part (renders + image pipeline)."""
    sim_env = env._env.env
    td = env.reset()
    td.set("action", torch.tensor([0.0] * 6 + [1.0]))
    step, obs = [], []
    for _ in range(steps):
        t = time.perf_counter()
        env.step(td)
        step.append(time.perf_counter() - t)
        t = time.perf_counter()
        sim_env._get_observations(force_update=True)
        obs.append(time.perf_counter() - t)
    return statistics.median(step), statistics.median(obs)


def pool_worker(args):
    index, task, render, gpus, steps = args
    setup_libero()
    torch.set_num_threads(1)
    env, _ = make_env(task, render, gpus[index % len(gpus)] if gpus else None, seed=1_000 * index)
    result = time_steps(env, steps)
    try:  # the renderer of robosuite's own context, current after the last observation
        from OpenGL import GL
        renderer = (GL.glGetString(GL.GL_RENDERER) or b"none").decode()
    except Exception as e:  # noqa: BLE001 - a diagnostic line, not a failure
        renderer = f"unknown ({type(e).__name__})"
    env.close()
    return (*result, renderer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", type=int, default=8, help="libero_goal task id")
    p.add_argument("--render", type=int, default=128, help="render size (px); the policy image is the same size")
    p.add_argument("--reps", type=int, default=5, help="resets per mode (alternating)")
    p.add_argument("--steps", type=int, default=20, help="steps timed for the step's cost")
    p.add_argument("--workers", type=int, default=0, help="then step this many envs at once, one process each")
    args = p.parse_args()
    setup_libero()
    torch.set_num_threads(1)
    env, options = make_env(args.task, args.render, None)
    sim_env = env._env.env
    env.reset()  # warm-up
    times = {True: [], False: []}
    for _ in range(args.reps):
        for hard in (True, False):
            sim_env.hard_reset = hard
            t = time.perf_counter()
            td = env.reset()
            times[hard].append(time.perf_counter() - t)
    step, obs = time_steps(env, args.steps)
    env.close()
    hard, soft = (statistics.median(x) for x in (times[True], times[False]))
    print(f"libero_goal:{args.task}, render {args.render} px, settle steps {options['settle_steps']}, "
          f"MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({gl_renderer()}), {args.reps} resets per mode, median s")
    print(f"reset, hard (LIBERO's default)   {hard:.3f}   per rep: {[round(x, 3) for x in times[True]]}")
    print(f"reset, soft (the kit's default)  {soft:.3f}   per rep: {[round(x, 3) for x in times[False]]}")
    print(f"soft / hard                      {soft / hard:.3f}")
    print(f"env step                         {step:.4f}   observation (renders + images) {obs:.4f}")
    for length in (100, 150, 300):
        rate = {name: length / (r + length * step) for name, r in (("hard", hard), ("soft", soft))}
        print(f"episodes of {length} steps: env steps/s hard {rate['hard']:.1f}, soft {rate['soft']:.1f}, "
              f"soft / hard {rate['soft'] / rate['hard']:.2f}")
    if args.workers:
        gpus = list(range(torch.cuda.device_count())) if os.environ.get("MUJOCO_GL") == "egl" else []
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(pool_worker, [(i, args.task, args.render, gpus, args.steps)
                                             for i in range(args.workers)])
        steps, obs = [r[0] for r in results], [r[1] for r in results]
        print(f"{args.workers} workers at once (render GPUs {gpus or 'none'}; the workers' GL renderer: "
              f"{sorted(set(r[2] for r in results))}): median step "
              f"{statistics.median(steps):.4f} (min {min(steps):.4f}, max {max(steps):.4f}), observation "
              f"{statistics.median(obs):.4f}; sum of step rates {sum(1 / x for x in steps):.1f} env steps/s")


if __name__ == "__main__":
    main()
