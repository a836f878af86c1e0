"""Continuous actions <-> action tokens, as OpenVLA does it.

The mapping itself is torchrl's ``VocabTailActionTokenizer`` (256 uniform bins on [-1, 1];
kit token index k = vocab tail offset, decoded to the centre of bin clip(255 - k, 0, 254);
q01/q99 de-normalisation on the masked dimensions, in float64). What the kit adds: reading
the normalisation statistics from an OpenVLA checkpoint directory (``config.json``'s
``norm_stats`` or ``dataset_statistics.json``) with one clear error per missing piece.
"""
from __future__ import annotations

import json
import os

from torchrl.data import VocabTailActionTokenizer


def load_norm_stats(path: str) -> dict:
    """``norm_stats`` from a checkpoint directory, its config.json or a statistics JSON file."""
    key = "model.policy.init_args.norm_stats"
    if os.path.isdir(path):
        candidates = [os.path.join(path, "dataset_statistics.json"), os.path.join(path, "config.json")]
    else:
        candidates = [path]
    for file in candidates:
        if not os.path.isfile(file):
            continue
        with open(file) as f:
            data = json.load(f)
        stats = data.get("norm_stats", data) if os.path.basename(file) == "config.json" else data
        if isinstance(stats, dict) and stats and all(isinstance(v, dict) and "action" in v for v in stats.values()):
            return stats
    raise ValueError(f"{key}={path!r}: no normalisation statistics (dataset_statistics.json, or "
                     "config.json with norm_stats: {<unnorm_key>: {action: {q01, q99, mask}}})")


def make_action_codec(bins: int, norm_stats: str | None = None,
                      unnorm_key: str | None = None) -> VocabTailActionTokenizer:
    """Tokens in [0, bins) <-> actions in [-1, 1], de-normalised with ``norm_stats[unnorm_key]``."""
    if norm_stats is None:
        return VocabTailActionTokenizer(bins)
    stats = load_norm_stats(norm_stats)
    if unnorm_key not in stats:
        raise ValueError(f"model.policy.init_args.unnorm_key={unnorm_key!r}: not in {norm_stats!r} "
                         f"(available: {sorted(stats)})")
    return VocabTailActionTokenizer.from_norm_stats(stats, unnorm_key, num_bins=bins)
