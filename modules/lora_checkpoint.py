"""Checkpoints of LoRA runs hold the trainable state only and point at the frozen base.

With LoRA the base weights never change (7.5 B parameters, 14 GiB in bf16, for OpenVLA-7B), so a
checkpoint stores everything else - the LoRA adapters (the trainable one, the frozen old policy's,
per-task ones), critics, anchor critics, buffers, optimizer states - and, instead of the base
weights, a ``frozen_base`` record: the base's source (``backbone.source``: the checkpoint file or
folder, with its files' names and sizes) and a fingerprint of every frozen tensor (shape, dtype
and a checksum of up to 4096 evenly spaced values). Resuming builds the model from the
configuration as usual (which loads the base), checks the record against it and puts the base's
tensors back into the checkpoint's state dict, so the module loads exactly what was saved. A base
that is not the one the run was trained on (other files, another model, another seed for a
random one) fails with one line; a missing one fails when the model is built.

The policy's base is found under ``policy.`` (CRLModule, SFTModule); the RPRM's under ``rprm.``
(modules/vla_rl/rprm_module.py, whose checkpoints the reward shaping reads).
"""
from __future__ import annotations

import math
import os

import torch

from modules.checkpoint_io import CheckpointError

ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")
SAMPLES = 4096


def is_adapter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (PEFT's naming)."""
    return any(a in name for a in ADAPTER_PARTS)


def frozen_base_keys(module: torch.nn.Module, prefix: str = "policy.") -> list[str]:
    """State-dict keys of the policy's parameters that never train (LoRA's base), adapters excluded."""
    return [n for n, p in module.named_parameters()
            if n.startswith(prefix) and not p.requires_grad and not is_adapter(n)]


def _checksum(t: torch.Tensor) -> float:
    flat = t.detach().reshape(-1)
    n, k = flat.numel(), min(SAMPLES, flat.numel())
    # evenly spaced indices in exact integer arithmetic: the same on every device (a checkpoint
    # saved from GPU weights is checked against CPU ones)
    idx = torch.arange(k, device=flat.device) * (n - 1) // max(k - 1, 1)
    values = flat[idx].double()
    return float((values * torch.arange(1, len(values) + 1, device=values.device, dtype=torch.float64)).sum())


def _files(source: str | None) -> list | None:
    if source is None or not os.path.exists(source):
        return None
    if os.path.isfile(source):
        return [[os.path.basename(source), os.path.getsize(source)]]
    return sorted([os.path.relpath(os.path.join(root, f), source), os.path.getsize(os.path.join(root, f))]
                  for root, _, files in os.walk(source) for f in files)


def base_record(module: torch.nn.Module, keys: list[str], prefix: str = "policy.") -> dict:
    params = dict(module.named_parameters())
    owner = getattr(module, prefix.rstrip("."))  # the policy or the RPRM: its backbone knows its source
    source = getattr(getattr(owner, "backbone", None), "source", None)
    return {"source": source, "files": _files(source),
            "tensors": {k: [list(params[k].shape), str(params[k].dtype), _checksum(params[k])] for k in keys}}


def drop_frozen_base(module: torch.nn.Module, checkpoint: dict, prefix: str = "policy.",
                     keys: list[str] | None = None) -> None:
    """on_save_checkpoint: the base's tensors (``keys``, default ``frozen_base_keys``) out of the
    state dict, its record in (computed once per run: the base does not change)."""
    keys = frozen_base_keys(module, prefix) if keys is None else keys
    for k in keys:
        checkpoint["state_dict"].pop(k, None)
    cached = getattr(module, "_frozen_base_record", None)
    if cached is None or cached[0] != keys:
        cached = (keys, base_record(module, keys, prefix))
        module._frozen_base_record = cached
    checkpoint["frozen_base"] = cached[1]


def restore_frozen_base(module: torch.nn.Module, checkpoint: dict, prefix: str = "policy.",
                        keys: list[str] | None = None, where: str | None = None) -> None:
    """on_load_checkpoint: check the configured base (``keys``, default ``frozen_base_keys``)
    against the record, then put its tensors back; ``where`` names the checkpoint in errors."""
    saved = checkpoint["frozen_base"]
    keys = frozen_base_keys(module, prefix) if keys is None else keys
    mine = base_record(module, keys, prefix)
    if where is None:
        where = f"model.policy.init_args.backbone (source {mine['source']!r}): the checkpoint (--ckpt_path)"
    where = f"{where} holds a LoRA run's trainable state for the base {saved['source']!r}"
    if set(saved["tensors"]) != set(mine["tensors"]):
        raise CheckpointError(f"{where}, whose frozen weights are other tensors ({len(saved['tensors'])} vs "
                              f"{len(mine['tensors'])} here): build the model with the settings it was trained with")
    if saved["files"] is not None and mine["files"] is not None and saved["files"] != mine["files"]:
        raise CheckpointError(f"{where}, whose files differ (names or sizes) from the configured base's")
    differ = [k for k in keys if saved["tensors"][k][:2] != mine["tensors"][k][:2]  # shape, dtype; the checksum
              or not math.isclose(saved["tensors"][k][2], mine["tensors"][k][2], rel_tol=1e-9, abs_tol=1e-12)]
    if differ:
        raise CheckpointError(f"{where}, whose weights differ from the configured base's ({len(differ)} tensors, "
                              f"e.g. {differ[0]})")
    params = dict(module.named_parameters())
    checkpoint["state_dict"].update({k: params[k].detach() for k in keys})
