"""A PEFT LoRA adapter folder merged into an OpenVLA checkpoint's weights while they load.

OpenVLA's and OpenVLA-OFT's fine-tuning scripts save LoRA adapters with PEFT
(``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``) on their own module tree
(timm towers with a fused ``qkv``), whose names the kit's model does not share (it splits
``qkv`` into q/k/v: modules/policy/openvla/checkpoint.py). So PEFT's ``merge_and_unload`` cannot
run on the kit's model; the merge is done here on the checkpoint's tensors, by their OpenVLA
names, before the name mapping, with PEFT's own formula:

    W <- W + (alpha / r) * B @ A            (``use_rslora``: alpha / sqrt(r))

for ``nn.Linear`` and, for ``nn.Conv2d`` (PEFT 0.11's ``all-linear`` also adapts the towers'
``patch_embed.proj``: its target names match module-name suffixes), the 1 x 1 ``B`` times the
k x k ``A`` per output / input channel. The sum is taken in float32. Entries PEFT saves besides
the adapter (``base_layer.weight`` copies of adapted embedding / output layers) are the base
weights again and are not read. Anything else (DoRA, per-module ranks, embedding LoRA, a key
that names no checkpoint tensor) is one clear error.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."


def read_adapter(path: str, key: str) -> dict[str, torch.Tensor]:
    """The adapter folder -> {OpenVLA weight name: the float32 delta to add to it}."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{key}={path!r}: no adapter_config.json (a PEFT LoRA adapter folder)")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{key}={path!r}: adapter_config.json peft_type={config.get('peft_type')!r}, not a LoRA adapter")
    for field in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out"):
        if config.get(field):
            raise ValueError(f"{key}={path!r}: adapter_config.json {field}={config[field]!r} is not supported")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    weights = _adapter_weights(path, key)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in weights.items():
        if not name.startswith(PREFIX):
            raise ValueError(f"{key}={path!r}: adapter weight {name!r} does not start with {PREFIX!r}")
        name = name[len(PREFIX):]
        if name.endswith(".base_layer.weight"):
            continue  # a copy of the base weight (PEFT's save_embedding_layers)
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if m is None:
            raise ValueError(f"{key}={path!r}: adapter weight {PREFIX + name!r} is not a LoRA A/B matrix")
        pairs.setdefault(m[1], {})[m[2]] = t.float()
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{key}={path!r}: adapter has lora_{''.join(ab)} but not both matrices for {module!r}")
        deltas[f"{module}.weight"] = scale * _delta(ab["A"], ab["B"])
    return deltas


def _adapter_weights(path: str, key: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(file):
        return load_file(file)
    file = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(file):
        return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{key}={path!r}: no adapter_model.safetensors (or adapter_model.bin)")


def _delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A for a Linear ([out, r] @ [r, in]) or a Conv2d (B [out, r, 1, 1], A [r, in, k, k])."""
    if a.ndim == 2:
        return b @ a
    return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)


def merge_adapter(items, path: str, key: str):
    """(name, tensor) pairs of a checkpoint with the adapter's deltas added (float32 where merged).
    Every delta must meet a checkpoint tensor of its shape."""
    deltas = read_adapter(path, key)
    for name, t in items:
        delta = deltas.pop(name, None)
        if delta is not None:
            if delta.shape != t.shape:
                raise ValueError(f"{key}={path!r}: adapter update of {name} has shape {tuple(delta.shape)}, "
                                 f"the checkpoint's weight {tuple(t.shape)}")
            t = t.float() + delta
        yield name, t
    if deltas:
        raise ValueError(f"{key}={path!r}: the adapter adapts weights the checkpoint does not have: "
                         f"{sorted(deltas)[:3]} ({len(deltas)})")
