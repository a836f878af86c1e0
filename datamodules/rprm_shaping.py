"""VLA-RL's process reward: a frozen RPRM's score added to the sparse success reward.

    reward_t = r_sparse_t + scale * (score_t - offset) * m_t

r_sparse_t: the env's reward (or the success flag with ``sparse_from_success``);
score_t = RPRM(o_{t+1}, instruction) in [0, 1]: does the step's *result* (the next frame) complete
a sub-task; m_t = 1, or with ``only_nonterminal`` 0 on terminated steps (there the success
reward alone pays). ``offset`` (default 0, the paper's form) can centre the score so that merely
staying alive is not rewarded. The unshaped reward and the score are kept under their own keys
(``("next", "reward_sparse")``, ``("next", "rprm_score")``) so success is logged separately.

Where it applies: on a **collected rollout** (``forward`` on a [B, T] tensordict with ``"next"``):
the datamodule calls it once per iteration before the advantages, so the RPRM scores all B x T
frames in a few large no-grad batches (not one small call per env step). It also works inside
an env (``TransformedEnv(env, RPRMRewardShaping(...))``, through ``_step``), one call per step.
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import Unbounded
from torchrl.envs.transforms import Transform

from datamodules.tasks import instructions_of


class RPRMRewardShaping(Transform):
    def __init__(self, rprm, scale: float = 0.1, offset: float = 0.0, only_nonterminal: bool = False,
                 sparse_from_success: bool = False, batch_size: int = 256,
                 image_key=("observation", "image"), instruction_key="language_instruction",
                 reward_key="reward", sparse_key="reward_sparse", score_key="rprm_score",
                 terminated_key="terminated", success_key="success"):
        """``rprm``: any module with ``score(images, instructions) -> [N]`` (modules/vla_rl/rprm.py);
        it is frozen here (no grad, eval mode)."""
        super().__init__(in_keys=[image_key, instruction_key], out_keys=[reward_key, sparse_key, score_key])
        if batch_size < 1:
            raise ValueError(f"reward_shaping.batch_size={batch_size!r}: must be >= 1")
        self.rprm = rprm.requires_grad_(False).eval()
        self.scale, self.offset, self.batch_size = float(scale), float(offset), batch_size
        self.only_nonterminal, self.sparse_from_success = only_nonterminal, sparse_from_success
        self.image_key, self.instruction_key = image_key, instruction_key
        self.reward_key, self.sparse_key, self.score_key = reward_key, sparse_key, score_key
        self.terminated_key, self.success_key = terminated_key, success_key

    def train(self, mode: bool = True):
        return super().train(False)  # the RPRM stays frozen (no dropout) whatever the caller does

    @torch.no_grad()
    def _scores(self, images: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        shape = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        return self.rprm.score(flat, instructions, batch_size=self.batch_size).reshape(shape)

    def _shape(self, step: TensorDictBase, nxt: TensorDictBase) -> TensorDictBase:
        """Write the shaped reward into ``nxt`` (the t+1 data); the instruction is read at t."""
        if self.sparse_key in nxt.keys(include_nested=True):
            sparse = nxt.get(self.sparse_key)  # already shaped once: start again from the sparse reward
        elif self.sparse_from_success:
            sparse = nxt.get(self.success_key).to(nxt.get(self.reward_key).dtype)
        else:
            sparse = nxt.get(self.reward_key)
        score = self._scores(nxt.get(self.image_key), instructions_of(step, self.instruction_key))
        score = score.to(sparse.device, sparse.dtype).reshape(sparse.shape)
        bonus = self.scale * (score - self.offset)
        if self.only_nonterminal:
            bonus = bonus * (~nxt.get(self.terminated_key)).to(bonus.dtype)
        nxt.set(self.sparse_key, sparse.clone())
        nxt.set(self.score_key, score)
        nxt.set(self.reward_key, sparse + bonus)
        return nxt

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """A collected rollout (any batch shape, e.g. [B, T]) with ``"next"``: shaped in place."""
        self._shape(tensordict, tensordict.get("next"))
        return tensordict

    # -- inside an env -------------------------------------------------------------------------
    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._shape(tensordict, next_tensordict)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        zeros = torch.zeros(*tensordict_reset.batch_size, 1, device=tensordict_reset.device)
        tensordict_reset.set(self.sparse_key, zeros)
        tensordict_reset.set(self.score_key, zeros.clone())
        return tensordict_reset

    def transform_observation_spec(self, observation_spec):
        shape = (*observation_spec.shape, 1)
        for key in (self.sparse_key, self.score_key):
            observation_spec[key] = Unbounded(shape=shape, device=observation_spec.device)
        return observation_spec
