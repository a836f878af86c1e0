"""The acting side of the policy as a TensorDict module, for TorchRL collectors."""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager, nullcontext

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from datamodules.tasks import instructions_of
from modules.policy.lora import active_adapter
from modules.timing import phase


class RolloutPolicy(TensorDictModuleBase):
    """Reads the policy's observation (``("observation", "image")``; ``VLAPolicy.observation``) and
    ``language_instruction``; writes ``action``,
    the action tokens, their log-prob, the per-token action distribution and the features phi(s), emb(g) (kept in the rollout
    so values need no second forward)."""

    in_keys = [("observation", "image"), "language_instruction"]
    out_keys = ["action", "action_tokens", "sample_log_prob", "token_log_probs", "phi", "emb"]

    def __init__(self, policy, greedy: bool = False, temperature: float | None = None):
        """``temperature``: sample at this temperature instead of the policy's training one
        (e.g. a low-temperature evaluation); None: the policy's own."""
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature={temperature!r}: must be > 0")
        self.policy = policy
        self.greedy = greedy
        self.temperature = temperature
        self._replay: deque = deque()
        self._last_out: dict | None = None

    def replay_actions(self, actions: torch.Tensor) -> None:
        """Queue a recorded rollout's actions [envs, T, ...]: the next T calls return them instead
        of acting (a resumed run replays its env, datamodules/on_policy.py); the other outputs
        are the last real call's, which nothing reads (the replayed rollouts are dropped)."""
        self._replay.extend(actions.unbind(1))

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        if self._replay:
            if self._last_out is not None:
                td.update(self._last_out)
            action = self._replay.popleft()
            td.set("action", action if td.device is None else action.to(td.device))
            return td
        instructions = instructions_of(td)
        prompts = self.policy.encode(instructions)
        adapter = self.policy.routed_adapter(instructions)  # per-task adapters (callbacks/adapters.py)
        with active_adapter(self.policy.backbone.model, adapter) if adapter else nullcontext(), \
                _temperature(self.policy, self.temperature), phase("acting"):
            out = self.policy.act(self.policy.observation(td), prompts, greedy=self.greedy)
        td.set("action", self.policy.env_action(out.tokens))
        td.set("action_tokens", out.tokens)
        td.set("sample_log_prob", out.log_prob)
        td.set("token_log_probs", out.token_log_probs)  # pi(.|s, g) per token (Q critic's baseline)
        td.set("phi", out.phi)
        td.set("emb", out.emb)
        self._last_out = {k: td.get(k) for k in self.out_keys}
        return td


@contextmanager
def _temperature(policy, temperature: float | None):
    """The policy's sampling temperature set to ``temperature`` for the block (None: unchanged)."""
    if temperature is None:
        yield
        return
    saved = policy.temperature
    policy.temperature = temperature
    try:
        yield
    finally:
        policy.temperature = saved
