"""OnlineRPRM: VLA-RL's process reward model trained on pseudo-labels from the run's own rollouts.

VLA-RL trains its RPRM on pseudo-labels of successful trajectories, then adds its score to the
sparse reward (no RPRM: 85.8 vs 90.2 on LIBERO-Spatial). This callback does it inside one run:

1. from the first iteration on, every finished *successful* episode of the training rollouts
   (modules/vla_rl/rollout_episodes.py: frames + instruction; gripper / end-effector signals
   where the env reports them) is pseudo-labelled (modules/vla_rl/pseudo_labels.py) and written
   with the label store to ``<log_dir>/rprm/data`` (held-out episodes for the metrics);
2. at the end of iteration ``collect_iterations`` (later if fewer than ``min_episodes``
   successes were seen), the datamodule's RPRM (``data.reward_shaping.rprm``) is trained with
   RPRMModule in a short in-process Lightning fit (the same module as scripts/train_rprm.py),
   saved to ``<log_dir>/rprm/rprm.ckpt``; ``rprm/val_accuracy`` and ``rprm/val_auroc`` (held-out
   episodes) are logged;
3. the datamodule's shaping is activated with that checkpoint for the rest of training (its
   path is in the datamodule's state: a resumed run shapes with the same RPRM) - unless
   ``min_auroc`` is set and the held-out AUROC falls below it: shaping then stays off for the
   run (sparse reward only; ``rprm/shaping_on`` logs the decision). VLA-RL has no such gate
   (default null); the kit offers it because a poor RPRM can stop learning
   (docs/experiments/vla_rl_babyai.md).

The policy keeps training on the sparse reward meanwhile. Idle when ``data.reward_shaping`` is
null (the no-RPRM ablation) or already has a checkpoint. Single-process runs only: under DDP
train the RPRM offline (scripts/train_rprm.py) and set ``data.reward_shaping.checkpoint``.
A resume before step 2 collects again from the resumed iteration.
"""
from __future__ import annotations

import os

from lightning import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info

from modules.vla_rl.label_store import LabelledFrameWriter
from modules.vla_rl.pseudo_labels import PseudoLabeler
from modules.vla_rl.rollout_episodes import EpisodeSplitter

NAME = "callbacks.rprm.OnlineRPRM"


class OnlineRPRM(Callback):
    trains_rprm = True  # the datamodule accepts data.reward_shaping.checkpoint: null with this callback

    def __init__(self, collect_iterations: int = 5, min_episodes: int = 10, max_episodes: int | None = None,
                 labeler: PseudoLabeler | None = None, heldout_fraction: float = 0.2, epochs: int = 5,
                 batch_size: int = 64, lr: float = 1e-4, weight_decay: float = 0.0,
                 pos_weight: float | None = None, balance: bool = True, seed: int = 0,
                 min_auroc: float | None = None):
        """
        Args:
            collect_iterations: iterations of successful episodes collected before training.
            min_episodes: successful episodes needed before training (collection goes on until then).
            max_episodes: successful episodes kept at most (null: all).
            labeler: the pseudo-labelling rules (modules/vla_rl/pseudo_labels.py; null: defaults).
            heldout_fraction: episodes held out for the RPRM's validation accuracy and AUROC.
            epochs: training epochs of the RPRM.
            batch_size: frames per RPRM training batch.
            lr: AdamW learning rate of the RPRM.
            weight_decay: AdamW weight decay of the RPRM.
            pos_weight: BCE weight of the positive class (null: none).
            balance: class-balanced sampling of the training frames (positives are rare).
            seed: seed of the held-out split and the RPRM's training.
            min_auroc: keep the shaping off if the held-out AUROC is below it (null: always on).
        """
        for name, value, low in (("collect_iterations", collect_iterations, 1), ("min_episodes", min_episodes, 1),
                                 ("epochs", epochs, 1), ("batch_size", batch_size, 1)):
            if value < low:
                raise ValueError(f"{NAME}.{name}={value!r}: must be >= {low}")
        if max_episodes is not None and max_episodes < min_episodes:
            raise ValueError(f"{NAME}.max_episodes={max_episodes!r}: must be >= min_episodes={min_episodes}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"{NAME}.heldout_fraction={heldout_fraction!r}: must be in (0, 1)")
        if min_auroc is not None and not 0.0 <= min_auroc <= 1.0:
            raise ValueError(f"{NAME}.min_auroc={min_auroc!r}: must be in [0, 1] (or null: no gate)")
        self.min_auroc = min_auroc
        self.collect_iterations, self.min_episodes, self.max_episodes = collect_iterations, min_episodes, max_episodes
        self.labeler = labeler or PseudoLabeler()
        self.heldout_fraction, self.epochs, self.batch_size = heldout_fraction, epochs, batch_size
        self.module_args = {"lr": lr, "weight_decay": weight_decay, "pos_weight": pos_weight}
        self.balance, self.seed = balance, seed
        self.trained = False
        self.idle = True
        self.episodes = 0
        self.writer: LabelledFrameWriter | None = None
        self.splitter = EpisodeSplitter()
        self._env_version = None
        self.root = None

    def on_fit_start(self, trainer, pl_module) -> None:
        shaping = getattr(trainer.datamodule, "reward_shaping", None)
        self.idle = shaping is None or shaping.active or self.trained
        if shaping is None:
            rank_zero_info(f"[rprm] data.reward_shaping is null: {NAME} is idle (no RPRM)")
        elif not self.idle and trainer.world_size > 1:
            raise ValueError(f"{NAME}: single-process runs only (trainer.devices=1); under DDP train the RPRM "
                             "offline (scripts/train_rprm.py) and set data.reward_shaping.checkpoint")
        self.root = os.path.join(trainer.log_dir or ".", "rprm")

    # -- 1. successful episodes -> pseudo-labelled dataset ----------------------------------------
    def on_rollout(self, trainer, pl_module, rollout) -> None:
        if self.idle:
            return
        dm = trainer.datamodule
        if self._env_version != dm.env_version:  # a new env: its episodes start afresh
            self.splitter.reset()
            self._env_version = dm.env_version
        if self.writer is None:
            self.writer = LabelledFrameWriter(os.path.join(self.root, "data"), self.heldout_fraction,
                                              labeler=self.labeler)
        for traj in self.splitter.add(rollout):
            if traj.success and (self.max_episodes is None or self.episodes < self.max_episodes):
                self.writer.add_trajectory(traj)
                self.episodes += 1

    # -- 2./3. train, evaluate, switch shaping on ----------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.idle:
            return
        if trainer.current_epoch + 1 < self.collect_iterations or self.episodes < self.min_episodes:
            if trainer.current_epoch + 1 >= self.collect_iterations:
                rank_zero_info(f"[rprm] {self.episodes}/{self.min_episodes} successful episodes: collecting on")
            return
        metrics = self.train(trainer, pl_module)
        pl_module.log_dict(metrics)
        on = bool(metrics["rprm/shaping_on"])
        rank_zero_info("[rprm] trained on {} episodes: held-out accuracy {:.3f}, AUROC {:.3f}; {}".format(
            self.episodes, metrics.get("rprm/val_accuracy", float("nan")), metrics.get("rprm/val_auroc", float("nan")),
            "shaping on" if on else f"below min_auroc={self.min_auroc}: shaping stays off"))

    def train(self, trainer, pl_module) -> dict[str, float]:
        from datamodules.rprm_data import RPRMDataModule
        from modules.vla_rl.rprm_module import RPRMModule

        index = self.writer.close()
        shaping = trainer.datamodule.reward_shaping
        data = RPRMDataModule(os.path.join(self.root, "data"), labeler=self.labeler, batch_size=self.batch_size,
                              balance=self.balance, seed=self.seed)
        module = RPRMModule(shaping.rprm, **self.module_args)
        device = pl_module.device
        inner = Trainer(max_epochs=self.epochs, accelerator="gpu" if device.type == "cuda" else "cpu",
                        devices=[device.index or 0] if device.type == "cuda" else 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=self.root)
        inner.fit(module, datamodule=data)
        ckpt = os.path.join(self.root, "rprm.ckpt")
        inner.save_checkpoint(ckpt, weights_only=False)
        self.trained, self.idle = True, True
        splits = index["splits"]
        metrics = {"rprm/episodes": float(self.episodes), "rprm/train_frames": float(splits["train"]["frames"]),
                   "rprm/heldout_frames": float(splits["heldout"]["frames"])}
        for key in ("val/accuracy", "val/auroc", "val/loss", "val/positive_fraction"):
            if key in inner.callback_metrics:
                metrics["rprm/" + key.replace("/", "_")] = float(inner.callback_metrics[key])
        on = shaping_allowed(metrics.get("rprm/val_auroc"), self.min_auroc)
        if on:
            shaping.activate(ckpt)
        metrics["rprm/shaping_on"] = float(on)
        return metrics

    def state_dict(self) -> dict:
        return {"trained": self.trained, "episodes": self.episodes}

    def load_state_dict(self, state: dict) -> None:
        self.trained = state["trained"]
        self.episodes = state["episodes"] if self.trained else 0  # an unfinished collection starts again


def shaping_allowed(heldout_auroc: float | None, min_auroc: float | None) -> bool:
    """The quality gate: no gate (None) always shapes; else the held-out AUROC must reach
    ``min_auroc`` (a missing AUROC - a held-out split of one class - does not)."""
    if min_auroc is None:
        return True
    return heldout_auroc is not None and heldout_auroc == heldout_auroc and heldout_auroc >= min_auroc
