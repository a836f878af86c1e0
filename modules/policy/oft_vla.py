"""An OpenVLA-OFT-style policy: parallel decoding of a continuous action chunk with an
L1-regression (Laplace) head, for PPO (CRL-VLA fine-tunes OpenVLA-OFT; specs/CRL-VLA.md).

* One backbone forward over ``prompt + K * D`` action placeholder positions (OFT's parallel
  decoding, Kim et al. arXiv 2502.19645, Sec. 3). The placeholders' input embeddings are
  ``LaplaceChunkHead.slots`` (zeros at init, as OFT's "empty action embeddings"; learned here
  unless ``learned_slots: false``). Attention stays the backbone's own (causal over the
  placeholders: placeholder j sees the prompt and placeholders < j); OFT makes the
  placeholders attend to each other bidirectionally, which would need a per-family 4-D mask.
  One pass still yields the whole chunk.
* Head (modules/policy/laplace.py): OFT's MLPResNet over the D placeholder states of each
  chunk step gives the mean mu [B, K, D]; a learned, state-independent log-scale gives b.
  pi(.|s, g) = prod over the K x D entries of Laplace(mu, b). Greedy = mu.
* **One PPO action = the whole chunk** (a macro action executed step by step by
  datamodules/chunking.py): log pi(a|s,g) and the entropy are sums over K x D, and gamma /
  GAE run over chunks (one macro step per policy decision).
* Bounds: the Laplace sample is unbounded; the env receives it clipped to
  [action_low, action_high] (then de-normalised with ``norm_stats`` where given, as OFT's
  q01/q99 convention). The log-prob is that of the *unclipped* sample (the clip is part of
  the environment), so act and training agree exactly; the closed-form KL is between the
  unclipped distributions (an upper bound on the KL between the clipped ones).
* The same forward gives phi(s) (mean over image positions) and emb(g) (mean over the
  instruction's tokens) as TokenVLAPolicy, so the critics reuse it.

The output (``ChunkOutput``) keeps TokenVLAPolicy's ``PolicyOutput`` field names so the CRL
module handles both policies alike:
``tokens`` is the sampled chunk [B, K, D] (float, unclipped) and ``token_log_probs`` the
distribution's parameters [B, K, D, 2] = (mu, log b); ``kl_to_old_policy`` replaces the
categorical KL. The Q critic is not supported (it one-hot encodes action tokens).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from modules.critics import frozen_copy
from modules.policy.action_codec import load_norm_stats
from modules.policy.base import VLAPolicy
from modules.policy.backbone import EncodedPrompts, VLMBackbone
from modules.policy.laplace import (
    LaplaceChunkHead,
    laplace_entropy,
    laplace_kl,
    laplace_log_prob,
    laplace_sample,
)
from modules.policy.lora import OLD_ADAPTER, TRAIN_ADAPTER, active_adapter, apply_lora, snapshot_adapter


@dataclass
class ChunkOutput:
    """TokenVLAPolicy's ``PolicyOutput`` fields, for a continuous chunk."""

    tokens: torch.Tensor  # [B, K, D] the chunk (sampled, unclipped; greedy: mu)
    log_prob: torch.Tensor  # [B] sum over K x D
    token_log_probs: torch.Tensor  # [B, K, D, 2] the distribution: (mu, log b)
    entropy: torch.Tensor  # [B] sum over K x D
    phi: torch.Tensor  # [B, H] state features
    emb: torch.Tensor  # [B, H] goal (instruction) features

    @property
    def actions(self) -> torch.Tensor:
        return self.tokens


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class OFTPolicy(VLAPolicy):
    token_actions = False  # continuous chunks (the CRL module's Q critic needs token actions)

    def __init__(self, backbone: VLMBackbone, chunk_size: int = 8, action_dim: int = 7,
                 head_hidden: int = 256, head_blocks: int = 2, init_scale: float = 0.1,
                 learned_slots: bool = True, action_low: float | list[float] = -1.0,
                 action_high: float | list[float] = 1.0, temperature: float = 1.0, lora: dict | None = None,
                 norm_stats: str | None = None, unnorm_key: str | None = None, head_checkpoint: str | None = None):
        """``chunk_size`` K actions of ``action_dim`` D per decision (OFT on LIBERO: K=8, D=7).
        ``init_scale``: the Laplace scale b at the start; ``temperature`` T multiplies it (acting
        and training alike, as a token VLA's logits / T). ``action_low/high``: the clip bounds
        in the policy's (normalised) action space. ``lora``: PEFT LoRA on the backbone (the
        head is trained fully); None: full fine-tuning. ``norm_stats``/``unnorm_key``: q01/q99
        de-normalisation of the masked dimensions (an OpenVLA(-OFT) checkpoint's statistics).
        ``head_checkpoint``: the chunk head's weights (``action_head.pt``, written by
        callbacks/export_policy.py after SFT); null: a fresh head."""
        super().__init__()
        sizes = (("chunk_size", chunk_size), ("action_dim", action_dim), ("head_hidden", head_hidden))
        for name, value in sizes:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.policy.init_args.{name}={value!r}: must be an integer >= 1")
        for name, value in (("init_scale", init_scale), ("temperature", temperature)):
            if not value > 0:
                raise ValueError(f"model.policy.init_args.{name}={value!r}: must be > 0")
        self.temperature = temperature
        self.backbone = backbone
        self.uses_lora = lora is not None
        if self.uses_lora:
            backbone.model = apply_lora(backbone.model, **lora)
        self.adapter_routes: dict[str, str] = {}  # PerTaskAdapters: not supported (the head is shared)
        self.chunk_size, self.action_dim = chunk_size, action_dim
        # the LM head is never read (no token logits); frozen so that DDP sees no unused
        # trainable parameter (unless tied to the input embeddings, which are read)
        lm_head = backbone.model.get_output_embeddings()
        if lm_head.weight is not backbone.model.get_input_embeddings().weight:
            lm_head.requires_grad_(False)
        self.head = LaplaceChunkHead(backbone.hidden_size, chunk_size, action_dim, head_hidden, head_blocks,
                                     init_scale, learned_slots)
        if head_checkpoint is not None:
            self._load_head(head_checkpoint)
        self.old_head: nn.Module | None = None  # LoRA: the old policy's frozen head (set by snapshot)
        low, high = (torch.as_tensor(v, dtype=torch.float32).expand(action_dim).clone()
                     for v in (action_low, action_high))
        if not (low < high).all():
            raise ValueError(f"model.policy.init_args.action_low={action_low!r} / "
                             f"action_high={action_high!r}: need low < high in every dimension")
        self.register_buffer("action_low", low, persistent=False)
        self.register_buffer("action_high", high, persistent=False)
        self._set_norm_stats(norm_stats, unnorm_key)
        pad = backbone.tokenizer.pad_token_id
        self.placeholder_id = pad if pad is not None else (backbone.tokenizer.eos_token_id or 0)
        if self.placeholder_id == getattr(backbone, "image_token_id", None):
            raise ValueError("OFTPolicy: the pad token is the image token; no placeholder id available")

    def _load_head(self, path: str) -> None:
        key = "model.policy.init_args.head_checkpoint"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}={path!r}: no such file (callbacks/export_policy.py writes action_head.pt)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        mine = self.head.state_dict()
        wrong = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
        if wrong or set(state) - set(mine):
            raise ValueError(f"{key}={path!r}: the head was built with other sizes ({(wrong or sorted(set(state) - set(mine)))[0]}); "
                             "chunk_size, action_dim, head_hidden, head_blocks and the backbone's width must match")
        self.head.load_state_dict(state)

    def _set_norm_stats(self, norm_stats, unnorm_key) -> None:
        self.norm = None
        if norm_stats is None:
            return
        stats = load_norm_stats(norm_stats)
        if unnorm_key not in stats:
            raise ValueError(f"model.policy.init_args.unnorm_key={unnorm_key!r}: not in {norm_stats!r} "
                             f"(available: {sorted(stats)})")
        a = stats[unnorm_key]["action"]
        q01, q99 = (torch.tensor(a[k], dtype=torch.float64) for k in ("q01", "q99"))
        mask = torch.tensor(a.get("mask", [True] * len(q01)), dtype=torch.bool)
        if len(q01) != self.action_dim:
            raise ValueError(f"model.policy.init_args.norm_stats: {len(q01)}-D statistics for "
                             f"action_dim={self.action_dim}")
        self.norm = (q01, q99, mask)

    @property
    def feature_dim(self) -> int:
        return self.backbone.hidden_size

    @property
    def goal_dim(self) -> int:
        return self.backbone.hidden_size

    def encode(self, instructions: list[str]) -> EncodedPrompts:
        return self.backbone.encode(instructions).to(self.action_low.device)

    # -- the forward ------------------------------------------------------------------------
    @contextmanager
    def _placeholder_embeddings(self, slots: torch.Tensor):
        """While active, the input embeddings of the last K*D positions are ``slots``."""
        n = slots.shape[0]

        def hook(module, args, out):
            if out.ndim != 3 or out.shape[1] <= n:
                return out
            return torch.cat([out[:, :-n], slots.to(out.dtype).expand(out.shape[0], -1, -1)], 1)

        handle = self.backbone.model.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _forward(self, images, prompts: EncodedPrompts, head: LaplaceChunkHead):
        """One backbone pass -> (mu, log_b [B, K, D], phi, emb)."""
        n = self.chunk_size * self.action_dim
        b, length = prompts.input_ids.shape
        ids = torch.cat([prompts.input_ids, prompts.input_ids.new_full((b, n), self.placeholder_id)], 1)
        mask = torch.cat([prompts.attention_mask, prompts.attention_mask.new_ones(b, n)], 1)
        with self._placeholder_embeddings(head.slots):
            hidden, _ = self.backbone(ids, mask, self.backbone.preprocess(images))
        phi = _masked_mean(hidden[:, :length], prompts.image_mask).float()
        emb = _masked_mean(hidden[:, :length], prompts.goal_mask).float()
        mu, log_b = head(hidden[:, length:])
        if self.temperature != 1.0:
            log_b = log_b + math.log(self.temperature)
        return mu, log_b, phi, emb

    @staticmethod
    def _output(actions, mu, log_b, phi, emb) -> ChunkOutput:
        log_prob = laplace_log_prob(actions, mu, log_b).flatten(1).sum(-1)
        entropy = laplace_entropy(log_b).flatten(1).sum(-1)
        return ChunkOutput(actions, log_prob, torch.stack([mu, log_b], -1), entropy, phi, emb)

    def _act(self, images, prompts, greedy, head) -> ChunkOutput:
        mu, log_b, phi, emb = self._forward(images, prompts, head)
        actions = mu if greedy else laplace_sample(mu, log_b)
        return self._output(actions, mu, log_b, phi, emb)

    @torch.no_grad()
    def act(self, images: torch.Tensor, prompts: EncodedPrompts, greedy: bool = False) -> ChunkOutput:
        """Sample a chunk [B, K, D] (greedy: the mean) with its log-prob, in one forward."""
        return self._act(images, prompts, greedy, self.head)

    def evaluate(self, images: torch.Tensor, prompts: EncodedPrompts, tokens: torch.Tensor) -> ChunkOutput:
        """The training forward: log pi of the given (unclipped) chunks [B, K, D]."""
        mu, log_b, phi, emb = self._forward(images, prompts, self.head)
        return self._output(tokens.to(mu.dtype), mu, log_b, phi, emb)

    @staticmethod
    def kl_to_old_policy(old_params: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """L_KL = E[KL(pi_old || pi)]: closed-form Laplace KL summed over K x D, mean over samples.
        Inputs [B, K, D, 2] = (mu, log b)."""
        kl = laplace_kl(old_params[..., 0], old_params[..., 1], params[..., 0], params[..., 1])
        return kl.flatten(1).sum(-1).mean()

    def env_action(self, tokens: torch.Tensor) -> torch.Tensor:
        """Chunk [B, K, D] -> what the env executes: clipped to the bounds, de-normalised."""
        a = torch.maximum(torch.minimum(tokens.float(), self.action_high), self.action_low)
        if self.norm is None:
            return a
        q01, q99, mask = (t.to(a.device) for t in self.norm)
        env = 0.5 * (a.double() + 1.0) * (q99 - q01 + 1e-8) + q01  # OpenVLA(-OFT)'s convention
        return torch.where(mask, env, a.double()).float()

    # -- the old policy and adapters ---------------------------------------------------------
    def snapshot(self):
        """pi_old: with LoRA a second adapter on the same base weights plus a frozen copy of
        the head (kept in the policy as ``old_head``); else a frozen copy of the policy."""
        if self.uses_lora:
            snapshot_adapter(self.backbone.model)
            self.old_head = frozen_copy(self.head)
            return OFTAdapterPolicy(self)
        return frozen_copy(self)

    def ensure_adapters(self, names) -> None:
        for name in sorted(set(names) - {TRAIN_ADAPTER}):
            if name not in self.backbone.model.peft_config:
                snapshot_adapter(self.backbone.model, dst=name)

    def routed_adapter(self, instructions: list[str]) -> str | None:
        if self.adapter_routes:
            raise ValueError("PerTaskAdapters with OFTPolicy: not supported (the action head is shared "
                             "between adapters, so tasks would not be isolated)")
        return None

    def save_adapter(self, path: str) -> None:
        self.backbone.model.save_pretrained(path, selected_adapters=[TRAIN_ADAPTER])


class OFTAdapterPolicy:
    """The frozen old OFT policy under LoRA: adapter ``old`` and the frozen ``old_head``. Not an
    nn.Module: its weights live (and are checkpointed) in the policy."""

    def __init__(self, policy: OFTPolicy, name: str = OLD_ADAPTER):
        self.policy, self.name = policy, name

    @torch.no_grad()
    def act(self, images, prompts, greedy: bool = False) -> ChunkOutput:
        with active_adapter(self.policy.backbone.model, self.name):
            return self.policy._act(images, prompts, greedy, self.policy.old_head)

    @torch.no_grad()
    def evaluate(self, images, prompts, tokens) -> ChunkOutput:
        with active_adapter(self.policy.backbone.model, self.name):
            mu, log_b, phi, emb = self.policy._forward(images, prompts, self.policy.old_head)
        return self.policy._output(tokens.to(mu.dtype), mu, log_b, phi, emb)
