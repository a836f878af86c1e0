"""Training the RPRM on the pseudo-labels: BCE, AdamW, accuracy and AUROC on held-out episodes.

With LoRA the checkpoints hold the trainable state (adapters, head, optimizer) and a record of the
frozen VLM instead of its weights (modules/lora_checkpoint.py): a 7B RPRM's checkpoint is its
adapters' size, not 14 GiB. ``load_rprm_weights`` puts the base back from the RPRM it loads into,
after checking that it is the base the RPRM was trained on."""
from __future__ import annotations

import torch
from lightning import LightningModule

from modules.checkpoint_io import CheckpointError
from modules.lora_checkpoint import drop_frozen_base, is_adapter, restore_frozen_base
from modules.vla_rl.metrics import binary_accuracy, binary_auroc
from modules.vla_rl.rprm import RPRM


class RPRMModule(LightningModule):
    def __init__(self, rprm: RPRM, lr: float = 1e-4, weight_decay: float = 0.0, adam_eps: float = 1e-8,
                 pos_weight: float | None = None, threshold: float = 0.5):
        """
        Args:
            rprm: the reward model to train (``RPRM``: VLM + LoRA + binary head).
            lr: AdamW learning rate of the trainable parameters (LoRA and head, or all).
            weight_decay: AdamW weight decay.
            adam_eps: AdamW epsilon.
            pos_weight: BCE weight of the positive class (positives are rare); None = 1.
            threshold: decision threshold on the predicted probability for the accuracy metrics.
        """
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr={lr!r}: must be > 0")
        if pos_weight is not None and pos_weight <= 0:
            raise ValueError(f"model.pos_weight={pos_weight!r}: must be > 0")
        self.save_hyperparameters(ignore=["rprm"])
        self.rprm = rprm
        self._val_probs: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pw = self.hparams.pos_weight
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, pos_weight=None if pw is None else logits.new_tensor(pw))

    def training_step(self, batch, batch_idx):
        logits = self.rprm(batch["image"], batch["instruction"])
        labels = batch["label"].float()
        loss = self._loss(logits, labels)
        n = len(labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=n, prog_bar=True)
        accuracy = binary_accuracy(torch.sigmoid(logits.detach()), labels, self.hparams.threshold)
        self.log("train/accuracy", accuracy, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.rprm(batch["image"], batch["instruction"])
        labels = batch["label"].float()
        self.log("val/loss", self._loss(logits, labels), on_epoch=True, batch_size=len(labels),
                 sync_dist=True)
        self._val_probs.append(torch.sigmoid(logits).detach())
        self._val_labels.append(labels)

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        probs, labels = torch.cat(self._val_probs), torch.cat(self._val_labels)
        self._val_probs, self._val_labels = [], []
        if self.trainer.world_size > 1:  # every rank scores its shard; metrics over all of them
            probs, labels = self.all_gather(probs).reshape(-1), self.all_gather(labels).reshape(-1)
        self.log("val/accuracy", binary_accuracy(probs, labels, self.hparams.threshold), prog_bar=True)
        self.log("val/auroc", binary_auroc(probs, labels).float(), prog_bar=True)
        self.log("val/positive_fraction", labels.mean())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = [k for k in rprm_base_keys(self.rprm) if not self.get_parameter(k).requires_grad]
        if keys:  # LoRA: the trainable state only; the frozen VLM is referenced
            drop_frozen_base(self, checkpoint, prefix="rprm.", keys=keys)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "frozen_base" in checkpoint:
            where = f"model.rprm.init_args.backbone (source {self.rprm.backbone.source!r}): the checkpoint (--ckpt_path)"
            restore_frozen_base(self, checkpoint, prefix="rprm.", keys=_recorded_keys(self.rprm, checkpoint, where),
                                where=where)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.rprm.parameters() if p.requires_grad]  # LoRA + head (or all)
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, eps=hp.adam_eps)


def rprm_base_keys(rprm: RPRM) -> list[str]:
    """``rprm.``-prefixed names of the VLM's weights that LoRA leaves frozen (none without LoRA), by
    name: the reward shaping's RPRM is frozen as a whole, so ``requires_grad`` cannot tell them."""
    names = [n for n, _ in rprm.named_parameters()]
    if not any(is_adapter(n) for n in names):
        return []
    return [f"rprm.{n}" for n in names if n.startswith("backbone.") and not is_adapter(n)]


def _recorded_keys(rprm: RPRM, checkpoint: dict, key: str) -> list[str]:
    """The checkpoint's frozen-base keys, which must be this RPRM's frozen-base keys (whether or not
    it is frozen as a whole already, as the reward shaping's is)."""
    recorded, mine = list(checkpoint["frozen_base"]["tensors"]), rprm_base_keys(rprm)
    if set(recorded) != set(mine):
        raise CheckpointError(f"{key}: the checkpoint's RPRM has {len(recorded)} frozen base tensors, this one "
                              f"{len(mine)}: build the RPRM with the settings it was trained with")
    return recorded


def load_rprm_weights(rprm: RPRM, checkpoint_path: str) -> RPRM:
    """Load an RPRMModule checkpoint's ``rprm.*`` weights into an RPRM built from the same config
    (what the reward shaping does before freezing it). A LoRA checkpoint's base comes from ``rprm``
    itself, which must be the base it was trained on (same files, same weights)."""
    from modules.checkpoint_io import require_keys, safe_load

    key = "data.reward_shaping.checkpoint"
    ckpt = safe_load(checkpoint_path, key)
    require_keys(ckpt, ("state_dict",), f"{key}={checkpoint_path!r}", "a Lightning checkpoint")
    if "frozen_base" in ckpt:
        holder = torch.nn.Module()
        holder.rprm = rprm
        where = f"{key}={checkpoint_path!r}"
        restore_frozen_base(holder, ckpt, prefix="rprm.", keys=_recorded_keys(rprm, ckpt, where),
                            where=f"{where} (the RPRM's backbone: source {rprm.backbone.source!r})")
    state = {k[len("rprm."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("rprm.")}
    if not state:
        raise ValueError(f"{checkpoint_path}: no 'rprm.*' weights (not an RPRMModule checkpoint)")
    rprm.load_state_dict(state)
    return rprm
