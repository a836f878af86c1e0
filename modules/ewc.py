"""Online EWC (Schwarz et al. 2018, "Progress & Compress"), the parameter-space baseline.

    F_k   = E_{(s, g) ~ task k, a ~ pi(.|s, g)} [ (d log pi(a | s, g) / d theta)^2 ]   (diagonal)
    F*   <- gamma_F * F* + F_k,      theta* <- theta at the end of task k
    L_EWC = lambda / 2 * sum_i F*_i (theta_i - theta*_i)^2

The log-probs are the policy's own action log-probs (summed over action tokens); a is the
action taken in the rollout, which the policy itself sampled, so one action per state is a
Monte-Carlo estimate of the true (not the empirical) Fisher. Per-sample gradients: a loop of
batch-1 backward passes over ``fisher_samples`` states (cheap for tiny and LoRA models).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def diagonal_fisher(log_prob_of: Callable[[int], torch.Tensor], params: dict[str, nn.Parameter],
                    num_samples: int) -> dict[str, torch.Tensor]:
    """Mean over samples i < num_samples of (grad log_prob_of(i))^2, per parameter."""
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    names, tensors = list(params), list(params.values())
    for i in range(num_samples):
        grads = torch.autograd.grad(log_prob_of(i), tensors, allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                fisher[k] += g.detach().float().pow(2)
    return {k: f / max(num_samples, 1) for k, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """lambda / 2 * sum_i F_i (theta_i - theta*_i)^2 over the parameters in ``fisher``."""
    total = next(iter(params.values())).new_zeros((), dtype=torch.float32)
    for k, f in fisher.items():
        total = total + (f * (params[k].float() - anchor[k]).pow(2)).sum()
    return 0.5 * lam * total
