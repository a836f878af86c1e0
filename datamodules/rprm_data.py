"""LightningDataModule over the pseudo-labelled frame dataset (modules/vla_rl/label_store.py).

``prepare_data`` builds the dataset from LIBERO HDF5 demonstrations (``demos``: paths or glob
patterns) when ``data_dir`` has no index yet, with the ``labeler``'s knobs; otherwise the dataset
on disk is used as it is. Train batches come from the ``train`` split, validation batches from the
episodes held out (``heldout``), so the RPRM's accuracy/AUROC are measured on unseen episodes.
"""
from __future__ import annotations

import glob
import os

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, WeightedRandomSampler

from modules.vla_rl.label_store import INDEX, LabelledFrames, build_dataset
from modules.vla_rl.pseudo_labels import PseudoLabeler


def _expand(patterns: list[str]) -> list[str]:
    paths = []
    for p in patterns:
        found = sorted(glob.glob(os.path.expanduser(p)))
        if not found:
            raise FileNotFoundError(f"data.demos: {p!r} matches no file")
        paths.extend(found)
    return paths


class RPRMDataModule(LightningDataModule):
    def __init__(self, data_dir: str, demos: list[str] | None = None, labeler: PseudoLabeler | None = None,
                 heldout_fraction: float = 0.2, shard_size: int = 2048, image_size: int | None = None,
                 flip_180: bool = True, gripper_source: str = "action", batch_size: int = 32,
                 num_workers: int = 0, balance: bool = False, seed: int = 0):
        """
        Args:
            data_dir: the dataset's folder (``index.json`` + shards); built from ``demos`` if it
                has no index yet.
            demos: LIBERO HDF5 demonstration files or glob patterns to build the dataset from.
            labeler: the pseudo-labelling rule (``PseudoLabeler``'s knobs).
            heldout_fraction: fraction of the episodes held out for ``val/accuracy`` and ``val/auroc``.
            shard_size: frames per shard file written when the dataset is built.
            image_size: resize frames to this size when writing (null: keep the demos' size).
            flip_180: flip the demos' frames by 180 degrees (LIBERO renders upside down), to match
                the frames the RPRM scores online.
            gripper_source: the gripper signal the labeler reads: ``action`` (the commanded
                gripper, -1 open / +1 close) or ``state`` (the measured finger positions).
            batch_size: frames per train and validation batch.
            num_workers: DataLoader worker processes.
            balance: sample train frames with class-balanced weights (positives are rare: a few
                windows per episode); the held-out split is always read as it is.
            seed: seed of the train loader's shuffling (or balanced sampling).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size!r}: must be >= 1")
        self.save_hyperparameters()
        self.labeler = labeler or PseudoLabeler()
        self.train_set: LabelledFrames | None = None
        self.val_set: LabelledFrames | None = None

    def prepare_data(self) -> None:
        hp = self.hparams
        if os.path.isfile(os.path.join(hp.data_dir, INDEX)):
            return
        if not hp.demos:
            raise FileNotFoundError(f"data.data_dir={hp.data_dir!r} has no {INDEX} and data.demos is empty: "
                                    "nothing to train on")
        from modules.vla_rl.libero_demos import read_libero_demos

        trajectories = (t for path in _expand(hp.demos) for t in
                        read_libero_demos(path, flip_180=hp.flip_180, gripper_source=hp.gripper_source))
        build_dataset(trajectories, hp.data_dir, self.labeler, hp.heldout_fraction, hp.shard_size,
                      hp.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = LabelledFrames(self.hparams.data_dir, "train")
            self.val_set = LabelledFrames(self.hparams.data_dir, "heldout")
            if not len(self.train_set):
                raise ValueError(f"data.data_dir={self.hparams.data_dir!r}: the train split is empty")

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        gen = torch.Generator().manual_seed(hp.seed)
        sampler = None
        if hp.balance:
            labels = self.train_set.labels.long()
            counts = torch.bincount(labels, minlength=2).clamp_min(1).float()
            sampler = WeightedRandomSampler((1.0 / counts)[labels], len(labels), generator=gen)
        return DataLoader(self.train_set, batch_size=hp.batch_size, shuffle=sampler is None,
                          sampler=sampler, generator=gen if sampler is None else None,
                          num_workers=hp.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)
