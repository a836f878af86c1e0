"""SFTModule: supervised fine-tuning of a VLA policy on demonstrations (the stage before RL).

The losses are the two VLA families' own recipes:
* a token VLA (``TokenVLAPolicy``, OpenVLA's recipe): each continuous action is normalised
  with the demos' q01/q99 statistics and discretised into ``action_tokens`` tokens (the
  policy's codec: 256 bins, the vocabulary's tail); the loss is the cross-entropy of the
  teacher-forced action tokens, L = -1/(B n) sum_b sum_k log pi(a_k | s, g, a_<k), at
  temperature 1. Logged: the token accuracy and the L1 error of the greedily decoded action.
* an OFT-style chunk policy (``OFTPolicy``, OpenVLA-OFT's recipe): the L1 regression of the
  chunk's mean on the normalised target chunk, L = mean |mu(s, g) - a_norm| over B x K x D.
  The Laplace scale b is not trained by SFT (it stays at ``init_scale``: RL's starting noise).

LoRA or full fine-tuning is the policy's ``lora`` setting. The module speaks the interface
the kit's callbacks use (``policy``, ``acting_policy``, ``rollout_stats``), so TaskSwitch,
PerTaskEvaluation (success on LIBERO's fixed initial states after each block) and
ExportPolicy (callbacks/export_policy.py: the checkpoint RL configs load) work unchanged.
"""
from __future__ import annotations

import torch
from lightning import LightningModule

from modules.checkpoint_io import check_fits, rng_state, set_rng_state
from modules.lora_checkpoint import drop_frozen_base, restore_frozen_base
from modules.policy.base import VLAPolicy
from modules.rollout_policy import RolloutPolicy, _temperature


def normalize_actions(actions: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OpenVLA's BOUNDS_Q99 normalisation on the masked dimensions:
    clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1); the others (the gripper) pass through."""
    q01, q99, mask = (t.to(actions.device) for t in (q01, q99, mask))
    scaled = (2.0 * (actions.double() - q01) / (q99 - q01 + 1e-8) - 1.0).clamp(-1.0, 1.0)
    return torch.where(mask, scaled, actions.double()).to(actions.dtype)


def token_loss(policy, images, prompts, actions: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the action tokens of ``actions`` [B, D] (OpenVLA's convention)."""
    tokens = policy.codec.encode(actions.float())
    out = policy.evaluate(images, prompts, tokens)
    logp = out.token_log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, n]
    greedy = out.token_log_probs.argmax(-1)
    with torch.no_grad():
        l1 = (policy.codec.decode(greedy).to(actions.device).float() - actions.float()).abs().mean()
    return -logp.mean(), {"token_accuracy": (greedy == tokens).float().mean(), "action_l1": l1}


def chunk_l1_loss(policy, images, prompts, actions: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """L1 of the chunk mean against the normalised targets ``actions`` [B, K, D]."""
    target = actions.float()
    if policy.norm is not None:
        target = normalize_actions(target, *policy.norm)
    out = policy.evaluate(images, prompts, target)
    loss = (out.token_log_probs[..., 0] - target).abs().mean()
    return loss, {"action_l1": loss.detach()}


class SFTModule(LightningModule):
    def __init__(self, policy: VLAPolicy, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 max_grad_norm: float = 1.0, adam_eps: float = 1e-8):
        """``lr``, ``weight_decay``, ``adam_eps``: AdamW on the trainable parameters (with LoRA:
        the adapters; the OFT head always); ``warmup_steps``: linear warm-up of the learning rate,
        then constant; ``max_grad_norm``: gradient clipping."""
        super().__init__()
        for name in ("lr", "max_grad_norm"):
            if not locals()[name] > 0:
                raise ValueError(f"model.{name}={locals()[name]!r}: must be > 0")
        for name in ("weight_decay", "warmup_steps"):
            if locals()[name] < 0:
                raise ValueError(f"model.{name}={locals()[name]!r}: must be >= 0")
        if getattr(policy, "token_actions", True) and getattr(policy, "action_tokens", 1) < 2:
            raise ValueError("model.policy.init_args.action_tokens: SFT on continuous demonstrations needs one "
                             "token per action dimension (e.g. 7)")
        self.save_hyperparameters(ignore=["policy"])
        self.policy = policy
        self.rollout_stats: dict[str, float] = {}  # no rollouts in SFT (TaskSwitch reads it)

    def acting_policy(self, greedy: bool = False, temperature: float | None = None) -> RolloutPolicy:
        return RolloutPolicy(self.policy, greedy=greedy, temperature=temperature)

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        check_statistics(self.policy, dm.statistics[dm.unnorm_key]["action"], dm.hparams.demos, dm.unnorm_key)
        chunk = getattr(self.policy, "chunk_size", 1)
        if dm.chunk_size != chunk:
            raise ValueError(f"data.chunk_size={dm.chunk_size}: the policy predicts {chunk}-action chunks")

    def training_step(self, batch, batch_idx):
        images, actions = batch["image"], batch["action"]
        prompts = self.policy.encode(batch["instruction"])
        with _temperature(self.policy, 1.0):  # the likelihood itself, not the sampling temperature's
            if getattr(self.policy, "token_actions", True):
                loss, stats = token_loss(self.policy, images, prompts, actions[:, 0])
            else:
                loss, stats = chunk_l1_loss(self.policy, images, prompts, actions)
        n = len(images)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, on_step=False, on_epoch=True, batch_size=n,
                      sync_dist=True)
        return loss

    # -- checkpoints: RNG and, with LoRA, the frozen base as a reference (as CRLModule's) ---------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sft"] = {"rng": rng_state()}
        if self.policy.uses_lora:
            drop_frozen_base(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "frozen_base" in checkpoint:
            restore_frozen_base(self, checkpoint)
        check_fits(self, checkpoint["state_dict"])
        if checkpoint.get("sft", {}).get("rng"):
            set_rng_state(checkpoint["sft"]["rng"])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, eps=hp.adam_eps, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check_statistics(policy, stats: dict, folder: str, key: str) -> None:
    """The policy must decode actions with the statistics of the demos it learns from."""
    q01, q99 = (torch.tensor(stats[k], dtype=torch.float64) for k in ("q01", "q99"))
    if getattr(policy, "token_actions", True):
        codec = policy.codec
        have = None if codec.norm_low is None else (codec.norm_low.cpu().double(), codec.norm_high.cpu().double())
    else:
        have = None if policy.norm is None else (policy.norm[0], policy.norm[1])
    if have is None or have[0].shape != q01.shape or not (torch.allclose(have[0], q01) and torch.allclose(have[1], q99)):
        raise ValueError(f"model.policy.init_args.norm_stats: the policy's action statistics are not those of "
                         f"data.demos={folder!r} (set norm_stats: {folder} and unnorm_key: {key})")
