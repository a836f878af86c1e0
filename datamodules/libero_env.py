"""torchrl's ``LiberoEnv`` with the kit's init-state choice (datamodules/init_states.py), the
episode's init-state id as an observation, and a cheaper step (only the observables it reads
are computed; frames read in one copy).

Every reset runs in torchrl's ``"fixed"`` mode with ``init_state_id`` set just before it from an
``InitStateChooser``: the curriculum's queue for this worker, else the pinned id (evaluation),
else a uniform draw from the env's own generator, the same draw torchrl's ``"random"`` mode
makes. Where the queues carry scene seeds (evaluation), numpy, which places the fixtures at a
reset, is seeded with ``scene seed + init_state_id`` just before it. ``init_state_id`` (int64
[1]) is the index of the stored state the current episode started from, read back from
``LiberoEnv`` after the reset (on reset and on every step, so ``("next", "init_state_id")`` at a
``done`` names the episode that ended).
"""
from __future__ import annotations

import numpy as np
import torch
from torchrl.data import Unbounded
from torchrl.envs import LiberoEnv

from datamodules.init_states import KEY, InitStateChooser, InitStateQueues


def chw_frame(image: np.ndarray, flip: bool = True) -> torch.Tensor:
    """HWC render -> CHW uint8, flipped 180 degrees with ``flip``: the tensor torchrl's
    ``LiberoWrapper._read_image`` returns (tests/test_libero.py), in one strided copy instead of
    its two (flip, then ``permute(2, 0, 1).contiguous()``), on every env step of every worker."""
    chw = image.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw[:, ::-1, ::-1] if flip else chw))


class InitStateLiberoEnv(LiberoEnv):  # the metaclass builds subclasses directly (one worker)
    def __init__(self, *args, pinned_init_state: int | None = None,
                 init_state_queues: InitStateQueues | None = None, worker_index: int = 0, **kwargs):
        super().__init__(*args, init_state_mode="fixed", **kwargs)
        # robosuite updates every observable on every step (each object's pose and its pose
        # relative to the gripper, joint angles and velocities, ...); the TensorDict carries
        # only the camera image(s) and ``proprio_keys``, so the rest are switched off:
        # bench/libero_env_breakdown.py
        self.read_keys = {f"{self.camera}_image", *self.proprio_keys}
        if self.wrist_camera is not None:
            self.read_keys.add(f"{self.wrist_camera}_image")
        sim_env = self._env.env
        for name in list(sim_env._observables):
            if name not in self.read_keys:
                sim_env.modify_observable(name, "enabled", False)
        self.chooser = InitStateChooser(len(self.init_states), pinned_init_state, self._rng,
                                        init_state_queues, worker_index)
        self.init_state_id = self.chooser.pinned or 0

    def _make_specs(self, env) -> None:
        super()._make_specs(env)
        self.observation_spec[KEY] = Unbounded(shape=(1,), dtype=torch.int64, device=self.device)

    def _read_image(self, image: np.ndarray) -> torch.Tensor:
        return chw_frame(image, self.flip_image)

    def _read_obs(self, obs: dict, *, success: bool):
        out = super()._read_obs(obs, success=success)
        current = self._current_init_state_index
        out.set(KEY, torch.tensor([-1 if current is None else current], dtype=torch.int64))
        return out

    def _reset(self, tensordict=None, **kwargs):
        self.init_state_id = self.chooser.next()
        scene = self.chooser.scene_seed()
        if scene is not None:  # evaluation: the fixtures' placement from (seed, state id) alone
            self._env.seed(scene + self.init_state_id)
        # robosuite's grippers ramp from their last command; a hard reset rebuilds the gripper
        # models (command at rest), a soft one keeps them: start every episode at rest
        # (tests/test_libero.py)
        for robot in self._env.env.robots:
            robot.gripper.current_action = np.zeros_like(robot.gripper.current_action)
        return super()._reset(tensordict, **kwargs)
