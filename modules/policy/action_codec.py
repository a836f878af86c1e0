"""Continuous actions <-> action tokens, as OpenVLA does it.

The mapping is torchrl's ``VocabTailActionTokenizer`` (256 uniform bins on [-1, 1]; kit token
index k = vocab tail offset, decoded to the centre of bin clip(255 - k, 0, 254); q01/q99
de-normalisation on the masked dimensions), with two corrections to OpenVLA's own code
(``prismatic``'s ``ActionTokenizer`` and ``predict_action``), which ``OpenVLAActionCodec`` makes:
* the bin edges are float64 (``np.linspace``); torchrl builds them in float32, which puts a few
  actions in a million (those within a float32 rounding of an edge) one bin off;
* decoding de-normalises as ``0.5 * (a + 1) * (q99 - q01) + q01``: OpenVLA-OFT (and torchrl)
  add 1e-8 to (q99 - q01), OpenVLA's ``predict_action`` does not. (Encoding keeps the 1e-8 of
  OpenVLA's training-data normalisation.)
What the kit adds besides: reading the normalisation statistics from an OpenVLA checkpoint
directory (``config.json``'s ``norm_stats`` or ``dataset_statistics.json``) with one clear
error per missing piece.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torchrl.data import VocabTailActionTokenizer


class OpenVLAActionCodec(VocabTailActionTokenizer):
    """torchrl's vocab-tail tokenizer with OpenVLA's float64 bin edges and its de-normalisation
    without the 1e-8 (module docstring)."""

    def _digitize(self, actions: torch.Tensor) -> torch.Tensor:
        edges = torch.from_numpy(np.linspace(-1.0, 1.0, self.num_bins)).to(actions.device)
        return torch.bucketize(actions.clamp(-1.0, 1.0).double(), edges, right=True)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.detach().cpu().numpy()
        digitized = (self.full_vocab_size if self.full_vocab_size is not None else self.num_bins) - ids
        bins = np.linspace(-1.0, 1.0, self.num_bins)
        centers = (bins[:-1] + bins[1:]) / 2.0
        actions = centers[np.clip(digitized - 1, 0, len(centers) - 1)]
        if self.norm_low is not None:
            low, high = self.norm_low.cpu().numpy(), self.norm_high.cpu().numpy()
            mask = self.norm_mask.cpu().numpy().astype(bool)
            actions = np.where(mask, 0.5 * (actions + 1.0) * (high - low) + low, actions)
        return torch.from_numpy(np.ascontiguousarray(actions)).to(device=tokens.device, dtype=torch.float32)


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
                      unnorm_key: str | None = None) -> OpenVLAActionCodec:
    """Tokens in [0, bins) <-> actions in [-1, 1], de-normalised with ``norm_stats[unnorm_key]``."""
    if norm_stats is None:
        return OpenVLAActionCodec(bins)
    stats = load_norm_stats(norm_stats)
    if unnorm_key not in stats:
        raise ValueError(f"model.policy.init_args.unnorm_key={unnorm_key!r}: not in {norm_stats!r} "
                         f"(available: {sorted(stats)})")
    return OpenVLAActionCodec.from_norm_stats(stats, unnorm_key, num_bins=bins)
