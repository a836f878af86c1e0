"""The OFT action head as a stochastic policy: a per-dimension Laplace distribution.

OpenVLA-OFT (Kim et al., arXiv 2502.19645) regresses the action chunk with an L1 loss; the
L1 loss is the negative log-likelihood of a Laplace distribution with a fixed scale, so the
natural stochastic policy around the regressed mean mu is Laplace(mu, b) per dimension:

    log p(x)              = -log(2 b) - |x - mu| / b
    H                     = 1 + log(2 b)
    KL(L(m1,b1) || L(m2,b2)) = log(b2 / b1) + |m1 - m2| / b2 + (b1 / b2) exp(-|m1 - m2| / b1) - 1

Every function takes ``log_b`` (the parametrisation that is learned) and works elementwise;
the policy sums over the chunk's steps and dimensions.
"""
from __future__ import annotations

import math

import torch
from torch import nn

LOG2 = math.log(2.0)


def laplace_log_prob(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    return -log_b - LOG2 - (x - mu).abs() * torch.exp(-log_b)


def laplace_entropy(log_b: torch.Tensor) -> torch.Tensor:
    return 1.0 + LOG2 + log_b


def laplace_kl(mu1, log_b1, mu2, log_b2) -> torch.Tensor:
    """KL(Laplace(mu1, b1) || Laplace(mu2, b2)), elementwise."""
    d = (mu1 - mu2).abs()
    return (log_b2 - log_b1 + d * torch.exp(-log_b2)
            + torch.exp(log_b1 - log_b2 - d * torch.exp(-log_b1)) - 1.0)


def laplace_sample(mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw (as torch.distributions.Laplace): mu - b sign(u) log(1 - |u|), u ~ U(-1, 1)."""
    eps = torch.finfo(mu.dtype).eps
    u = (2 * torch.rand_like(mu) - 1).clamp(eps - 1, 1 - eps)
    return mu - torch.exp(log_b) * u.sign() * torch.log1p(-u.abs())


class MLPResNet(nn.Module):
    """OFT's action MLP: LayerNorm -> Linear -> ReLU -> residual (LayerNorm, Linear, ReLU)
    blocks -> LayerNorm -> Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, blocks: int = 2):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU())
                                    for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


class LaplaceChunkHead(nn.Module):
    """Hidden states of the K x D action placeholders -> (mu, log b), each [B, K, D].

    As OFT's ``L1RegressionActionHead``: the D placeholder states of one chunk step are
    concatenated ([B, K, D * H]) and one MLPResNet maps them to that step's D means. The
    scale b is learned and state-independent (one per chunk step and dimension), as the
    log-std of PPO's Gaussian policies. ``slots``: the input embeddings of the placeholders
    (zeros at init: OFT's "empty action embeddings"; trainable unless ``learned_slots``
    is False)."""

    def __init__(self, hidden_size: int, chunk_size: int, action_dim: int, head_hidden: int = 256,
                 head_blocks: int = 2, init_scale: float = 0.1, learned_slots: bool = True):
        super().__init__()
        self.chunk_size, self.action_dim = chunk_size, action_dim
        self.mlp = MLPResNet(action_dim * hidden_size, head_hidden, action_dim, head_blocks)
        self.log_scale = nn.Parameter(torch.full((chunk_size, action_dim), math.log(init_scale)))
        self.slots = nn.Parameter(torch.zeros(chunk_size * action_dim, hidden_size),
                                  requires_grad=learned_slots)

    def forward(self, hidden: torch.Tensor):
        b = hidden.shape[0]
        mu = self.mlp(hidden.float().reshape(b, self.chunk_size, -1))
        return mu, self.log_scale.expand_as(mu)
