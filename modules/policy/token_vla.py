"""An autoregressive token VLA: a vision-language backbone whose action is a short sequence
of action tokens (the last ``action_bins`` ids of the vocabulary, as in OpenVLA).

* Sampling is restricted to the action tokens (a token outside them has no action; VLA-RL's
  public code sampled the whole vocabulary) and uses ``logits / temperature``.
* log pi(a | s, g) = sum over the action tokens of log_softmax(logits / T) at the token,
  computed the same way when acting (prefill + KV-cached decode) and when training
  (one teacher-forced forward over prompt + action tokens).
* The same forward returns phi(s) and emb(g) (mean of the last hidden states over the
  instruction's token positions), so the critics never cost a second backbone pass.
  ``feature_pooling`` picks phi: ``image_mean`` (default; the mean over the image positions:
  with the image first in the sequence, OpenVLA's order, a causal model's phi does not depend
  on the instruction; a tiny backbone's ``image_position: after_instruction`` makes it read it), ``last`` (the last prompt position, the one that predicts the first action
  token: it reads the image and the instruction) or ``image_flat`` (the image positions'
  hidden states concatenated in patch order, [B, patches x H]: where each thing is in an
  egocentric view survives, as in a conv net's flatten; for tiny backbones only: OpenVLA-7B
  would give 256 x 4096 features). emb(g) reads the image either way.

Speed and memory knobs (``model.policy.init_args.*``; none changes a log-prob):
* ``decoding``: ``dynamic`` (default; transformers' dynamic KV cache, any backbone),
  ``static`` (preallocated KV cache, the decode step as one function) or ``cuda_graph``
  (static, and the decode step replayed as a CUDA graph; on a CPU it runs as ``static``).
  The last two need an OpenVLA backbone (modules/policy/openvla/decoding.py).
* ``compile_decode``: ``torch.compile`` the decode step (``static`` / ``cuda_graph`` only).
* ``gradient_checkpointing``: recompute every transformer layer's activations in the backward
  pass (vision towers and LLM; non-reentrant, so it works with frozen bases and LoRA). It is
  paused inside ``act`` (no gradients there, and it would disable the KV cache).
* precision: the backbone's ``dtype`` (``bfloat16`` on a GPU); LoRA weights stay float32 (PEFT),
  action log-probs and features are computed in float32.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from modules.critics import frozen_copy
from modules.policy.action_codec import make_action_codec
from modules.policy.base import VLAPolicy
from modules.policy.backbone import EncodedPrompts, VLMBackbone, positions_from_mask
from modules.policy.lora import (TRAIN_ADAPTER, AdapterPolicy, LoRA, apply_lora, ensure_adapters, lora_kwargs,
                                 snapshot_adapter)


@dataclass
class PolicyOutput:
    tokens: torch.Tensor  # [B, n] action-bin indices in [0, bins)
    log_prob: torch.Tensor  # [B] sum over action tokens
    token_log_probs: torch.Tensor  # [B, n, bins] log-softmax over the action vocabulary
    entropy: torch.Tensor  # [B] sum over action tokens
    phi: torch.Tensor  # [B, H] state features
    emb: torch.Tensor  # [B, H] goal (instruction) features


def set_gradient_checkpointing(model: nn.Module, enable: bool) -> int:
    """Switch transformers' per-layer activation checkpointing on every layer of ``model``
    (through PEFT wrappers), non-reentrant. Returns the number of checkpointed layers."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            module.gradient_checkpointing = enable
            layers += isinstance(module, GradientCheckpointingLayer)
    return layers


FEATURE_POOLING = ("image_mean", "last", "image_flat")


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class TokenVLAPolicy(VLAPolicy):
    def __init__(self, backbone: VLMBackbone, action_tokens: int = 1, action_bins: int = 3,
                 temperature: float = 1.0, lora: LoRA | None = None,
                 norm_stats: str | None = None, unnorm_key: str | None = None,
                 decoding: str = "dynamic", compile_decode: bool = False, gradient_checkpointing: bool = False,
                 feature_pooling: str = "image_mean"):
        """
        Args:
            backbone: the vision-language model (``TinyLlava``, ``OpenVLABackbone``,
                ``HFVisionLanguageBackbone``).
            action_tokens: tokens per action (OpenVLA: 7, one per action dimension).
            action_bins: bins per token: the last ``action_bins`` ids of the vocabulary.
            temperature: sampling temperature while training (log-probs use the same).
            lora: PEFT LoRA on the backbone, ``{r, alpha, dropout, target_modules}``; null: full
                fine-tuning. With LoRA the frozen old policy is a second adapter.
            norm_stats: a checkpoint directory or JSON file with q01/q99 statistics, to
                de-normalise token actions (modules/policy/action_codec.py); null: bin centres.
            unnorm_key: the dataset entry of ``norm_stats`` (e.g. ``libero_goal_no_noops``).
            decoding: ``dynamic``, ``static`` (preallocated KV cache) or ``cuda_graph`` (OpenVLA only).
            compile_decode: ``torch.compile`` the decode step (``static`` / ``cuda_graph``).
            gradient_checkpointing: recompute every layer's activations in the backward pass.
            feature_pooling: phi(s): ``image_mean``, ``last`` (the last prompt position) or
                ``image_flat`` (tiny backbones only).
        """
        super().__init__()
        if action_tokens < 1 or action_bins < 2:
            raise ValueError(f"action_tokens={action_tokens}, action_bins={action_bins}: "
                             "need >= 1 token and >= 2 bins")
        if temperature <= 0:
            raise ValueError(f"model.policy.temperature={temperature}: must be > 0")
        if feature_pooling not in FEATURE_POOLING:
            raise ValueError(f"model.policy.init_args.feature_pooling={feature_pooling!r}: one of {list(FEATURE_POOLING)}")
        self.feature_pooling = feature_pooling
        from modules.policy.openvla.decoding import MODES, StaticDecoder

        if decoding not in MODES:
            raise ValueError(f"model.policy.init_args.decoding={decoding!r}: one of {list(MODES)}")
        if compile_decode and decoding == "dynamic":
            raise ValueError("model.policy.init_args.compile_decode=true needs decoding: static or cuda_graph")
        self.backbone = backbone
        self.uses_lora = lora is not None
        if self.uses_lora:
            backbone.model = apply_lora(backbone.model, **lora_kwargs(lora))
        # instruction -> LoRA adapter used when acting on it (per-task adapters); others: default
        self.adapter_routes: dict[str, str] = {}
        self.action_tokens, self.action_bins, self.temperature = action_tokens, action_bins, temperature
        # continuous actions (several tokens): OpenVLA's bins and de-normalisation
        self.codec = make_action_codec(action_bins, norm_stats, unnorm_key) if action_tokens > 1 else None
        self.register_buffer("action_ids", backbone.action_token_ids(action_bins), persistent=False)
        self.decoding = decoding
        self._decoder = None if decoding == "dynamic" else StaticDecoder(self, decoding, compile_decode)
        if decoding != "dynamic":
            self._decoder._vlm  # noqa: B018 -- a backbone it cannot drive fails here, not at the first act()
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing and not set_gradient_checkpointing(backbone.model, True):
            raise ValueError(f"model.policy.init_args.gradient_checkpointing=true: {type(backbone).__name__}'s model "
                             "has no transformers layers to checkpoint")

    @property
    def feature_dim(self) -> int:
        """Width of phi(s)."""
        if self.feature_pooling == "image_flat":
            return self.backbone.image_token_count * self.backbone.hidden_size
        return self.backbone.hidden_size

    @property
    def goal_dim(self) -> int:
        """Width of emb(g)."""
        return self.backbone.hidden_size

    def encode(self, instructions: list[str]) -> EncodedPrompts:
        return self.backbone.encode(instructions).to(self.action_ids.device)

    def _action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the action tokens only: [..., H] -> [..., bins], divided by T."""
        w = self.backbone.model.get_output_embeddings().weight[self.action_ids]
        return (hidden @ w.T).float() / self.temperature

    def _features(self, hidden: torch.Tensor, prompts: EncodedPrompts):
        """hidden: the prompt's last hidden states [B, L, H] (left-padded) -> (phi(s), emb(g))."""
        if self.feature_pooling == "image_mean":
            phi = _masked_mean(hidden, prompts.image_mask)
        elif self.feature_pooling == "image_flat":  # every prompt has the same number of image positions
            phi = hidden[prompts.image_mask].reshape(hidden.shape[0], -1)
        else:
            phi = hidden[:, -1]
        return phi.float(), _masked_mean(hidden, prompts.goal_mask).float()

    @contextmanager
    def _checkpointing_paused(self):
        paused = [m for m in self.backbone.model.modules() if getattr(m, "gradient_checkpointing", False) is True] \
            if self.gradient_checkpointing else []
        for m in paused:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m in paused:
                m.gradient_checkpointing = True

    def act_batch_hint(self) -> int | None:
        """With a static / CUDA-graph decoder: the batch of its most recent cache (acting's), so
        other ``act`` passes (next values, anchor targets) reuse that cache and its graphs."""
        return None if self._decoder is None else self._decoder.kept_batch

    def release_decode_cache(self) -> None:
        """Free the static KV cache and CUDA graphs kept between ``act`` calls (``decoding``
        static / cuda_graph), e.g. before a memory-hungry update."""
        if self._decoder is not None:
            self._decoder.release()

    @torch.no_grad()
    def act(self, images: torch.Tensor, prompts: EncodedPrompts, greedy: bool = False) -> PolicyOutput:
        """One prefill, then exactly ``action_tokens - 1`` KV-cached decode steps."""
        with self._checkpointing_paused():
            if self._decoder is not None:
                tokens, logps, hidden = self._decoder.act(self.backbone.preprocess(images), prompts, greedy)
                phi, emb = self._features(hidden, prompts)
                return self._output(tokens, logps, phi, emb)
            return self._act_dynamic(images, prompts, greedy)

    def _act_dynamic(self, images: torch.Tensor, prompts: EncodedPrompts, greedy: bool) -> PolicyOutput:
        pixel_values = self.backbone.preprocess(images)
        mask = prompts.attention_mask
        pos = positions_from_mask(mask)
        hidden, cache = self.backbone(prompts.input_ids, mask, pixel_values, pos, use_cache=True)
        phi, emb = self._features(hidden, prompts)
        tokens, logps = [], []
        h_last = hidden[:, -1]
        for k in range(self.action_tokens):
            logp = torch.log_softmax(self._action_logits(h_last), -1)
            tok = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(-1)
            tokens.append(tok)
            logps.append(logp)
            if k + 1 < self.action_tokens:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                pos = pos[:, -1:] + 1
                h, cache = self.backbone(self.action_ids[tok][:, None], mask, None, pos,
                                         past_key_values=cache, use_cache=True)
                h_last = h[:, -1]
        return self._output(torch.stack(tokens, 1), torch.stack(logps, 1), phi, emb)

    def evaluate(self, images: torch.Tensor, prompts: EncodedPrompts, tokens: torch.Tensor) -> PolicyOutput:
        """Teacher-forced training forward over prompt + action tokens (one backbone pass)."""
        pixel_values = self.backbone.preprocess(images)
        n = self.action_tokens
        ids = torch.cat([prompts.input_ids, self.action_ids[tokens[:, : n - 1]]], 1)
        mask = torch.cat([prompts.attention_mask, prompts.attention_mask.new_ones(len(ids), n - 1)], 1)
        hidden, _ = self.backbone(ids, mask, pixel_values)
        length = prompts.input_ids.shape[1]
        phi, emb = self._features(hidden[:, :length], prompts)
        logp = torch.log_softmax(self._action_logits(hidden[:, length - 1:]), -1)
        return self._output(tokens, logp, phi, emb)

    @staticmethod
    def _output(tokens, token_log_probs, phi, emb) -> PolicyOutput:
        chosen = token_log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
        entropy = -(token_log_probs.exp() * token_log_probs).sum(-1).sum(-1)
        return PolicyOutput(tokens, chosen, token_log_probs, entropy, phi, emb)

    def snapshot(self):
        """The frozen old policy pi_old: a second LoRA adapter on the same base weights, or
        (full fine-tuning) a frozen copy."""
        if self.uses_lora:
            snapshot_adapter(self.backbone.model)
            return AdapterPolicy(self)
        return frozen_copy(self)

    def ensure_adapters(self, names) -> None:
        """Create the LoRA adapters ``names`` (e.g. before loading a checkpoint that has them)."""
        ensure_adapters(self.backbone.model, names)

    def routed_adapter(self, instructions: list[str]) -> str | None:
        """The adapter all ``instructions`` are routed to, or None (the trainable one)."""
        names = {self.adapter_routes.get(s) for s in instructions}
        if len(names) > 1:
            raise ValueError(f"a batch mixes instructions routed to different adapters: {sorted(map(str, names))}")
        return names.pop() if names else None

    def save_adapter(self, path: str) -> None:
        """The trainable LoRA adapter in PEFT's format (``PeftModel.from_pretrained``)."""
        self.backbone.model.save_pretrained(path, selected_adapters=[TRAIN_ADAPTER])

    def env_action(self, tokens: torch.Tensor) -> torch.Tensor:
        """Action-bin indices -> the env's action: a discrete env (one token) takes the index;
        several tokens decode to a continuous action [B, action_tokens] (float32)."""
        if self.action_tokens == 1:
            return tokens[:, 0]
        return self.codec.decode(tokens).float()
