"""LIBERO task envs for the on-policy datamodule, on torchrl's ``LiberoEnv``.

One process per env (``RobustEnvPool``: one MuJoCo sim and GL context each; crashed or hung
workers are restarted and their episode counted as failed). Per worker one ``OpenVLALiberoEnv``:
torchrl's ``LiberoEnv`` (VLA TensorDict schema, settle steps) with the kit's init-state choice
(datamodules/libero_env.py) and OpenVLA's conventions inside its own step:

* observations: the image as OpenVLA's evaluation computes it (rendered at ``render_size``,
  flipped 180 degrees, JPEG round-trip, TF's Lanczos3 resize to ``image_size``, 0.9-area centre
  crop: datamodules/openvla_image.py); with ``image_device`` the workers only JPEG, and the
  resize and crop run batched over all envs in the main process (``OpenVLAObservation``);
* actions: the policy speaks OpenVLA's action convention, the sim LIBERO's
  (``libero_action``);
* OpenVLA-OFT's observation (``wrist_camera: true``, ``proprio: axis_angle``): the wrist camera
  through the same image pipeline, and the state as OFT's LIBERO evaluation builds it.

Training resets draw init states at random; evaluation env ``i`` is pinned to init state
``init_state_ids[i]`` (the fixed-50-states protocol). On GPU machines the workers render
round-robin over the GPUs (VLA-RL's "GPU-balanced" envs); under DDP each rank's workers render
on the rank's own GPU (``render_gpu_ids``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import Bounded
from torchrl.envs import Transform, TransformedEnv

from datamodules.libero_env import InitStateLiberoEnv
from datamodules.libero_setup import SUITES, setup_libero
from datamodules.openvla_image import jpeg_roundtrip, resize_and_crop
from datamodules.robust_env import RobustEnvPool

# env options a stream entry may set (defaults: OpenVLA's LIBERO evaluation setup)
LIBERO_OPTIONS = {
    "render_size": 256,       # LIBERO render resolution (OpenVLA: 256x256)
    "image_size": 224,        # what the policy gets
    "jpeg_quality": 95,       # None: no JPEG round-trip (OpenVLA's training data went through JPEG)
    "center_crop": True,      # OpenVLA's 0.9-area centre crop (models trained with image augmentation)
    "image_device": None,     # None: the whole image pipeline in each env worker (CPU); a device
                              # ("cuda", "cpu"): workers JPEG, the main process resizes + crops all envs at once there
    "wrist_camera": False,    # also render robot0_eye_in_hand as ("observation", "wrist_image")
    "proprio": "quat",        # ("observation", "state"): "quat" = eef pos, eef quaternion (xyzw), gripper qpos (9-D,
                              # torchrl's); "axis_angle" = eef pos, axis-angle, gripper qpos (8-D, OpenVLA-OFT's)
    "settle_steps": 10,       # no-op steps after reset (OpenVLA protocol)
    "hard_reset": False,      # True: robosuite rebuilds the model, sim and renderer at every reset (LIBERO's
                              # default); False resets the same sim: the same layouts and states, cheaper
    "spare_envs": 0,          # training pools: extra workers that reset in advance and take over an ended
                              # episode's slot, so the lock-step pool does not wait for resets (not with
                              # data.curriculum; evaluation pools, which give each episode's state, have none)
    "binarize_gripper": True,  # OpenVLA: gripper -> {-1, +1}
    "step_timeout": 60.0,     # s; a worker that misses it is restarted (episode = failure)
    "reset_timeout": 600.0,   # s; includes building a fresh worker's env
    "start_timeout": 300.0,   # s; a worker not ready by then (a hang while it builds its env) is started again
    "start_retries": 2,       # start-up restarts of one worker in a row before the run stops with an error
    "start_method": "forkserver",  # env workers fork from one process that imported torch and
                                   # torchrl once ("spawn": each worker imports them again)
}


def openvla_stages(image: torch.Tensor, stages: tuple, image_size: int, jpeg_quality: int | None,
                   center_crop: bool, device: torch.device | None = None) -> torch.Tensor:
    """The ``stages`` of OpenVLA's image pipeline on flipped renders uint8 [..., 3, R, R]:
    "jpeg" (the round-trip, when ``jpeg_quality`` is set), "resize" (Lanczos3 to ``image_size``,
    then the centre crop), the latter on ``device`` when given."""
    if "jpeg" in stages and jpeg_quality is not None:
        image = jpeg_roundtrip(image, jpeg_quality)
    if "resize" in stages:
        home = image.device
        if device is not None:
            image = image.to(device, non_blocking=True)
        image = resize_and_crop(image, image_size, center_crop).to(home)
    return image


def libero_action(action: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                  binarize: bool = True) -> torch.Tensor:
    """OpenVLA's LIBERO action convention -> LIBERO's.

    The policy's last action dimension is OpenVLA's gripper value (1 = open, 0 = close; the
    decoded bin centre, not de-normalised). LIBERO wants -1 = open, +1 = close. As OpenVLA's
    evaluation code: g -> 2g - 1 (to [-1, 1]), binarised with sign, then inverted. All
    dimensions are finally clipped to the sim's action bounds ``low``, ``high``."""
    action = action.clone()
    g = 2.0 * action[..., -1] - 1.0
    if binarize:
        g = torch.where(g >= 0, 1.0, -1.0)  # sign, with 0 -> +1 (open) as np.sign never returns 0 here
    action[..., -1] = -g
    return action.clamp(low.to(action.device), high.to(action.device))


class OpenVLAObservation(Transform):
    """The main process's half of the pipeline when the LIBERO option ``image_device`` is set:
    ``openvla_stages`` on the batched images of all envs (default ``stages``: the whole pipeline).
    In lock-step stepping it does not beat resizing in the workers, which wait while the main
    process works (docs/benchmarks.md)."""

    def __init__(self, image_size: int = 224, jpeg_quality: int | None = 95, center_crop: bool = True,
                 in_keys=(("observation", "image"),), stages=("jpeg", "resize"), device=None):
        super().__init__(in_keys=list(in_keys), out_keys=list(in_keys))
        self.image_size, self.jpeg_quality, self.center_crop = image_size, jpeg_quality, center_crop
        self.stages, self.device = tuple(stages), None if device is None else torch.device(device)

    def _apply_transform(self, image: torch.Tensor) -> torch.Tensor:
        return openvla_stages(image, self.stages, self.image_size, self.jpeg_quality, self.center_crop,
                              self.device)

    def _reset(self, tensordict, tensordict_reset):
        return self._call(tensordict_reset)

    def transform_observation_spec(self, observation_spec):
        if "resize" not in self.stages:
            return observation_spec
        for key in self.in_keys:
            spec = observation_spec[key]
            observation_spec[key] = spec.__class__(
                shape=(*spec.shape[:-2], self.image_size, self.image_size), dtype=spec.dtype, device=spec.device)
        return observation_spec


class OpenVLALiberoEnv(InitStateLiberoEnv):
    """One worker's env: LIBERO as OpenVLA's evaluation sees it. Every frame read goes through
    ``image_stages`` of OpenVLA's image pipeline (so the observation spec has the pipeline's
    shape); the action spec is OpenVLA's (gripper in [0, 1]) and each step's action is mapped
    to LIBERO's by ``libero_action``.

    Done here rather than as torchrl ``Transform``s in a ``TransformedEnv`` around the env: that
    plumbing costs about as much as the Lanczos3 resize on every step of every worker on a small
    CPU (bench/libero_env_breakdown.py, docs/benchmarks.md)."""

    def __init__(self, *args, image_size: int = 224, jpeg_quality: int | None = 95, center_crop: bool = True,
                 image_stages=("jpeg", "resize"), binarize_gripper: bool = True, proprio: str = "quat", **kwargs):
        # read by _make_specs, which LiberoEnv's constructor calls
        self._image = dict(stages=tuple(image_stages), image_size=image_size, jpeg_quality=jpeg_quality,
                           center_crop=center_crop)
        self.binarize_gripper = binarize_gripper
        self.proprio = proprio
        super().__init__(*args, **kwargs)

    def _read_image(self, image: np.ndarray) -> torch.Tensor:
        return openvla_stages(super()._read_image(image), **self._image)

    def _read_state(self, obs: dict) -> torch.Tensor:
        """``proprio: axis_angle``: OpenVLA-OFT's LIBERO state, eef position, the eef quaternion
        as axis-angle (robosuite's ``quat2axisangle``, as OFT's evaluation), gripper qpos."""
        if self.proprio == "quat":
            return super()._read_state(obs)
        from robosuite.utils.transform_utils import quat2axisangle

        parts = (obs["robot0_eef_pos"], quat2axisangle(np.array(obs["robot0_eef_quat"], dtype=np.float64)),
                 obs["robot0_gripper_qpos"])
        return torch.from_numpy(np.concatenate(parts)).to(torch.float32)

    def _make_specs(self, env) -> None:
        super()._make_specs(env)
        spec = self.action_spec  # the sim's bounds; the policy-facing space has OpenVLA's gripper
        self.sim_low, self.sim_high = spec.space.low.clone(), spec.space.high.clone()
        low, high = self.sim_low.clone(), self.sim_high.clone()
        low[..., -1], high[..., -1] = 0.0, 1.0
        self.action_spec = Bounded(low=low, high=high, shape=spec.shape, dtype=spec.dtype, device=spec.device)

    def _step(self, tensordict):
        action = libero_action(tensordict.get("action"), self.sim_low, self.sim_high, self.binarize_gripper)
        return super()._step(TensorDict({"action": action}, batch_size=[]))


def worker_env(suite: str, task_id: int, *, seed: int, max_steps: int, init_state_id: int | None,
               render_gpu: int | None, options: dict, init_state_queues=None, worker_index: int = 0):
    """One LIBERO env process: ``OpenVLALiberoEnv`` (init-state choice, the ``init_state_id``
    observation, OpenVLA's observation and action conventions)."""
    setup_libero()
    cameras = ["agentview"] + (["robot0_eye_in_hand"] if options["wrist_camera"] else [])
    env = OpenVLALiberoEnv(
        suite, task_id, num_workers=1, camera_height=options["render_size"],
        camera_width=options["render_size"], render_gpu_device_id=render_gpu,
        # render only what is read (each camera is a full render); a soft reset reuses the compiled
        # model: the same object and fixture layout for the same numpy state (docs/benchmarks.md)
        env_kwargs={"camera_names": cameras, "hard_reset": options["hard_reset"]},
        wrist_camera="robot0_eye_in_hand" if options["wrist_camera"] else None,
        # episode ids beyond the suite's 50 states wrap around; training: the curriculum's queue or uniform
        pinned_init_state=init_state_id, init_state_queues=init_state_queues, worker_index=worker_index,
        max_episode_steps=max_steps, settle_steps=options["settle_steps"],
        image_size=options["image_size"], jpeg_quality=options["jpeg_quality"], center_crop=options["center_crop"],
        image_stages=("jpeg",) if options["image_device"] is not None else ("jpeg", "resize"),
        binarize_gripper=options["binarize_gripper"], proprio=options["proprio"])
    env.set_seed(seed)
    return env


def libero_options(params: dict, where: str = "data.stream[i]") -> dict:
    unknown = set(params) - set(LIBERO_OPTIONS)
    if unknown:
        raise ValueError(f"{where}.{sorted(unknown)[0]}={params[sorted(unknown)[0]]!r}: unknown LIBERO option "
                         f"(known: {', '.join(LIBERO_OPTIONS)})")
    options = {**LIBERO_OPTIONS, **params}
    device = options["image_device"]
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"{where}.image_device={device!r}: not a torch device (null, cpu, cuda, cuda:0)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{where}.image_device={options['image_device']!r}: no CUDA device on this machine")
    spares = options["spare_envs"]
    if not isinstance(spares, int) or isinstance(spares, bool) or spares < 0:
        raise ValueError(f"{where}.spare_envs={spares!r}: expected an integer >= 0")
    if options["proprio"] not in ("quat", "axis_angle"):
        raise ValueError(f"{where}.proprio={options['proprio']!r}: expected quat or axis_angle")
    if options["start_method"] not in ("forkserver", "spawn"):
        raise ValueError(f"{where}.start_method={options['start_method']!r}: expected forkserver or spawn")
    return options


def render_gpu_ids() -> list[int]:
    """The GPUs the EGL env workers render on. Under multi-process training (DDP, one GPU per
    rank, which Lightning makes the rank's current device) only the rank's own GPU, so that every
    rank's renders and their GPU memory stay on its GPU; in one process every visible GPU,
    round-robin over the workers. No CUDA: none (software rendering)."""
    if not torch.cuda.is_available():
        return []
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return [torch.cuda.current_device()]
    return list(range(torch.cuda.device_count()))


def make_libero_env(suite: str, task_id: int | list[int], num_envs: int, seed: int | list[int],
                    max_steps: int | None = None, init_state_ids: list[int] | None = None,
                    options: dict | None = None, init_state_queues=None):
    """``num_envs`` LIBERO workers on one task (a list: worker i runs ``task_id[i % K]``, joint
    training); ``init_state_ids`` (evaluation) pins worker i to that init state, else training
    resets take the curriculum's ``init_state_queues`` (datamodules/init_states.py) or draw one at random.
    ``seed``: worker i gets ``seed + 1000 i``, or ``seed[i]`` from a list. A worker's seed also
    places the fixtures (stove, cabinet, rack: up to ~1 cm apart between seeds), which LIBERO's
    stored initial states leave out: they hold the robot's and the movable objects' state."""
    renderer = setup_libero()
    options = libero_options(options or {})
    max_steps = max_steps or SUITES[suite][1]
    gpus = render_gpu_ids() if renderer == "egl" else []
    # spares draw their own initial states: none where the states are given (evaluation's pinned
    # ids and queues; a curriculum's queues, which the datamodule refuses together with spares)
    spares = options["spare_envs"] if init_state_ids is None and init_state_queues is None else 0
    tasks = [task_id[i % len(task_id)] if isinstance(task_id, list) else task_id for i in range(num_envs + spares)]
    first_seed = seed[0] if isinstance(seed, list) else seed
    makers = [functools.partial(
        worker_env, suite, tasks[i],
        seed=seed[i] if isinstance(seed, list) and i < num_envs else first_seed + 1_000 * i, max_steps=max_steps,
        init_state_id=None if init_state_ids is None else int(init_state_ids[i]),
        render_gpu=gpus[i % len(gpus)] if gpus else None, options=options,
        init_state_queues=init_state_queues, worker_index=i) for i in range(num_envs + spares)]
    pool = RobustEnvPool(makers[:num_envs], step_timeout=options["step_timeout"],
                         reset_timeout=options["reset_timeout"], start_method=options["start_method"],
                         start_timeout=options["start_timeout"], start_retries=options["start_retries"],
                         spare_makers=makers[num_envs:], groups=tasks)  # a spare serves a slot of its task
    if options["image_device"] is None:
        return pool
    keys = [("observation", "image")] + ([("observation", "wrist_image")] if options["wrist_camera"] else [])
    return TransformedEnv(pool, OpenVLAObservation(options["image_size"], options["jpeg_quality"],
                                                   options["center_crop"], in_keys=keys, stages=("resize",),
                                                   device=options["image_device"]))

