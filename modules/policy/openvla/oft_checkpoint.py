"""The files an OpenVLA-OFT checkpoint folder has besides an OpenVLA one, read by name.

OpenVLA-OFT's fine-tuning (Kim et al., arXiv 2502.19645) saves, next to the VLA weights
(LoRA merged, or the adapter in ``lora_adapter/``) and ``dataset_statistics.json``:

* ``action_head--<step>_checkpoint.pt``: the L1-regression head, an ``MLPResNet``
  (LayerNorm -> Linear -> ReLU, ``mlp_resnet_blocks.i.ffn`` = LayerNorm, Linear, ReLU with a
  residual, LayerNorm -> Linear) from ``action_dim x LLM width`` to ``action_dim``;
* ``proprio_projector--<step>_checkpoint.pt`` (when trained with proprio): Linear(proprio_dim,
  LLM width) -> GELU -> Linear;
* both saved from DDP-wrapped modules (``module.`` prefix; ``<step>`` may be ``latest``).
A folder must hold exactly one file of each kind it uses; two (two steps) is an error naming them.
"""
from __future__ import annotations

import os
import re

import torch

# OFT's MLPResNet -> the kit's (modules/policy/laplace.py)
HEAD_NAMES = [(r"model\.layer_norm1\.", "inp.0."), (r"model\.fc1\.", "inp.1."),
              (r"model\.mlp_resnet_blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.0."),
              (r"model\.mlp_resnet_blocks\.(\d+)\.ffn\.1\.", r"blocks.\1.1."),
              (r"model\.layer_norm2\.", "out.0."), (r"model\.fc2\.", "out.1.")]
PROPRIO_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def find_component(path: str, name: str, key: str) -> str | None:
    """The folder's ``{name}--*checkpoint.pt`` (None when there is none)."""
    found = sorted(f for f in os.listdir(path) if re.fullmatch(rf"{re.escape(name)}--.*checkpoint\.pt", f))
    if len(found) > 1:
        raise ValueError(f"{key}={path!r}: {len(found)} {name} files {found}; keep the one to load")
    return os.path.join(path, found[0]) if found else None


def load_component(file: str) -> dict[str, torch.Tensor]:
    """A saved module's state dict, float32, without DDP's ``module.`` prefix."""
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {(k[len("module."):] if k.startswith("module.") else k): v.float() for k, v in state.items()}


def action_head_state(file: str) -> dict[str, torch.Tensor]:
    """``action_head--*.pt`` -> the state dict of the kit's ``MLPResNet`` (``LaplaceChunkHead.mlp``)."""
    out = {}
    for name, t in load_component(file).items():
        for pattern, kit in HEAD_NAMES:
            m = re.match(pattern, name)
            if m is not None:
                out[m.expand(kit) + name[m.end():]] = t
                break
        else:
            raise ValueError(f"{file}: {name!r} is not a parameter of OFT's L1-regression action head (MLPResNet)")
    if "inp.1.weight" not in out or "out.1.weight" not in out:
        raise ValueError(f"{file}: no model.fc1 / model.fc2 weights: not an L1-regression action head")
    return out


def head_shape(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """in_dim (action_dim x LLM width), hidden, action_dim and blocks of an action head state dict."""
    hidden, in_dim = state["inp.1.weight"].shape
    blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return {"in_dim": in_dim, "hidden": hidden, "action_dim": state["out.1.weight"].shape[0], "blocks": blocks}


def proprio_projector_state(file: str) -> dict[str, torch.Tensor]:
    """``proprio_projector--*.pt`` -> {fc1, fc2}.{weight, bias}."""
    state = load_component(file)
    if sorted(state) != sorted(PROPRIO_NAMES):
        raise ValueError(f"{file}: parameters {sorted(state)}; OFT's proprio projector has {list(PROPRIO_NAMES)}")
    return state
