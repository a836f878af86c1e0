"""A trained policy -> the files a policy config loads it from (the end of SFT, the start of RL).

* ``TokenVLAPolicy`` on an ``OpenVLABackbone``: an OpenVLA checkpoint directory
  (modules/policy/openvla/export.py), loaded by ``backbone.init_args.pretrained: DIR``;
* ``OFTPolicy`` on an ``OpenVLABackbone`` (or ``OFTOpenVLABackbone``): an OpenVLA-OFT checkpoint
  directory, i.e. the OpenVLA one plus OFT's ``action_head--sft_checkpoint.pt`` (and
  ``proprio_projector--sft_checkpoint.pt`` when the policy reads proprio) under OFT's parameter
  names (modules/policy/openvla/oft_checkpoint.py), loaded by
  ``backbone: {class_path: modules.policy.openvla.OFTOpenVLABackbone, init_args: {pretrained: DIR}}``.
  OFT's format holds the head's MLP only: the Laplace scale starts again from ``init_scale`` (SFT's
  L1 loss does not train it) and the placeholders' embeddings are OFT's zeros (``learned_slots``
  must be false);
* ``TokenVLAPolicy`` on a ``TinyLlava``: ``tiny_llava.pt`` (its ``init_args`` and weights), loaded
  by ``backbone.init_args.checkpoint: DIR/tiny_llava.pt``;
* always ``dataset_statistics.json`` (when statistics are given), for ``norm_stats: DIR``.

LoRA adapters are merged into the exported weights (as OpenVLA's fine-tuning script saves a
LoRA run); the policy being trained is not changed.
"""
from __future__ import annotations

import copy
import json
import os
import re

import torch

from modules.checkpoint_io import atomic_save

TINY_LLAVA_FILE = "tiny_llava.pt"
HEAD_FILE, PROPRIO_FILE = "action_head--sft_checkpoint.pt", "proprio_projector--sft_checkpoint.pt"
KEY = "model.policy.init_args"


def merged_model(backbone):
    """The backbone's transformers model with the trainable LoRA adapter merged in (a copy),
    or the model itself without LoRA."""
    model = backbone.model
    if hasattr(model, "merge_and_unload"):
        from modules.policy.lora import TRAIN_ADAPTER

        model = copy.deepcopy(model).merge_and_unload(adapter_names=[TRAIN_ADAPTER])
    return model


def _oft_name(kit_name: str) -> str:
    """``inp.1.weight`` -> ``model.fc1.weight``: a kit MLPResNet name under OFT's (HEAD_NAMES reversed)."""
    from modules.policy.openvla.oft_checkpoint import HEAD_NAMES

    for oft, kit in HEAD_NAMES:
        m = re.match(re.escape(kit).replace(re.escape(r"\1"), r"(\d+)"), kit_name)
        if m is not None:
            prefix = oft.replace(r"(\d+)", m.group(1) if m.groups() else "").replace("\\", "")
            return prefix + kit_name[m.end():]
    raise ValueError(f"export: no OFT name for action head parameter {kit_name}")


def oft_head_state(head) -> dict[str, torch.Tensor]:
    """A ``LaplaceChunkHead``'s MLP as OFT's ``action_head`` file holds it."""
    return {_oft_name(k): v.detach().cpu().clone() for k, v in head.mlp.state_dict().items()}


def _check_exportable(policy, backbone) -> None:
    from modules.policy.openvla import OpenVLABackbone
    from modules.policy.tiny_llava import TinyLlava

    is_oft = hasattr(policy, "head")
    if isinstance(backbone, OpenVLABackbone) or (isinstance(backbone, TinyLlava) and not is_oft):
        if is_oft and policy.head.slots.requires_grad:
            raise ValueError(f"{KEY}.learned_slots=true: OFT's checkpoint format has no learned action "
                             "placeholders (they are zeros); export needs learned_slots: false")
        return
    raise ValueError(f"{KEY}.backbone: exporting {type(policy).__name__} on a {type(backbone).__name__} is not "
                     "supported (OpenVLABackbone; TinyLlava for token policies)")


def export_policy(policy, path: str, norm_stats: dict | None = None) -> str:
    from modules.policy.openvla import OpenVLABackbone

    backbone = policy.backbone
    _check_exportable(policy, backbone)
    os.makedirs(path, exist_ok=True)
    if isinstance(backbone, OpenVLABackbone):
        from modules.policy.openvla.export import save_checkpoint

        save_checkpoint(merged_model(backbone), backbone.tokenizer, path, norm_stats)
    else:
        state = {k: v.detach().cpu() for k, v in merged_model(backbone).state_dict().items()}
        atomic_save({"init_args": backbone.init_args, "state_dict": state}, os.path.join(path, TINY_LLAVA_FILE))
    if hasattr(policy, "head"):
        atomic_save(oft_head_state(policy.head), os.path.join(path, HEAD_FILE))
        if policy.proprio is not None:
            proprio = {k: v.detach().cpu().clone() for k, v in policy.proprio.state_dict().items()}
            atomic_save(proprio, os.path.join(path, PROPRIO_FILE))
    if norm_stats:
        with open(os.path.join(path, "dataset_statistics.json"), "w") as f:
            json.dump(norm_stats, f, indent=2)
    return path
