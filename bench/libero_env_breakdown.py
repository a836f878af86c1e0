"""Where one LIBERO step's time goes, in-process (no pool), all parts timed on the same sim.

One kit worker env (``OpenVLALiberoEnv``: torchrl ``LiberoEnv`` with OpenVLA's image pipeline and
gripper convention in its step) for libero_goal task 8 from init state 0, and the pieces under
it, each timed on that same simulator and its frames: raw ``OffScreenRenderEnv.step`` (physics +
render), raw stepping with only the observables the kit reads, the env's step without the image
pipeline (+ success check and TensorDict), the kit's full worker step, the image pipeline's
parts (JPEG round-trip, Lanczos3 resize, also with dense matrices, centre
crop), the frame's read (torchrl's vs the kit's), the worker's wire format, and the worker env's
own machinery with the simulation step replaced by a cached observation, also inside a
``TransformedEnv`` of no-op transforms (the cost of doing OpenVLA's conventions as transforms).
Median ms over ``--reps`` x ``--steps``.

Usage: MUJOCO_GL=egl python bench/libero_env_breakdown.py [--render 256 --steps 40 --reps 3]
"""
import argparse
import os
import pickle
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from torchrl.envs.libs.libero import LiberoWrapper  # noqa: E402

from torchrl.envs import Compose, Transform, TransformedEnv  # noqa: E402

from datamodules.libero import LIBERO_OPTIONS, OpenVLAObservation, worker_env  # noqa: E402
from datamodules.libero_env import InitStateLiberoEnv, chw_frame  # noqa: E402
from datamodules.libero_setup import setup_libero  # noqa: E402
from datamodules.openvla_image import _matrix_on, center_crop, jpeg_roundtrip, lanczos3_resize  # noqa: E402
from datamodules.robust_env import _to_wire  # noqa: E402


class _CloneAction(Transform):
    """A gripper transform's plumbing without its arithmetic (the kit's env does the arithmetic)."""

    def __init__(self):
        super().__init__(in_keys_inv=["action"], out_keys_inv=["action"])

    def _inv_apply_transform(self, action):
        return action.clone()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--render", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    setup_libero()
    torch.set_num_threads(1)
    env = worker_env("libero_goal", 8, seed=0, max_steps=10_000, init_state_id=0, render_gpu=None,
                     options={**LIBERO_OPTIONS, "render_size": args.render})
    td = env.reset()
    raw = env._env
    frame = td["observation", "image"]
    raw_frame = raw.env._get_observations(force_update=True)["agentview_image"]
    render = chw_frame(raw_frame)
    jpeg = jpeg_roundtrip(render, 95)
    resized = lanczos3_resize(jpeg, 224)
    wh = _matrix_on(args.render, 224, torch.device("cpu"), torch.float32)

    def dense_lanczos(images):  # the resize with dense matrices: W_h @ x @ W_w^T
        return (wh @ images.to(torch.float32) @ wh.T).round_().clamp_(0, 255).to(torch.uint8)

    assert torch.equal(dense_lanczos(jpeg), resized)
    libero_action = np.zeros(7)
    libero_action[-1] = -1.0  # LIBERO: -1 = open
    kit_td = td.clone().set("action", torch.tensor([0.0] * 6 + [1.0]))  # OpenVLA: 1 = open
    base_td = TensorDict({"action": torch.tensor(libero_action, dtype=torch.float32)}, batch_size=[])
    stages = env._image["stages"]

    def no_pipeline(f):  # the env's step as torchrl's LiberoEnv (+ the kit's read): no image pipeline, no
        def call():       # gripper mapping (LIBERO's action)
            env._image["stages"] = ()
            try:
                return InitStateLiberoEnv._step(env, base_td)
            finally:
                env._image["stages"] = stages
        return call

    # the alternative: OpenVLA's conventions as torchrl Transforms around the env; here no-op
    # transforms around the kit's env, so only the plumbing is added
    as_transforms = TransformedEnv(env, Compose(OpenVLAObservation(stages=()), _CloneAction()))
    step_out = env.step(kit_td.clone())["next"]
    sim_env = raw.env
    trimmed = {name for name, o in sim_env._observables.items() if not o.is_enabled()}  # what the kit's env switched off

    def observables(on: bool) -> None:  # raw lines: every observable, as a plain OffScreenRenderEnv computes them
        for name in trimmed:
            sim_env.modify_observable(name, "enabled", on)

    parts = {
        "raw OffScreenRenderEnv.step (every observable)": lambda: raw.step(libero_action),
        "raw OffScreenRenderEnv.step (the kit's observables only)": lambda: raw.step(libero_action),
        "LiberoEnv._step (the kit's subclass, no image pipeline: raw + success + TensorDict)":
            no_pipeline(env._step),
        "kit worker env._step (+ image pipeline, gripper)": lambda: env._step(kit_td),
        "kit worker env.step (+ EnvBase)": lambda: env.step(kit_td.clone()),
        "  read: torchrl LiberoWrapper._read_image (flip, permute)": lambda: LiberoWrapper._read_image(env, raw_frame),
        "  read: the kit's chw_frame (one strided copy)": lambda: chw_frame(raw_frame),
        f"  image: JPEG round-trip ({args.render} px)": lambda: jpeg_roundtrip(render, 95),
        f"  image: Lanczos3 resize {args.render}->224 (banded blocks)": lambda: lanczos3_resize(jpeg, 224),
        f"  image: Lanczos3 resize {args.render}->224 (dense matrices, baseline)": lambda: dense_lanczos(jpeg),
        "  image: centre crop": lambda: center_crop(resized),
        "  wire: flat numpy row + pickle": lambda: pickle.dumps(_to_wire(step_out), protocol=pickle.HIGHEST_PROTOCOL),
    }
    assert frame.shape[-1] == 224
    res = {}

    def time_parts(parts: dict) -> None:  # ms per call into res; the parts alternate within a rep
        for f in parts.values():
            f()  # warm-up
        for name in parts:
            res[name] = []
        for _ in range(args.reps):
            for name, f in parts.items():
                observables("every observable" in name)
                t = time.perf_counter()
                for _ in range(args.steps):
                    f()
                res[name].append((time.perf_counter() - t) / args.steps * 1e3)
        observables(False)

    time_parts(parts)
    # the worker env's own machinery without the simulation: the sim step replaced by its last
    # observation (a timing device only; the env is closed right after)
    cached = raw.step(libero_action)
    raw.step = lambda action: cached
    machinery = {
        "no sim: kit worker env.step (EnvBase.step)": lambda: env.step(kit_td.clone()),
        "no sim: kit worker env._step": lambda: env._step(kit_td),
        "no sim: TransformedEnv(kit worker env, no-op transforms).step":
            lambda: as_transforms.step(kit_td.clone()),
        "no sim: LiberoEnv._step (the kit's subclass, no image pipeline)": no_pipeline(env._step),
    }
    time_parts(machinery)
    print(f"libero_goal:8, render {args.render}px, MUJOCO_GL={os.environ.get('MUJOCO_GL')}, "
          f"{args.reps} reps x {args.steps} steps, median ms per call")
    for name, v in res.items():
        print(f"{name:50s} {statistics.median(v):7.2f}")
    env.close()


if __name__ == "__main__":
    main()
