"""A trained policy -> the files a policy config loads it from (the end of SFT, the start of RL).

* ``OpenVLABackbone``: an OpenVLA checkpoint directory (modules/policy/openvla/export.py),
  loaded by ``backbone.init_args.pretrained: DIR``;
* ``TinyLlava``: ``tiny_llava.pt`` (its ``init_args`` and weights), loaded by
  ``backbone.init_args.checkpoint: DIR/tiny_llava.pt``;
* ``OFTPolicy``: also ``action_head.pt`` (the chunk head), loaded by
  ``policy.init_args.head_checkpoint: DIR/action_head.pt``;
* always ``dataset_statistics.json`` (when statistics are given), for ``norm_stats: DIR``.

LoRA adapters are merged into the exported weights (as OpenVLA's fine-tuning script saves a
LoRA run); the policy being trained is not changed.
"""
from __future__ import annotations

import copy
import json
import os

import torch

HEAD_FILE, TINY_LLAVA_FILE = "action_head.pt", "tiny_llava.pt"


def merged_model(backbone):
    """The backbone's transformers model with the trainable LoRA adapter merged in (a copy),
    or the model itself without LoRA."""
    model = backbone.model
    if hasattr(model, "merge_and_unload"):
        from modules.policy.lora import TRAIN_ADAPTER

        model = copy.deepcopy(model).merge_and_unload(adapter_names=[TRAIN_ADAPTER])
    return model


def export_policy(policy, path: str, norm_stats: dict | None = None) -> str:
    from modules.policy.openvla import OpenVLABackbone
    from modules.policy.tiny_llava import TinyLlava

    backbone = policy.backbone
    os.makedirs(path, exist_ok=True)
    if isinstance(backbone, OpenVLABackbone):
        from modules.policy.openvla.export import save_checkpoint

        save_checkpoint(merged_model(backbone), backbone.tokenizer, path, norm_stats)
    elif isinstance(backbone, TinyLlava):
        state = {k: v.detach().cpu() for k, v in merged_model(backbone).state_dict().items()}
        torch.save({"init_args": backbone.init_args, "state_dict": state}, os.path.join(path, TINY_LLAVA_FILE))
    else:
        raise ValueError(f"model.policy.init_args.backbone: exporting a {type(backbone).__name__} is not supported "
                         "(OpenVLABackbone or TinyLlava)")
    if hasattr(policy, "head"):
        torch.save({k: v.detach().cpu() for k, v in policy.head.state_dict().items()}, os.path.join(path, HEAD_FILE))
    if norm_stats:
        with open(os.path.join(path, "dataset_statistics.json"), "w") as f:
            json.dump(norm_stats, f, indent=2)
    return path
