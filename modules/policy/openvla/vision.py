"""OpenVLA's fused vision backbone on transformers' own towers.

Contract points:
* pixel_values [B, 6, S, S]: channels 0-2 go to DINOv2, channels 3-5 to SigLIP;
* each tower's features are the output of its **second-to-last** block (timm's
  ``get_intermediate_layers(n={depth - 2})``, no final norm), so the kit builds depth - 1 blocks
  and no final norm / pooling head at all (nothing unused to train, load or sync);
* prefix tokens (DINOv2's class + 4 registers) are dropped; features are concatenated per
  patch: [B, n_patches, D_dino + D_siglip];
* several images per sample (OpenVLA-OFT: third-person + wrist camera): pixel_values
  [B, 6 n, S, S], image i in channels 6i..6i+5; each image goes through the towers on its own
  (the n images of a batch run as one batch of B n) and their patches follow each other:
  [B, n n_patches, D], image 0's first.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from modules.policy.openvla.config import TowerSpec


def _dinov2(spec: TowerSpec, initializer_range: float) -> Dinov2WithRegistersModel:
    if spec.mlp_size % spec.hidden_size:  # transformers' config takes an integer mlp_ratio
        raise ValueError(f"DINOv2 MLP size {spec.mlp_size} is not a multiple of its width {spec.hidden_size}")
    config = Dinov2WithRegistersConfig(
        hidden_size=spec.hidden_size, num_hidden_layers=spec.depth - 1, num_attention_heads=spec.heads,
        mlp_ratio=spec.mlp_size // spec.hidden_size, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        image_size=spec.image_size, patch_size=spec.patch_size, num_channels=3,
        num_register_tokens=spec.registers, layerscale_value=1.0, drop_path_rate=0.0,
        initializer_range=initializer_range)
    config._attn_implementation = "sdpa"
    tower = Dinov2WithRegistersModel(config)
    tower.layernorm = nn.Identity()  # features come before the final norm
    tower.embeddings.mask_token.requires_grad_(False)  # masked-image pretraining only: never used here
    return tower


def _siglip(spec: TowerSpec, initializer_range: float) -> SiglipVisionModel:
    config = SiglipVisionConfig(
        hidden_size=spec.hidden_size, intermediate_size=spec.mlp_size, num_hidden_layers=spec.depth - 1,
        num_attention_heads=spec.heads, image_size=spec.image_size, patch_size=spec.patch_size,
        num_channels=3, hidden_act="gelu",  # timm's nn.GELU (exact), not SigLIP's usual tanh approximation
        layer_norm_eps=1e-6, vision_use_head=False, initializer_range=initializer_range)
    config._attn_implementation = "sdpa"
    tower = SiglipVisionModel(config)
    tower.post_layernorm = nn.Identity()
    return tower


class PrismaticVisionBackbone(nn.Module):
    def __init__(self, specs: list[TowerSpec], initializer_range: float = 0.02):
        super().__init__()
        dino, siglip = specs
        self.specs = specs
        self.featurizer = _dinov2(dino, initializer_range)
        self.fused_featurizer = _siglip(siglip, initializer_range)
        self.embed_dim = dino.hidden_size + siglip.hidden_size

    @property
    def num_patches(self) -> int:
        return self.specs[0].patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, channels, h, w = pixel_values.shape
        views = channels // 6
        if channels != 6 * views or views < 1:
            raise ValueError(f"pixel_values with {channels} channels: expected 6 per image")
        if views > 1:  # [B, 6n, S, S] -> [B n, 6, S, S] -> features [B, n patches, D]
            return self(pixel_values.reshape(b * views, 6, h, w)).reshape(b, -1, self.embed_dim)
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        patches = self.featurizer(pixel_values=img).last_hidden_state[:, self.specs[0].prefix_tokens:]
        fused = self.fused_featurizer(pixel_values=img_fused).last_hidden_state[:, self.specs[1].prefix_tokens:]
        return torch.cat([patches, fused], dim=2)
