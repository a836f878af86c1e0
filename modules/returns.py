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
