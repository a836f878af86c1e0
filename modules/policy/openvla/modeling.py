"""The OpenVLA ("Prismatic") model on transformers parts: fused vision backbone, projector, Llama.

Laid out like transformers' Llava so the kit's ``VLMBackbone`` uses it unchanged:
``PrismaticForActionPrediction.model`` (``PrismaticModel``: towers + projector + ``LlamaModel``)
returns last hidden states and the KV cache; ``lm_head`` is ``get_output_embeddings()``.

The sequence OpenVLA's checkpoints were trained on: ``[BOS, n_patches projected patches, prompt tokens...]``.
OpenVLA's own code splices the patches in after position 0; the kit marks those positions with
placeholder ids in ``input_ids`` instead (the same sequence, but left padding and batches with
different prompt lengths work) and scatters the projected patches over them.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import LlamaModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from modules.policy.openvla.config import PrismaticConfig
from modules.policy.openvla.vision import PrismaticVisionBackbone


class PrismaticProjector(nn.Module):
    """The fused-backbone projector: fc1 (D -> 4D) -> GELU -> fc2 (-> H) -> GELU -> fc3 (H -> H)."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(patches)))))


def padding_safe_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """A left-padding mask [B, K] -> boolean [B, 1, q, K] for the last q = ``query_length`` positions:
    causal and not padding, and a padding query attends to itself only. transformers' own mask
    leaves a padding query row fully masked; the fused SDPA kernels on CUDA can return NaN there,
    and in the backward pass NaN times a zero gradient makes weight gradients non-finite (seen on
    an H100 in bf16: tests/test_openvla_decode.py). Real rows see exactly what they saw before."""
    k = attention_mask.shape[1]
    kv = torch.arange(k, device=attention_mask.device)
    q = kv[k - query_length:, None]
    mask = (kv[None, :] <= q)[None] & attention_mask.bool()[:, None, :]
    return (mask | (kv[None, :] == q)[None])[:, None]


class PrismaticModel(nn.Module):
    """Everything but the LM head; called with ``pixel_values=None`` for KV-cached decode steps."""

    def __init__(self, config: PrismaticConfig):
        super().__init__()
        self.vision_backbone = PrismaticVisionBackbone(config.tower_specs, config.initializer_range)
        self.projector = PrismaticProjector(self.vision_backbone.embed_dim, config.text_config.hidden_size)
        self.language_model = LlamaModel(config.text_config)
        self.image_token_index = config.image_token_index

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The language model's input embeddings [B, L, H]: token embeddings with the projected patches
        scattered over the image placeholders (what ``forward`` feeds the Llama)."""
        image_mask = input_ids == self.image_token_index
        # the placeholder's own embedding row is never read: it is replaced by a patch
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(image_mask, 0))
        if pixel_values is not None:
            patches = self.projector(self.vision_backbone(pixel_values.to(embeds.dtype)))
            per_row = image_mask.sum(1)
            if (per_row != patches.shape[1]).any():
                raise ValueError(f"each sequence needs {patches.shape[1]} image placeholders "
                                 f"(id {self.image_token_index}), got {per_row.tolist()}")
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), patches.to(embeds.dtype))
        elif image_mask.any():
            raise ValueError("image placeholders in input_ids but no pixel_values")
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, **kwargs):
        embeds = self.embed(input_ids, pixel_values)
        if attention_mask is not None and attention_mask.dim() == 2 and not attention_mask.bool().all():
            attention_mask = padding_safe_mask(attention_mask, embeds.shape[1])
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache, **kwargs)


class PrismaticForActionPrediction(PreTrainedModel):
    config_class = PrismaticConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # the towers' and the Llama's layers (GradientCheckpointingLayer)
    _no_split_modules: ClassVar[list[str]] = ["LlamaDecoderLayer", "Dinov2WithRegistersLayer", "SiglipEncoderLayer"]

    def __init__(self, config: PrismaticConfig):
        super().__init__(config)
        self.model = PrismaticModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)  # not tied (Llama-2)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, L, vocab] at every position (L counts the image placeholders)."""
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state),
                                      past_key_values=out.past_key_values)
