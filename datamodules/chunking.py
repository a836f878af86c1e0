"""Action chunks executed step by step: one policy decision = one macro step of the RL problem.

An OFT-style policy (modules/policy/oft_vla.py) predicts a chunk of K actions at once
(OpenVLA-OFT executes them open-loop before querying the policy again). ``ChunkedActionEnv``
wraps a batched TorchRL env so that the chunk is *one* transition for the collector, GAE and
PPO:

* an action ``[*B, K, D]`` steps the inner env K times (action k at inner step k);
* the macro reward is the **undiscounted sum** of the executed inner rewards;
* an env that is done at inner step k < K executes no further action of its chunk: later inner
  steps carry ``_step`` = False for it (envs that honour partial steps skip it), and whatever
  an env that ignores ``_step`` returns for it afterwards is discarded: its reward no longer
  counts and its ``next`` entries (observation, done flags, ``success``, ...) stay those of the
  step where it finished. So the macro step returns each env's last *executed* observation;
* an action ``[*B, D]`` (one per step, e.g. a token VLA) passes through as one inner step.

Consequences for the RL problem (documented choice): the discount ``gamma`` applies per macro
step (per policy decision), i.e. an effective per-env-step discount of gamma^(1/K); with a
sparse success reward the macro reward is 1 on the chunk where the task is solved. The
executed length of the last chunk of an episode is not recorded: its log-prob still covers
all K x D dimensions (the unexecuted tail has zero expected contribution to the gradient).

A wrapper rather than torchrl's ``MultiAction`` transform: MultiAction stacks per-step rewards
(ragged at a done inside the chunk) and, over batched envs (SerialEnv/ParallelEnv), keeps the
stale reward of a finished env in the skipped slots, so summing its stack double-counts a
success reward (checked on torchrl 0.14). Transforms placed *inside* (StepCounter,
SuccessReward, image transforms) run at every inner step.
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import NonTensor
from torchrl.envs import EnvBase
from torchrl.envs.utils import step_mdp


class ChunkedActionEnv(EnvBase):
    """``env`` (batched, batch-locked) executing ``[*B, K, D]`` action chunks as macro steps."""

    def __init__(self, env: EnvBase):
        super().__init__(device=env.device, batch_size=env.batch_size)
        self.env = env
        self.full_observation_spec = env.full_observation_spec.clone()
        self.full_reward_spec = env.full_reward_spec.clone()
        self.full_done_spec = env.full_done_spec.clone()
        self.full_action_spec = env.full_action_spec.clone()
        self.full_state_spec = env.full_state_spec.clone()
        if len(env.action_keys) != 1 or len(env.reward_keys) != 1:
            raise ValueError("ChunkedActionEnv: the inner env must have one action and one reward entry")
        self._action_key, self._reward_key = env.action_keys[0], env.reward_keys[0]
        # entries frozen for an env once it is done inside a chunk (non-tensor data is constant)
        self._kept = [k for k, s in list(env.full_observation_spec.items(True, True))
                      + list(env.full_done_spec.items(True, True)) if not isinstance(s, NonTensor)]

    @property
    def action_dim(self) -> int:
        return self.full_action_spec[self._action_key].shape[-1]

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        return self.env.reset(tensordict, **kwargs)

    def _set_seed(self, seed: int | None) -> None:
        self.env.set_seed(seed)

    def close(self, *, raise_if_closed: bool = True) -> None:
        self.env.close(raise_if_closed=raise_if_closed)
        super().close(raise_if_closed=raise_if_closed)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = tensordict.get(self._action_key)
        nb = len(self.batch_size)
        cur = tensordict.exclude("next", "_step")
        if actions.ndim == nb + 1:  # one action: one inner step
            return self.env.step(cur).get("next")
        if actions.ndim != nb + 2 or actions.shape[-1] != self.action_dim:
            d, shape = self.action_dim, tuple(actions.shape)
            raise ValueError(f"ChunkedActionEnv: action of shape {shape}; expected [*batch, K, {d}] or "
                             f"[*batch, {d}] with batch={tuple(self.batch_size)}")
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=actions.device)
        total = kept = out = None
        for k in range(actions.shape[nb]):
            cur.set(self._action_key, actions[..., k, :])
            if finished.any():
                cur.set("_step", ~finished)
            cur = self.env.step(cur)
            out = cur.get("next")
            reward = out.get(self._reward_key)
            live = ~_expand(finished, reward)
            total = reward * live if total is None else total + reward * live
            now = out.select(*self._kept)
            kept = now if kept is None else kept.apply(
                lambda old, new, done=finished: torch.where(_expand(done, new), old, new), now)
            finished = finished | out.get("done").reshape(finished.shape)
            if bool(finished.all()):
                break
            cur = step_mdp(cur, keep_other=True, exclude_action=False)
            cur.pop("_step", None)
        out = out.clone(False)
        out.update(kept)
        out.set(self._reward_key, total)
        return out


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[*B] mask viewed to broadcast against a [*B, ...] tensor."""
    return mask.to(like.device).reshape(*mask.shape, *([1] * (like.ndim - mask.ndim)))
