"""Goal-conditioned value heads (CRL-VLA's GCVF): V(s, g) = MLP([phi(s); emb(g)]).

phi(s) and emb(g) come from the policy's own forward (TokenVLAPolicy), so a critic is only
this small MLP. The trainable MC critic and the frozen anchor critic are two instances.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class GoalConditionedCritic(nn.Module):
    def __init__(self, feature_dim: int, hidden_sizes: list[int] = (256, 256)):
        super().__init__()
        layers, width = [], 2 * feature_dim
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A fresh head for a new task (orthogonal init, small output layer, as in PPO)."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for m in linears:
            nn.init.orthogonal_(m.weight, gain=2 ** 0.5)
            nn.init.zeros_(m.bias)
        nn.init.orthogonal_(linears[-1].weight, gain=1.0)

    def forward(self, phi: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([phi, emb], -1)).squeeze(-1)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A detached, gradient-free copy (the anchor critic, the old policy of small models)."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    clone.eval()
    return clone
