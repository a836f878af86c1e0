"""Binary classification metrics for the RPRM (no torchmetrics dependency)."""
from __future__ import annotations

import torch


def binary_auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counting 1/2: the Mann-Whitney U statistic from average ranks. NaN if a class is absent."""
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1).bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(float("nan"))
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # sorted values
    avg_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based ranks, ties averaged
    rank_sum = avg_rank[inverse][labels].sum()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_accuracy(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return ((probs.reshape(-1) > threshold) == labels.reshape(-1).bool()).float().mean()
