"""A continuous-action task on torchrl's ``ToyVLAEnv`` (tracking mode), for OFT-style policies
on CPU: the env kind ``toy_vla``.

ToyVLAEnv samples a target action in [-0.5, 0.5]^D per episode; the episode succeeds (and
terminates) once the executed action stays within ``success_tol`` (infinity norm) of the
target for ``success_steps`` consecutive steps. Its ``("observation", "image")`` is random
noise, so here the policy's image is the env's own rendering instead (``from_pixels``: the
target as a green marker and the last executed action as a red one, from the first two
action dimensions): the task is solvable from the image when ``action_dim`` is 2.

Per env step (inside the chunk executor): ``SuccessReward`` (sparse binary reward, as
CRL-VLA) unless ``reward: tracking`` (ToyVLAEnv's dense -||a - target||), and ``StepCounter``
(truncation after ``max_steps`` env steps). Outside: ``ChunkedActionEnv`` (one [K, D] action
chunk = one macro step; a [D] action is one step).

All tasks of a stream share the dynamics and differ only in the instruction: a plumbing env
for the kit (policy, collector, CRL losses), not a continual-learning benchmark.
"""
from __future__ import annotations

import torch
from torchrl.data import Unbounded
from torchrl.envs import Compose, ExcludeTransform, StepCounter, Transform, TransformedEnv
from torchrl.envs.custom import ToyVLAEnv
from torchrl.envs.transforms import SuccessReward

from datamodules.chunking import ChunkedActionEnv

TOY_VLA_OPTIONS = {
    "instruction": "move to the green target",
    "action_dim": 2,
    "success_steps": 1,
    "success_tol": 0.25,
    "image_size": 56,
    "reward": "success",  # or "tracking"
}
DEFAULT_MAX_STEPS = 32


def parse_toy_vla(where: str, entry: dict) -> tuple[int | None, dict]:
    """A stream entry (``env`` and ``chunked`` already taken) -> (max_steps, all options)."""
    entry = dict(entry)
    max_steps = entry.pop("max_steps", None)
    bad_steps = isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    if max_steps is not None and bad_steps:
        raise ValueError(f"{where}.max_steps={max_steps!r}: must be a positive integer (env steps)")
    unknown = sorted(set(entry) - set(TOY_VLA_OPTIONS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}={entry[unknown[0]]!r}: unknown toy_vla option "
                         f"(known: max_steps, chunked, {', '.join(TOY_VLA_OPTIONS)})")
    opts = {**TOY_VLA_OPTIONS, **entry}
    checks = {
        "instruction": isinstance(opts["instruction"], str) and opts["instruction"].strip(),
        "action_dim": isinstance(opts["action_dim"], int) and opts["action_dim"] >= 1,
        "success_steps": isinstance(opts["success_steps"], int) and opts["success_steps"] >= 1,
        "success_tol": isinstance(opts["success_tol"], (int, float)) and 0 < opts["success_tol"] <= 0.5,
        "image_size": isinstance(opts["image_size"], int) and opts["image_size"] >= 8,
        "reward": opts["reward"] in ("success", "tracking"),
    }
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{where}.{name}={opts[name]!r}: invalid (default {TOY_VLA_OPTIONS[name]!r})")
    return max_steps, opts


class PixelsAsImage(Transform):
    """The rendered ``pixels`` [*B, S, S, 3] become ``("observation", "image")`` [*B, 3, S, S]."""

    def __init__(self):
        super().__init__(in_keys=["pixels"], out_keys=[("observation", "image")])

    def _apply_transform(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.movedim(-1, -3).contiguous()

    def _reset(self, tensordict, tensordict_reset):
        return self._call(tensordict_reset)

    def transform_observation_spec(self, observation_spec):
        spec = observation_spec["pixels"]
        *batch, s, _, c = spec.shape
        observation_spec["observation", "image"] = Unbounded(shape=(*batch, c, s, s), dtype=spec.dtype,
                                                             device=spec.device)
        return observation_spec


def make_toy_vla_env(num_envs: int, seed: int, max_steps: int | None = None, options: dict | None = None,
                     chunked: bool = True):
    """``num_envs`` ToyVLAEnv copies (one batched env); ``chunked``: wrapped in ChunkedActionEnv."""
    _, opts = parse_toy_vla("toy_vla", options or {})
    d = opts["action_dim"]
    env = ToyVLAEnv(action_dim=d, state_dim=2 * d, instruction=opts["instruction"], from_pixels=True,
                    render_size=opts["image_size"], success_steps=opts["success_steps"],
                    success_tol=float(opts["success_tol"]), batch_size=[num_envs], seed=seed)
    transforms = [PixelsAsImage(), ExcludeTransform("pixels"), StepCounter(max_steps or DEFAULT_MAX_STEPS)]
    if opts["reward"] == "success":
        transforms.append(SuccessReward())
    env = TransformedEnv(env, Compose(*transforms))
    return ChunkedActionEnv(env) if chunked else env
