"""OpenVLA as a kit backbone (``VLMBackbone``): prompt, image preprocessing, and the model from a
local checkpoint directory (``pretrained``) or a tiny random one (``config``).

What OpenVLA's released checkpoints expect, and the kit reproduces:
* prompt ``"In: What action should the robot take to {instruction.lower()}?\\nOut:"``, tokenized
  without special tokens, BOS (id 1) first, then token 29871 ("▁") appended; the kit puts the
  image placeholders right after BOS: [BOS, n_patches placeholders, prompt ids..., 29871];
* pixel_values [B, 6, S, S] in the model dtype: the uint8 frame resized straight to S x S by PIL
  (bicubic, antialias), /255, channels 0-2 with ImageNet mean/std (DINOv2), 3-5 with 0.5/0.5 (SigLIP);
* actions: the last ``bins`` ids of the 32000-id base vocabulary (``VLMBackbone.action_token_ids``);
  de-normalisation with the checkpoint's norm stats is the policy's codec (``norm_stats``, ``unnorm_key``).
Nothing is downloaded: a path that is not a local directory is an error.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from modules.policy.backbone import VLMBackbone
from modules.policy.openvla.checkpoint import load_checkpoint
from modules.policy.openvla.tiny import tiny_openvla
from modules.policy.openvla.tokenizer import SPACE_ID, load_tokenizer

KEY = "model.policy.init_args.backbone.init_args"
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _local_dir(path: str, key: str = f"{KEY}.pretrained") -> str:
    full = os.path.expanduser(path)
    if os.path.isdir(full):
        return full
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(full):
        raise ValueError(f"{key}={path!r}: not a local directory; the kit never downloads from the hub "
                         f"(download it first, e.g. `huggingface-cli download {path} --local-dir DIR`, and pass DIR)")
    raise FileNotFoundError(f"{key}={path!r}: no such checkpoint directory")


def pil_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> [B, 3, size, size] as OpenVLA's image processor resizes (torchvision's
    ``resize`` on a PIL image, i.e. ``Image.resize(BICUBIC)``): PIL itself, whose two passes round to
    uint8 in between (a float bicubic resize rounded once differs by a grey level here and there)."""
    from PIL import Image

    frames = images.to("cpu", torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    out = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device)


class OpenVLABackbone(VLMBackbone):
    prompt_suffix_ids = (SPACE_ID,)  # OpenVLA's predict_action appends 29871 after "Out:"

    def __init__(self, pretrained: str | None = None, config: dict | None = None, dtype: str = "float32",
                 adapter: str | None = None):
        """
        Args:
            pretrained: a local OpenVLA checkpoint directory (config.json, *.safetensors,
                tokenizer.json); nothing is downloaded.
            config: a tiny random model instead (keys: modules/policy/openvla/tiny.py).
            dtype: ``float32`` (CPU) or ``bfloat16`` (GPU).
            adapter: a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)
                fine-tuned from ``pretrained``, merged into its weights at load; null: none.
        """
        super().__init__()
        self.source = pretrained
        if (pretrained is None) == (config is None):
            raise ValueError(f"{KEY}.pretrained / {KEY}.config: give exactly one (a local OpenVLA "
                             "checkpoint directory, or a tiny model's config)")
        if dtype not in DTYPES:
            raise ValueError(f"{KEY}.dtype={dtype!r}: one of {sorted(DTYPES)}")
        if adapter is not None and pretrained is None:
            raise ValueError(f"{KEY}.adapter={adapter!r}: needs {KEY}.pretrained (the weights it was trained from)")
        if pretrained is not None:
            path = _local_dir(pretrained)
            adapter = None if adapter is None else _local_dir(adapter, f"{KEY}.adapter")
            self.tokenizer = load_tokenizer(path, f"{KEY}.pretrained")
            self.model = load_checkpoint(path, f"{KEY}.pretrained", DTYPES[dtype], adapter, f"{KEY}.adapter")
        else:
            self.model, self.tokenizer = tiny_openvla(dict(config), f"{KEY}.config")
            self.model.to(DTYPES[dtype])
        self.image_token_id = self.model.config.image_token_index
        spec = self.model.config.tower_specs[0]
        self.image_size, self._image_tokens = spec.image_size, spec.patches

    def prompt(self, instruction: str) -> str:
        return f"In: What action should the robot take to {instruction.lower()}?\nOut:"

    @property
    def image_token_count(self) -> int:
        return self._image_tokens

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The towers' mean and std [1, 6, 1, 1] on ``device``, made once (a new tensor from Python
        values on a GPU is a host-to-device copy that waits for the GPU, at every call)."""
        cached = getattr(self, "_norm_constants", None)
        if cached is None or cached[0].device != device:
            cached = tuple(torch.tensor(v, device=device).view(1, 6, 1, 1)
                           for v in (DINO_MEAN + SIGLIP_MEAN, DINO_STD + SIGLIP_STD))
            self._norm_constants = cached
        return cached

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, 6, S, S] (DINOv2 channels, then SigLIP channels)."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = pil_resize(images, self.image_size)
        x = images.float() / 255.0
        mean, std = self._normalisation(x.device)
        dtype = self.model.get_output_embeddings().weight.dtype
        return ((torch.cat([x, x], 1) - mean) / std).to(dtype)
