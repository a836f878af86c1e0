"""The frozen anchor critics: one goal-conditioned head per finished stage of the stream.

At the end of stage k the trainable critic, trained on that stage's goal(s) only, is copied
and frozen as head k; the anchor target of an old goal g_i is computed by the head of the
stage that trained on g_i (the datamodule keeps the goal -> head map, ``anchor_heads``).

Why one head per stage and not one copied head: a critic trained on stage k's goal has never
seen the goals before it, so a single head overwritten at every boundary gives goals
0..k-1 targets from a head that was never trained on them (from the third task on). Heads
are small MLPs on the shared features, so keeping all of them costs K x (a few 10k)
parameters; the backbone is shared, so L_GCV still anchors the features, as in the paper.

A later stage that trains on a goal again (a repeated task) moves that goal to the newer
head: the newest policy's value on it is the one to keep.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from modules.critics import GoalConditionedCritic, frozen_copy


class AnchorCritics(nn.ModuleList):
    """Frozen heads, indexed by the stage that trained them."""

    def add(self, critic: nn.Module) -> int:
        """Freeze a copy of ``critic`` as the next head; returns its index."""
        self.append(frozen_copy(critic))
        return len(self) - 1

    def ensure(self, count: int, template: nn.Module) -> None:
        """Create heads up to ``count`` (copies of ``template``), e.g. before loading a checkpoint."""
        while len(self) < count:
            self.add(template)

    @staticmethod
    def count_in(state_dict_keys, prefix: str = "anchor_critics.") -> int:
        """How many heads a state dict holds."""
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = [int(m.group(1)) for k in state_dict_keys if (m := pattern.match(k))]
        return max(found) + 1 if found else 0

    @staticmethod
    def rename_single_anchor(state_dict: dict) -> None:
        """A checkpoint with one ``anchor_critic`` (written before heads were kept per stage):
        its head becomes head 0, in place."""
        for k in [k for k in state_dict if k.startswith("anchor_critic.")]:
            state_dict["anchor_critics.0." + k[len("anchor_critic."):]] = state_dict.pop(k)

    def _per_head(self, fn, head: torch.Tensor, n: int, *args) -> torch.Tensor:
        """``fn(head_module, *args[rows])`` for the rows of each head, scattered back in order."""
        out = None
        for h in head.unique().tolist():
            rows = (head == h).nonzero().squeeze(-1)
            value = fn(self[h], *(None if a is None else a[rows] for a in args))
            if out is None:
                out = value.new_zeros(n)
            out = out.index_put((rows,), value)
        return out

    def forward(self, phi, emb, tokens, head: torch.Tensor, token_log_probs=None) -> torch.Tensor:
        """Head ``head[b]``'s value (V, or Q of the given action) for each row b."""
        return self._per_head(lambda m, *a: m(*a), head, len(phi), phi, emb, tokens, token_log_probs)

    def advantage(self, phi, emb, tokens, head: torch.Tensor, token_log_probs) -> torch.Tensor | None:
        """A_old(s, a, g) = Q_head(s, a, g) - E_{a'~pi} Q_head(s, a', g) with pi the given
        distribution (Q heads: token, dueling or chunk); None for V heads (no action, so no advantage)."""
        if not len(self) or type(self[0]) is GoalConditionedCritic:
            return None
        return self._per_head(lambda m, p, e, t, lp: m(p, e, t, lp) - m.state_value(p, e, lp),
                              head, len(phi), phi, emb, tokens, token_log_probs)
