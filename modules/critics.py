"""Goal-conditioned critic heads (CRL-VLA's GCVF).

    V(s, g)    = MLP([phi(s); emb(g)])                               critic_type: v
    Q(s, a, g) = MLP([phi(s); emb(g); onehot(a)])                    critic_type: q
    Q(s, a, g) = V(s, g) + A(s, g, a) - E_{a'~pi} A(s, g, a')        critic_type: q_dueling
                 (one A output per action bin and token, A = sum over tokens, A zero-initialised)

phi(s) and emb(g) come from the policy's own forward (TokenVLAPolicy), so a critic is only
this small MLP. The trainable MC critic and the frozen anchor critics (modules/anchor_critics.py)
are instances of the same class. Every kind answers ``forward(phi, emb, tokens,
token_log_probs)`` (V ignores the action; the dueling head centres A with the given per-token
distribution pi, or uniformly without one) and ``state_value(phi, emb, token_log_probs)`` =
V(s, g), for Q: E_{a ~ pi(.|s,g)} Q(s, a, g).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class GoalConditionedCritic(nn.Module):
    """V(s, g)."""

    def __init__(self, feature_dim: int, hidden_sizes: list[int] = (256, 256), action_width: int = 0,
                 goal_dim: int | None = None):
        """``feature_dim``: width of phi(s); ``goal_dim``: of emb(g) (default: the same)."""
        super().__init__()
        layers, width = [], feature_dim + (goal_dim or feature_dim) + action_width
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

    def forward(self, phi: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor | None = None,
                token_log_probs: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(torch.cat([phi, emb], -1)).squeeze(-1)

    def state_value(self, phi, emb, token_log_probs=None) -> torch.Tensor:
        return self(phi, emb)


class GoalConditionedQCritic(GoalConditionedCritic):
    """Q(s, a, g) over token actions (``action_tokens`` tokens of ``action_bins`` bins).

    E_{a~pi} Q(s, a, g) is exact for one action token (a sum over the bins). For several
    tokens it is a Monte-Carlo mean over ``baseline_samples`` actions drawn token by token
    from the given per-token distributions (those were computed teacher-forced on the
    rollout's own prefix, so for n > 1 the estimate ignores how a different earlier token
    would change the later ones: an approximation, stated here)."""

    def __init__(self, feature_dim: int, hidden_sizes: list[int] = (256, 256), action_tokens: int = 1,
                 action_bins: int = 3, baseline_samples: int = 8, goal_dim: int | None = None):
        super().__init__(feature_dim, hidden_sizes, action_width=action_tokens * action_bins, goal_dim=goal_dim)
        self.action_tokens, self.action_bins, self.baseline_samples = action_tokens, action_bins, baseline_samples

    def forward(self, phi, emb, tokens=None, token_log_probs=None):
        if tokens is None:
            raise ValueError("a Q critic needs the action tokens")
        onehot = nn.functional.one_hot(tokens, self.action_bins).flatten(1).to(phi.dtype)
        return self.net(torch.cat([phi, emb, onehot], -1)).squeeze(-1)

    def state_value(self, phi, emb, token_log_probs=None):
        probs = token_log_probs.exp()  # [B, n, bins]
        b = phi.shape[0]
        if self.action_tokens == 1:  # exact: sum_a pi(a) Q(s, a)
            a = torch.arange(self.action_bins, device=phi.device)
            q = self(phi.repeat_interleave(self.action_bins, 0), emb.repeat_interleave(self.action_bins, 0),
                     a.repeat(b)[:, None]).view(b, self.action_bins)
            return (probs[:, 0] * q).sum(-1)
        k = self.baseline_samples
        draws = torch.multinomial(probs.reshape(-1, self.action_bins), k, replacement=True)  # [B*n, k]
        draws = draws.view(b, self.action_tokens, k).permute(0, 2, 1).reshape(b * k, self.action_tokens)
        q = self(phi.repeat_interleave(k, 0), emb.repeat_interleave(k, 0), draws)
        return q.view(b, k).mean(-1)


class DuelingQCritic(nn.Module):
    """Q(s, a, g) = V(s, g) + A(s, g, a) - E_{a'~pi} A(s, g, a'), A(s, g, a) = sum_t A_t(s, g, a_t).

    One trunk MLP on [phi(s); emb(g)], a V output and ``action_tokens x action_bins`` A outputs
    (one per token and bin). The A layer starts at zero, so a fresh head's advantage
    Q(s, a) - E_pi Q(s, .) = A(a) - E_pi A is exactly 0 and grows only as the MC regression
    fits G_t - V(s, g) per action: no noise drives the policy before Q has learned (the
    one-hot Q head's action part is random at initialisation). E_pi A is exact per token
    (a sum over the bins); for several tokens the per-token distributions are the
    teacher-forced ones, as in ``GoalConditionedQCritic``. Without a distribution A is centred
    on the uniform mean (the classic dueling head)."""

    def __init__(self, feature_dim: int, hidden_sizes: list[int] = (256, 256), action_tokens: int = 1,
                 action_bins: int = 3, goal_dim: int | None = None):
        super().__init__()
        layers, width = [], feature_dim + (goal_dim or feature_dim)
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.value = nn.Linear(width, 1)
        self.advantage = nn.Linear(width, action_tokens * action_bins)
        self.action_tokens, self.action_bins = action_tokens, action_bins
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A fresh head: orthogonal trunk (PPO's init), V output gain 1, A = 0."""
        for m in self.trunk:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight, gain=2 ** 0.5)
                nn.init.zeros_(m.bias)
        nn.init.orthogonal_(self.value.weight, gain=1.0)
        nn.init.zeros_(self.value.bias)
        self.reset_advantage()

    @torch.no_grad()
    def reset_advantage(self) -> None:
        """A = 0 again (a new task's head copied from the anchor keeps V, not the old A)."""
        nn.init.zeros_(self.advantage.weight)
        nn.init.zeros_(self.advantage.bias)

    def parts(self, phi, emb):
        """V(s, g) [B] and the per-token, per-bin A(s, g, .) [B, n, bins]."""
        h = self.trunk(torch.cat([phi, emb], -1))
        return self.value(h).squeeze(-1), self.advantage(h).view(-1, self.action_tokens, self.action_bins)

    def forward(self, phi, emb, tokens=None, token_log_probs=None):
        if tokens is None:
            raise ValueError("a Q critic needs the action tokens")
        v, a = self.parts(phi, emb)
        chosen = a.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [B, n]
        weights = token_log_probs.detach().exp() if token_log_probs is not None else torch.full_like(a, 1 / a.shape[-1])
        return v + (chosen - (weights * a).sum(-1)).sum(-1)

    def state_value(self, phi, emb, token_log_probs=None):
        return self.parts(phi, emb)[0]  # E_pi Q = V by construction


CRITIC_TYPES = ("v", "q", "q_dueling")


def make_critic(kind: str, feature_dim: int, hidden_sizes, action_tokens: int, action_bins: int,
                goal_dim: int | None = None):
    if kind == "v":
        return GoalConditionedCritic(feature_dim, list(hidden_sizes), goal_dim=goal_dim)
    if kind == "q":
        return GoalConditionedQCritic(feature_dim, list(hidden_sizes), action_tokens, action_bins, goal_dim=goal_dim)
    if kind == "q_dueling":
        return DuelingQCritic(feature_dim, list(hidden_sizes), action_tokens, action_bins, goal_dim=goal_dim)
    raise ValueError(f"model.critic_type={kind!r}: expected one of {list(CRITIC_TYPES)}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A detached, gradient-free copy (the anchor critic, the old policy of small models)."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    clone.eval()
    return clone
