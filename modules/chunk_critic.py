"""CRL-VLA's Q variant for action-chunk policies (OpenVLA-OFT): Q(s, chunk, g).

    Q(s, a, g) = MLP([phi(s); emb(g); a])     a = the K x D chunk the env executes
                                               (clipped to the policy's bounds), flattened
    E_{a ~ pi(.|s,g)} Q(s, a, g) ~ (1/M) sum_m Q(s, a_m, g),  a_m ~ Laplace(mu, b)

The chunk enters as continuous numbers (a token Q critic one-hot encodes its action tokens:
modules/critics.py). The policy's distribution over a chunk is a product of K x D Laplace
distributions (modules/policy/oft_vla.py), so the baseline E_pi Q has no closed form through
an MLP; it is a Monte-Carlo mean over ``baseline_samples`` chunks drawn from it (the rollout
keeps the distribution's parameters ``(mu, log b)``, so no backbone pass is needed).
With ``q_advantage: q`` the advantage is Q(s, a, g) - E_pi Q(s, ., g), as for token policies.
"""
from __future__ import annotations

import torch

from modules.critics import GoalConditionedCritic
from modules.policy.laplace import laplace_sample


class ChunkQCritic(GoalConditionedCritic):
    """Q(s, chunk, g) for chunks [B, K, D] in the policy's normalised action space."""

    def __init__(self, feature_dim: int, hidden_sizes: list[int], chunk_size: int, action_dim: int,
                 action_low: torch.Tensor, action_high: torch.Tensor, baseline_samples: int = 8,
                 goal_dim: int | None = None):
        """``action_low`` / ``action_high`` [D]: the clip the env applies (±inf: none)."""
        super().__init__(feature_dim, list(hidden_sizes), action_width=chunk_size * action_dim, goal_dim=goal_dim)
        self.chunk_size, self.action_dim, self.baseline_samples = chunk_size, action_dim, baseline_samples
        self.register_buffer("action_low", action_low.detach().clone().float(), persistent=False)
        self.register_buffer("action_high", action_high.detach().clone().float(), persistent=False)

    def forward(self, phi, emb, tokens=None):
        if tokens is None or tokens.shape[1:] != (self.chunk_size, self.action_dim):
            shape = None if tokens is None else tuple(tokens.shape)
            raise ValueError(f"a chunk Q critic needs chunks [B, {self.chunk_size}, {self.action_dim}], got {shape}")
        a = torch.maximum(torch.minimum(tokens.to(phi.dtype), self.action_high), self.action_low)
        return self.net(torch.cat([phi, emb, a.flatten(1)], -1)).squeeze(-1)

    def state_value(self, phi, emb, token_log_probs=None):
        """E_{a~pi} Q(s, a, g) from ``token_log_probs`` [B, K, D, 2] = (mu, log b)."""
        b, m = phi.shape[0], self.baseline_samples
        mu, log_b = (t.unsqueeze(1).expand(b, m, *t.shape[1:]) for t in token_log_probs.unbind(-1))
        draws = laplace_sample(mu, log_b).reshape(b * m, self.chunk_size, self.action_dim)
        q = self(phi.repeat_interleave(m, 0), emb.repeat_interleave(m, 0), draws)
        return q.view(b, m).mean(-1)
