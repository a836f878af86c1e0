"""The kit's LIBERO env path vs raw ``OffScreenRenderEnv`` stepping, same actions, same script.

Baselines: N processes, each stepping its own LIBERO ``OffScreenRenderEnv`` (agentview camera
only, same resolution) with a fixed action sequence, driven over pipes: "raw" lets each process
run its whole action sequence freely (the upper bound); "raw lock-step" steps them together as a
batched policy must (the main process sends one action to each, waits for all, and stacks the
agentview images it gets back as pickled numpy: the least a batched env has to do). Kit: the datamodule's
``make_env`` for the same task (``RobustEnvPool`` of ``OpenVLALiberoEnv`` workers: torchrl's
``LiberoEnv`` with OpenVLA's image pipeline and gripper convention in its step), stepped from
the main process with the same actions in OpenVLA's convention. All envs start from the task's stored init state 0 (a lock-step
batch waits for its slowest env, so different starts would load the paths differently).
``--raw_pipeline`` adds "raw lock-step + pipeline": the raw workers also put each frame through
OpenVLA's image pipeline, the same work as the kit minus its machinery (torchrl env, pool).
Reports aggregate env steps/s (median over reps, the paths alternating) and resident memory per
env worker, for each kit variant (``--variants``: where the image pipeline runs, core pinning),
each built after the previous one is closed.

Usage: python bench/libero_env_throughput.py [--num_envs 2 --steps 50 --reps 3 --render 256
       --variants worker,cuda,cuda+pin --raw_pipeline]
"""
import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import time

import numpy as np
import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torchrl.envs.utils import step_mdp  # noqa: E402

from datamodules.libero import libero_action  # noqa: E402
from datamodules.libero_env import chw_frame  # noqa: E402
from datamodules.libero_setup import setup_libero  # noqa: E402
from datamodules.openvla_image import openvla_image  # noqa: E402
from datamodules.tasks import make_env, parse_stream  # noqa: E402

SUITE, TASK = "libero_goal", 8
INIT_STATE = 0  # every env of both paths starts from this stored state: same physics, same actions


def openvla_actions(steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.3, 0.3, size=(steps, 7))
    a[:, -1] = rng.uniform(0, 1, size=steps)  # OpenVLA gripper (1 open, 0 close)
    return a


def to_libero(a: np.ndarray) -> np.ndarray:
    """The kit's mapping (``libero_action``, tested in tests/test_libero.py), LIBERO's bounds [-1, 1]."""
    return libero_action(torch.from_numpy(a), -torch.ones(7), torch.ones(7)).numpy()


def raw_worker(conn, render: int, steps: int, gpu: int):
    setup_libero()
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = benchmark.get_benchmark_dict()[SUITE]()
    task = suite.get_task(TASK)
    env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder,
                                                          task.bddl_file),
                             camera_heights=render, camera_widths=render, camera_names=["agentview"],
                             render_gpu_device_id=gpu)
    env.seed(0)
    actions = to_libero(openvla_actions(steps))

    def reset():  # every rep of every path starts from the same stored state
        env.reset()
        env.set_init_state(suite.get_task_init_states(TASK)[INIT_STATE])
        for _ in range(10):  # settle (+ numba JIT warm-up the first time), as the kit's reset does
            env.step(actions[0] * 0)

    reset()
    conn.send(("ready", os.getpid()))
    while True:
        cmd = conn.recv()
        if cmd == "reset":
            reset()
            conn.send("ok")
        elif cmd == "run":
            t = time.perf_counter()
            for a in actions:
                env.step(a)
            conn.send(time.perf_counter() - t)
        elif cmd == "lockstep":  # one step per message, the observation sent back
            for a in actions:
                conn.recv_bytes()
                obs = env.step(a)[0]
                conn.send_bytes(pickle.dumps(obs, protocol=pickle.HIGHEST_PROTOCOL))
        elif cmd == "lockstep_pipeline":  # the same, sending back what the kit computes: the
            torch.set_num_threads(1)     # flipped frame through OpenVLA's image pipeline
            for a in actions:
                conn.recv_bytes()
                image = openvla_image(chw_frame(env.step(a)[0]["agentview_image"]))  # the kit's read
                conn.send_bytes(pickle.dumps(image.numpy(), protocol=pickle.HIGHEST_PROTOCOL))
        else:
            break
    env.close()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num_envs", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--render", type=int, default=256)
    p.add_argument("--variants", default="worker",
                   help="comma list of kit variants: worker (image pipeline in each env worker), a device such as "
                        "cuda or cpu (the LIBERO option image_device), off (no image pipeline: the render as it "
                        "comes, flipped), +pin appended: kit workers pinned one per core")
    p.add_argument("--raw_pipeline", action="store_true",
                   help="one more baseline: raw lock-step with OpenVLA's image pipeline (datamodules/openvla_image.py) "
                        "run in the raw workers, i.e. the same work as the kit without the kit's machinery")
    args = p.parse_args()
    setup_libero()
    n, steps = args.num_envs, args.steps

    ctx = mp.get_context("spawn")
    pipes, procs, raw_pids = [], [], []
    n_gpus = torch.cuda.device_count()  # the kit's workers render on GPU i % n_gpus: so do these
    for i in range(n):
        a, b = ctx.Pipe()
        proc = ctx.Process(target=raw_worker, args=(b, args.render, steps, i % n_gpus if n_gpus else -1),
                           daemon=True)
        proc.start()
        pipes.append(a)
        procs.append(proc)
    raw_pids = [c.recv()[1] for c in pipes]
    actions = torch.as_tensor(openvla_actions(steps), dtype=torch.float32)

    def raw_reset():
        for c in pipes:
            c.send("reset")
        [c.recv() for c in pipes]

    def raw_rate():
        raw_reset()
        for c in pipes:
            c.send("run")
        return n * steps / max(c.recv() for c in pipes)

    def lockstep_rate(pipeline: bool = False):
        raw_reset()
        for c in pipes:
            c.send("lockstep_pipeline" if pipeline else "lockstep")
        t = time.perf_counter()
        for _ in range(steps):
            for c in pipes:
                c.send_bytes(b"s")
            obs = [pickle.loads(c.recv_bytes()) for c in pipes]
            np.stack(obs if pipeline else [o["agentview_image"] for o in obs])
        return n * steps / (time.perf_counter() - t)

    print(f"task {SUITE}:{TASK}, {n} envs, {steps} steps per rep, render {args.render}px, reps {args.reps}, "
          f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}, {n_gpus} GPU(s) for rendering, {os.cpu_count()} cores "
          f"(affinity {len(os.sched_getaffinity(0))})")
    raw_rss = [rss_mb(pid) for pid in raw_pids]
    for variant in args.variants.split(","):
        image_device, pin = variant.removesuffix("+pin"), variant.endswith("+pin")
        options = {"render_size": args.render}
        if image_device == "off":
            options.update(image_size=args.render, jpeg_quality=None, center_crop=False)
        elif image_device != "worker":
            options["image_device"] = image_device
        task = parse_stream([{"env": "libero", "suite": SUITE, "task_id": TASK, "max_steps": 10_000, **options}])[0]
        env = make_env(task, n, seed=0, init_state_ids=[INIT_STATE] * n)
        kit_pids = [env.worker_pid(i) for i in range(n)]
        if pin:  # worker i on core i (the main process keeps all cores)
            cores = sorted(os.sched_getaffinity(0))
            for i, pid in enumerate(kit_pids):
                os.sched_setaffinity(pid, {cores[i % len(cores)]})
        td = env.reset()
        env.step(td.set("action", actions[0].expand(n, 7).clone()))  # warm-up

        def kit_rate():
            nonlocal td
            td = env.reset()  # init state 0 (pinned) + settle steps, as the raw envs
            t = time.perf_counter()
            for a in actions:
                td = step_mdp(env.step(td.set("action", a.expand(n, 7).clone())))
            return n * steps / (time.perf_counter() - t)

        raw, lock, lock_pipe, kit = [], [], [], []
        for _ in range(args.reps):  # the paths alternate, so drifts of the machine hit all of them
            raw.append(raw_rate())
            lock.append(lockstep_rate())
            if args.raw_pipeline:
                lock_pipe.append(lockstep_rate(pipeline=True))
            kit.append(kit_rate())
            print(f"rep {len(kit)}: raw {raw[-1]:.1f}, lock-step {lock[-1]:.1f}, "  # kept if the run is cut off
                  + (f"lock-step + pipeline {lock_pipe[-1]:.1f}, " if lock_pipe else "")
                  + f"kit {kit[-1]:.1f} steps/s", flush=True)
        assert td["observation", "image"].shape[-1] == options.get("image_size", 224)
        kit_rss = [rss_mb(pid) for pid in kit_pids]
        where = {"worker": "image pipeline in each worker", "off": "no image pipeline (flipped render only)"}
        print(f"\n== kit variant {variant!r}: " + where.get(image_device, f"JPEG in the workers, resize + crop "
              f"batched in the main process on {image_device}") + (", workers pinned one per core" if pin else ""))
        print(f"raw OffScreenRenderEnv  steps/s median {statistics.median(raw):.2f}  (all: "
              + ", ".join(f"{x:.2f}" for x in raw) + ")")
        print(f"raw lock-step           steps/s median {statistics.median(lock):.2f}  (all: "
              + ", ".join(f"{x:.2f}" for x in lock) + ")")
        if lock_pipe:
            print(f"raw lock-step + OpenVLA image pipeline in the raw workers  steps/s median "
                  f"{statistics.median(lock_pipe):.2f}  (all: " + ", ".join(f"{x:.2f}" for x in lock_pipe) + ")")
        print(f"kit env path            steps/s median {statistics.median(kit):.2f}  (all: "
              + ", ".join(f"{x:.2f}" for x in kit) + ")")
        print(f"ratio kit/raw (medians) {statistics.median(kit) / statistics.median(raw):.2f}")
        print(f"ratio kit/raw lock-step (medians) {statistics.median(kit) / statistics.median(lock):.2f}")
        if lock_pipe:
            print(f"ratio kit/(raw lock-step + pipeline) (medians) "
                  f"{statistics.median(kit) / statistics.median(lock_pipe):.2f}")
        print(f"resident memory per worker: raw {statistics.median(raw_rss):.0f} MiB, "
              f"kit {statistics.median(kit_rss):.0f} MiB (median of {len(kit_rss)} kit workers)")
        env.close()
    for c in pipes:
        c.send("stop")


if __name__ == "__main__":
    main()
