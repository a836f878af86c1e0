"""Advantages and value targets from a rollout, with torchrl's GAE.

Rollouts are [envs, T]. A *termination* cuts the bootstrap (V(s') = 0); a *truncation*
(time limit) or the end of the rollout bootstraps from V(s'), the value of the real next
observation (torchrl's ``("next", ...)`` layout keeps it before the auto-reset).
The MC return is GAE with lambda = 1 plus the value: the discounted reward-to-go, cut at
terminations and bootstrapped at truncations.
"""
from __future__ import annotations

import torch
from torchrl.objectives.value.functional import vec_generalized_advantage_estimate


def gae(reward, value, next_value, done, terminated, gamma: float, lmbda: float):
    """All inputs [envs, T]; returns (advantage, value_target = advantage + value)."""
    adv, target = vec_generalized_advantage_estimate(
        gamma, lmbda, value.unsqueeze(-1), next_value.unsqueeze(-1), reward.unsqueeze(-1),
        done.unsqueeze(-1), terminated.unsqueeze(-1), time_dim=-2)
    return adv.squeeze(-1), target.squeeze(-1)


def mc_returns(reward, value, next_value, done, terminated, gamma: float):
    return gae(reward, value, next_value, done, terminated, gamma, 1.0)[1]


class RunningStd(torch.nn.Module):
    """The running standard deviation of every value seen (Chan et al.'s parallel update of
    count, mean and M2), in buffers so checkpoints carry it. ``advantage_scaling:
    return_std`` divides advantages by the running std of the value targets (returns),
    one scale shared by every minibatch and task, instead of standardising each minibatch
    (which blows a near-zero advantage up to unit size)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        n = x.numel()
        if not n:
            return
        mean, m2 = x.mean(), ((x - x.mean()) ** 2).sum()
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.count.copy_(total)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / self.count.clamp_min(1)).sqrt()
