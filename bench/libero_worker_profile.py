"""Where the kit's LIBERO env path spends its time, with the real pool: every ``RobustEnvPool``
worker and the main process run under cProfile while the pool steps N envs in lock-step
(same task and actions as bench/libero_env_throughput.py). Prints the steps/s and, for the
main process and for worker 0, the functions with the most own time, plus the share of each
worker's wall time spent in rendering, physics, the OpenVLA image pipeline, the pool's
transport and waiting for the next action.

Usage: python bench/libero_worker_profile.py [--num_envs 16 --steps 100 --render 256 --out DIR]
"""
import argparse
import cProfile
import functools
import io
import multiprocessing.util
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torchrl.envs.utils import step_mdp  # noqa: E402

from datamodules import libero  # noqa: E402
from datamodules.libero_setup import setup_libero  # noqa: E402

SUITE, TASK = "libero_goal", 8
WARMUP = 5
GROUPS = {  # substring of "file:function" -> group (first match wins); own time (tottime)
    "mjr_render": "render", "mjr_readPixels": "render", "mj_step": "physics", "mj_forward": "physics",
    "'poll'": "waiting", "posix.read": "waiting",  # blocked on the pipe (worker: for the next action)
    "Imaging": "OpenVLA image pipeline", "/PIL/": "OpenVLA image pipeline", "openvla_image": "OpenVLA image pipeline",
    "_pickle": "pool transport", "posix.write": "pool transport", "tensordict/": "tensordict/torchrl python",
    "torchrl/": "tensordict/torchrl python", "robosuite/": "robosuite/libero python", "libero/": "robosuite/libero python",
}


KIT_WORKER_ENV = libero.worker_env  # the kit's, before main() swaps in the profiled one


def profiled_worker_env(out_dir, *args, worker_index: int = 0, **kwargs):
    """The kit's worker env, with this (worker) process under cProfile from its WARMUP+1-th step
    until the env is closed (env build, reset, warm-up and shutdown excluded; the wait for the
    next action included); dumped at exit."""
    env = KIT_WORKER_ENV(*args, worker_index=worker_index, **kwargs)
    prof, calls, step, close = cProfile.Profile(), [0], env.step, env.close

    def counting_step(td):
        calls[0] += 1
        if calls[0] == WARMUP + 1:
            prof.enable()
        return step(td)

    def closing(*a, **kw):
        prof.disable()
        return close(*a, **kw)

    env.step, env.close = counting_step, closing
    path = os.path.join(out_dir, f"worker{worker_index}.prof")
    multiprocessing.util.Finalize(None, lambda: (prof.disable(), prof.dump_stats(path)), exitpriority=100)
    return env


def top(stats: pstats.Stats, n: int) -> str:
    buf = io.StringIO()
    stats.stream = buf
    stats.sort_stats("tottime").print_stats(n)
    return "\n".join(line for line in buf.getvalue().splitlines()[6:] if line.strip())


def groups(stats: pstats.Stats) -> dict:
    out, total = {}, 0.0
    for (file, _, func), (_, _, tt, _, _) in stats.stats.items():
        total += tt
        name = f"{file}:{func!r}" if file == "~" else f"{file}:{func}"
        g = next((g for k, g in GROUPS.items() if k in name), "other")
        out[g] = out.get(g, 0.0) + tt
    return {k: v / total for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num_envs", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--render", type=int, default=256)
    p.add_argument("--out", default="/tmp/libero_profile")
    p.add_argument("--image_device", default=None, help="the LIBERO option image_device (default: in the workers)")
    args = p.parse_args()
    renderer = setup_libero()
    os.makedirs(args.out, exist_ok=True)
    n = args.num_envs
    n_gpus = torch.cuda.device_count() if renderer == "egl" else 0
    libero.worker_env = functools.partial(profiled_worker_env, args.out)
    env = libero.make_libero_env(SUITE, TASK, n, seed=0, max_steps=10_000,
                                 options={"render_size": args.render, "image_device": args.image_device})
    td = env.reset()
    gen = torch.Generator().manual_seed(0)
    actions = torch.rand(args.steps + WARMUP, n, 7, generator=gen) * 0.6 - 0.3
    for a in actions[:WARMUP]:
        td = step_mdp(env.step(td.set("action", a.clone())))
    main_prof = cProfile.Profile()
    t = time.perf_counter()
    main_prof.enable()
    for a in actions[WARMUP:]:
        td = step_mdp(env.step(td.set("action", a.clone())))
    main_prof.disable()
    wall = time.perf_counter() - t
    env.close()
    print(f"{n} envs, {args.steps} steps, render {args.render}px, image_device {args.image_device}, MUJOCO_GL={os.environ.get('MUJOCO_GL')}, "
          f"{n_gpus} GPU(s), {os.cpu_count()} cores: {n * args.steps / wall:.1f} env steps/s "
          f"({wall / args.steps * 1e3:.1f} ms per batched step)")
    main_stats = pstats.Stats(main_prof)
    print("\n== main process, own time by group:", {k: f"{v:.0%}" for k, v in groups(main_stats).items()})
    print(top(main_stats, 15))
    for i in range(n):
        path = os.path.join(args.out, f"worker{i}.prof")
        if not os.path.exists(path):
            print(f"worker {i}: no profile written")
            continue
        stats = pstats.Stats(path)
        print(f"\n== worker {i} (steps after the warm-up), own time by group:",
              {k: f"{v:.0%}" for k, v in groups(stats).items()})
        if i == 0:
            print(top(stats, 25))


if __name__ == "__main__":
    main()
