"""Continual-learning metrics from the success matrix (docs/method.md, "Metrics").

R[j, i] = success on task i after training through task j (0-based here), b[i] = success of
the starting model. CRL-VLA's FAR, BWT, FT, F and LIBERO's (Liu et al. 2023) FWT, NBT, AUC.
LIBERO's FWT_k averages the success on task k over the checkpoints evaluated while task k
was trained; ``in_task`` gives those evaluations (default: only the task's end, R[k, k]).
"""
from __future__ import annotations

import numpy as np


def continual_metrics(R, b, in_task: list[list[float]] | None = None) -> dict[str, float | None]:
    R = np.asarray(R, float)
    T = R.shape[0]
    last = T - 1
    out = {"FAR": float(R[last].mean())}
    # one task: nothing comes after it, so backward transfer and forgetting are undefined (None)
    out["BWT"] = float(np.mean([R[last, i] - R[i, i] for i in range(last)])) if T > 1 else None
    # forward transfer needs the starting model's success b (None: not evaluated)
    out["FT"] = float(np.mean([R[i - 1, i] - b[i] for i in range(1, T)])) if T > 1 and b is not None else None
    out["F"] = float(np.mean([R[i:, i].max() - R[last, i] for i in range(last)])) if T > 1 else None
    fwt = [float(np.mean(in_task[k])) if in_task and in_task[k] else R[k, k] for k in range(T)]
    out["FWT"] = float(np.mean(fwt))
    out["NBT"] = float(np.mean([np.mean(R[k, k] - R[k + 1:, k]) for k in range(last)])) if T > 1 else None
    out["AUC"] = float(np.mean([(fwt[k] + R[k + 1:, k].sum()) / (T - k) for k in range(T)]))
    return out


def heatmap_image(R, cell: int = 24) -> np.ndarray:
    """R in [0, 1] as a [3, H, W] uint8 image (green = success), NaN rows black."""
    R = np.nan_to_num(np.asarray(R, float), nan=-1.0)
    img = np.zeros((3,) + R.shape, np.uint8)
    seen = R >= 0
    img[1][seen] = (R[seen] * 255).astype(np.uint8)
    img[0][seen] = ((1 - R[seen]) * 160).astype(np.uint8)
    return img.repeat(cell, 1).repeat(cell, 2)
