"""OpenVLA-OFT's inputs on the kit's OpenVLA: several camera images and a proprio token.

An OpenVLA-OFT checkpoint folder is an OpenVLA one (the VLA weights, LoRA merged; or the base
weights plus ``adapter``) with the action head, the proprio projector and
``dataset_statistics.json`` beside it (modules/policy/openvla/oft_checkpoint.py). This backbone
loads the VLA and lays out OFT's prompt; ``OFTPolicy`` (modules/policy/oft_vla.py) loads the
head and the projector from ``checkpoint_dir`` and runs OFT's forward.

The prompt, as OFT's ``predict_action`` builds it (the kit's placeholders stand where OFT
splices embeddings in):
  [BOS, num_images x n_patches image placeholders (third-person first, then wrist),
   the proprio placeholder (when proprio is used), "In: What action ... ?\\nOut:" ids, 29871]
The policy appends the action placeholders and the stop token.
"""
from __future__ import annotations

import os

import torch

from modules.policy.openvla.backbone import KEY, OpenVLABackbone
from modules.policy.openvla.config import PROPRIO_PLACEHOLDER_ID
from modules.policy.openvla.oft_checkpoint import find_component


class OFTOpenVLABackbone(OpenVLABackbone):
    def __init__(self, pretrained: str | None = None, config: dict | None = None, dtype: str = "float32",
                 adapter: str | None = None, num_images: int = 2, proprio: bool | None = None):
        """
        Args:
            pretrained: a local OpenVLA-OFT checkpoint directory: config.json, *.safetensors,
                tokenizer.json, ``action_head--*checkpoint.pt``, optionally
                ``proprio_projector--*checkpoint.pt`` and dataset_statistics.json.
            config: a random model instead (keys: modules/policy/openvla/tiny.py).
            dtype: ``float32`` (CPU) or ``bfloat16`` (GPU).
            adapter: a PEFT LoRA adapter folder (OFT's ``lora_adapter/``) merged into
                ``pretrained``'s weights at load; null: the weights are already merged.
            num_images: camera images per observation: 1 (third-person) or 2 (+ wrist, OFT on LIBERO).
            proprio: feed the proprioceptive state as one token; null: when ``pretrained`` has a
                proprio projector (a random model: no).
        """
        super().__init__(pretrained=pretrained, config=config, dtype=dtype, adapter=adapter)
        if num_images not in (1, 2):
            raise ValueError(f"{KEY}.num_images={num_images!r}: 1 (third-person camera) or 2 (and the wrist camera)")
        self.num_images = num_images
        self.checkpoint_dir = None if pretrained is None else os.path.expanduser(pretrained)
        self.action_head_file = self.proprio_projector_file = None
        if self.checkpoint_dir is not None:
            key = f"{KEY}.pretrained"
            self.action_head_file = find_component(self.checkpoint_dir, "action_head", key)
            if self.action_head_file is None:
                raise FileNotFoundError(f"{key}={pretrained!r}: no action_head--*checkpoint.pt (OpenVLA-OFT's "
                                        "L1-regression action head)")
            projector = find_component(self.checkpoint_dir, "proprio_projector", key)
            if proprio and projector is None:
                raise FileNotFoundError(f"{KEY}.proprio=True: {pretrained!r} has no proprio_projector--*checkpoint.pt")
            if proprio is None:
                proprio = projector is not None
            self.proprio_projector_file = projector if proprio else None
        self.uses_proprio = bool(proprio)
        self.proprio_token_id = PROPRIO_PLACEHOLDER_ID

    @property
    def image_token_count(self) -> int:
        return self.num_images * super().image_token_count

    def _tokenize_one(self, instruction: str) -> tuple[list[int], list[bool]]:
        ids, goal = super()._tokenize_one(instruction)
        if not self.uses_proprio:
            return ids, goal
        at = len(ids) - ids[::-1].index(self.image_token_id)  # right after the last image placeholder
        return ids[:at] + [self.proprio_token_id] + ids[at:], goal[:at] + [False] + goal[at:]

    def pixel_values(self, views: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [B, 3, H, W] per camera -> [B, 6 x cameras, S, S] (OFT's channel-stacked images)."""
        return torch.cat([self.preprocess(v) for v in views], 1)
