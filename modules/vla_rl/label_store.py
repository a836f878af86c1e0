"""The pseudo-labelled frame dataset on disk: ``.pt`` shards plus ``index.json``.

Layout of ``root/``::

    index.json          {"version", "instructions", "episodes", "image_shape", "labeler",
                         "splits": {"train"|"heldout": {"shards", "frames", "positives", "episodes"}}}
    train_00000.pt      {"image": uint8 [N, 3, H, W], "label": uint8 [N], "instruction": long [N],
                         "episode": long [N], "frame": long [N]}  (indices into index.json's lists)
    heldout_00000.pt    ...

The split is by episode, never by frame (frames of one episode are near-duplicates): episode i
(in the order added) is held out when floor((i + 1) f) > floor(i f), which holds out exactly
round-down(n f) episodes spread over the stream (so every LIBERO task file contributes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from modules.vla_rl.pseudo_labels import PseudoLabeler, Trajectory, channels_first

SPLITS = ("train", "heldout")
INDEX = "index.json"


class LabelledFrameWriter:
    """Buffers labelled frames per split and writes shards of ``shard_size`` frames."""

    def __init__(self, root: str, heldout_fraction: float = 0.2, shard_size: int = 2048,
                 image_size: int | None = None, labeler: PseudoLabeler | None = None):
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction={heldout_fraction!r}: must be in [0, 1)")
        if shard_size < 1:
            raise ValueError(f"data.shard_size={shard_size!r}: must be >= 1")
        os.makedirs(root, exist_ok=True)
        self.root, self.fraction, self.shard_size = root, heldout_fraction, shard_size
        self.image_size = image_size
        self.labeler = labeler
        self.instructions: list[str] = []
        self.episodes: list[str] = []
        self.image_shape: list[int] | None = None
        self._buf = {s: [] for s in SPLITS}
        self._meta = {s: {"shards": [], "frames": 0, "positives": 0, "episodes": 0} for s in SPLITS}

    def _split_of(self, i: int) -> str:
        f = self.fraction
        return "heldout" if math.floor((i + 1) * f) > math.floor(i * f) else "train"

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size is None or images.shape[-1] == self.image_size == images.shape[-2]:
            return images
        out = torch.nn.functional.interpolate(images.float(), size=(self.image_size, self.image_size),
                                              mode="bilinear", antialias=True)
        return out.round().clamp(0, 255).to(torch.uint8)

    def add(self, images: np.ndarray | torch.Tensor, labels, instruction: str, episode: str = "",
            frames=None) -> str:
        """Add one episode's frames (uint8 [N, 3, H, W] or [N, H, W, 3]); returns its split."""
        images = self._resize(torch.as_tensor(channels_first(np.asarray(images))))
        labels = torch.as_tensor(np.asarray(labels)).to(torch.uint8).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"episode {episode!r}: {len(images)} images but {len(labels)} labels")
        shape = list(images.shape[1:])
        if self.image_shape is None:
            self.image_shape = shape
        elif shape != self.image_shape:
            raise ValueError(f"episode {episode!r}: image shape {shape} differs from {self.image_shape}; "
                             "set data.image_size to resize every frame")
        if instruction not in self.instructions:
            self.instructions.append(instruction)
        ep_index = len(self.episodes)
        self.episodes.append(str(episode) or f"episode_{ep_index}")
        split = self._split_of(ep_index)
        n = len(labels)
        frames = torch.arange(n) if frames is None else torch.as_tensor(np.asarray(frames)).long()
        self._buf[split].append({
            "image": images, "label": labels, "frame": frames,
            "instruction": torch.full((n,), self.instructions.index(instruction), dtype=torch.long),
            "episode": torch.full((n,), ep_index, dtype=torch.long)})
        meta = self._meta[split]
        meta["frames"] += n
        meta["positives"] += int(labels.sum())
        meta["episodes"] += 1
        if sum(len(b["label"]) for b in self._buf[split]) >= self.shard_size:
            self._flush(split)
        return split

    def add_trajectory(self, traj: Trajectory) -> str | None:
        """Pseudo-label a trajectory and add its kept frames; failed ones are skipped (VLA-RL
        labels successful trajectories only). Returns the split, or None when skipped."""
        if not traj.success:
            return None
        labels = self.labeler(traj)
        keep = np.flatnonzero(labels.keep)
        return self.add(traj.images_chw()[keep], labels.label[keep], traj.instruction, traj.episode, keep)

    def _flush(self, split: str, final: bool = False) -> None:
        buf = self._buf[split]
        if not buf:
            return
        data = {k: torch.cat([b[k] for b in buf]) for k in buf[0]}
        cut = len(data["label"]) if final else (len(data["label"]) // self.shard_size) * self.shard_size
        for start in range(0, cut, self.shard_size):
            name = f"{split}_{len(self._meta[split]['shards']):05d}.pt"
            torch.save({k: v[start:start + self.shard_size].clone() for k, v in data.items()},
                       os.path.join(self.root, name))
            self._meta[split]["shards"].append(name)
        rest = {k: v[cut:] for k, v in data.items()}
        self._buf[split] = [rest] if len(rest["label"]) else []

    def close(self) -> dict:
        for split in SPLITS:
            self._flush(split, final=True)
        index = {"version": 1, "instructions": self.instructions, "episodes": self.episodes,
                 "image_shape": self.image_shape, "splits": self._meta,
                 "labeler": dataclasses.asdict(self.labeler) if self.labeler is not None else None}
        with open(os.path.join(self.root, INDEX), "w") as f:
            json.dump(index, f, indent=1)
        return index


def build_dataset(trajectories: Iterable[Trajectory], root: str, labeler: PseudoLabeler,
                  heldout_fraction: float = 0.2, shard_size: int = 2048,
                  image_size: int | None = None) -> dict:
    """Pseudo-label ``trajectories`` (successful ones) into a dataset at ``root``; returns the index."""
    writer = LabelledFrameWriter(root, heldout_fraction, shard_size, image_size, labeler)
    skipped = sum(writer.add_trajectory(t) is None for t in trajectories)
    index = writer.close()
    index["skipped_failed"] = skipped
    return index


def read_index(root: str) -> dict:
    path = os.path.join(root, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.data_dir={root!r}: no {INDEX} "
                                "(build the dataset first, e.g. with data.demos)")
    with open(path) as f:
        return json.load(f)


class LabelledFrames(Dataset):
    """One split of the dataset, loaded into memory: items {image uint8 [3,H,W], instruction, label}."""

    def __init__(self, root: str, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        self.index = read_index(root)
        self.instructions = self.index["instructions"]
        names = self.index["splits"][split]["shards"]
        shards = [torch.load(os.path.join(root, s), weights_only=True) for s in names]
        keys = ("image", "label", "instruction", "episode", "frame")
        if shards:
            self.data = {k: torch.cat([s[k] for s in shards]) for k in keys}
        else:
            shape = self.index["image_shape"] or [3, 1, 1]
            self.data = {k: torch.zeros((0, *shape) if k == "image" else (0,), dtype=torch.uint8 if k in (
                "image", "label") else torch.long) for k in keys}

    def __len__(self) -> int:
        return len(self.data["label"])

    @property
    def labels(self) -> torch.Tensor:
        return self.data["label"]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.data["image"][i],
                "instruction": self.instructions[int(self.data["instruction"][i])],
                "label": self.data["label"][i].float()}
