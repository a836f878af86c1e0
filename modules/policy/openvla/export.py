"""The kit's ``PrismaticForActionPrediction`` -> an OpenVLA checkpoint directory: the inverse
of modules/policy/openvla/checkpoint.py, so that a model trained in the kit (e.g. SFT of a
small OpenVLA from scratch) loads wherever a released OpenVLA checkpoint does
(``OpenVLABackbone(pretrained=DIR)``, ``norm_stats: DIR``).

Written: ``model.safetensors`` under OpenVLA's parameter names (timm towers: q/k/v fused into
``attn.qkv``, LayerScale as ``ls{1,2}.scale_factor``, DINOv2's ``pos_embed`` without the class
row), ``config.json`` (OpenVLA's fields, ``norm_stats``, and for towers timm does not know,
the kit's ``kit_vision_towers``), the tokenizer files, ``dataset_statistics.json``.
The towers' last block is not written: the kit (as OpenVLA) takes the features of the
second-to-last block and never builds the last one, so there are no weights for it; a timm
consumer of such a checkpoint would have to drop it too. DINOv2's class token is written with
its position embedding added (a model trained from scratch learns a non-zero class row, which
OpenVLA's timm tower does not have; both only ever enter the network as their sum).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict

import torch
from safetensors.torch import save_file

from modules.policy.openvla.checkpoint import BLOCK, EMBED, LAYER, LEGACY_DINO, QKV, TOWERS
from modules.policy.openvla.config import TIMM_TOWERS, TowerSpec

KIT_TOWERS = ("featurizer", "fused_featurizer")
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "attention_bias",
             "mlp_bias", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range")


def _tower_tensors(state: dict, prefix: str, spec: TowerSpec) -> dict[str, torch.Tensor]:
    """One tower's kit tensors (names after ``prefix``) -> timm names."""
    kind, out = spec.kind, {}
    inverse_embed = {v: k for k, v in EMBED[kind].items()}
    inverse_block = {v: k for k, v in BLOCK[kind].items()}
    local = {}
    for name, t in state.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            for new, old in LEGACY_DINO.items():  # older transformers' DINOv2 names -> current ones
                rest = rest.replace(old, new)
            local[rest] = t
    layer = re.escape(LAYER[kind]).replace(r"\{\}", r"(\d+)")
    for rest, t in local.items():
        if rest == "embeddings.mask_token":
            continue  # kit-only (masked image modelling), never used
        if rest == "embeddings.position_embeddings":  # DINOv2: patches only (timm's no_embed_class)
            out["pos_embed"] = t[:, 1:]
        elif rest == "embeddings.cls_token":  # the class row is only ever added to the class token: fold it in
            out["cls_token"] = t + local["embeddings.position_embeddings"][:, :1]
        elif rest == "embeddings.position_embedding.weight":  # SigLIP
            out["pos_embed"] = t[None]
        elif rest in inverse_embed:
            out[inverse_embed[rest]] = t
        else:
            m = re.fullmatch(layer + r"(.+)\.(weight|bias|lambda1)", rest)
            if m is None:
                raise ValueError(f"export: no OpenVLA name for tower parameter {prefix}{rest}")
            i, module, suffix = m[1], m[2], m[3]
            if module in QKV[kind]:
                if module == QKV[kind][0]:  # rows [q; k; v]
                    parts = [local[LAYER[kind].format(i) + p + "." + suffix] for p in QKV[kind]]
                    out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(parts, 0)
                continue
            if module.startswith("layer_scale"):
                out[f"blocks.{i}.ls{module[-1]}.scale_factor"] = t
            elif module in inverse_block:
                out[f"blocks.{i}.{inverse_block[module]}.{suffix}"] = t
            else:
                raise ValueError(f"export: no OpenVLA name for tower parameter {prefix}{rest}")
    return out


def openvla_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under OpenVLA's checkpoint names (contiguous CPU tensors)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    out = {}
    for kit, ckpt, spec in zip(KIT_TOWERS, TOWERS, model.config.tower_specs):
        out.update({ckpt + k: v for k, v in _tower_tensors(state, f"model.vision_backbone.{kit}.", spec).items()})
    for name, t in state.items():
        if name.startswith("model.projector."):
            out[name[len("model."):]] = t
        elif name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model."):]] = t
        elif name == "lm_head.weight":
            out["language_model.lm_head.weight"] = t
        elif not name.startswith("model.vision_backbone."):
            raise ValueError(f"export: no OpenVLA name for parameter {name}")
    return {k: v.clone() for k, v in out.items()}  # no shared storage (safetensors refuses it)


def save_checkpoint(model, tokenizer, path: str, norm_stats: dict | None = None) -> str:
    """Write ``model`` (a ``PrismaticForActionPrediction``) and ``tokenizer`` as an OpenVLA
    checkpoint directory ``path``; ``norm_stats`` ({key: {action: {q01, q99, mask, ...}}}) go to
    config.json and dataset_statistics.json, where the kit's action codecs read them."""
    os.makedirs(path, exist_ok=True)
    tensors = openvla_state_dict(model)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    specs = model.config.tower_specs
    timm_ids = {spec: name for name, spec in TIMM_TOWERS.items()}
    text = model.config.text_config
    text_config = {k: getattr(text, k) for k in TEXT_KEYS if getattr(text, k, None) is not None}
    text_config["rope_theta"] = float((getattr(text, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    text_config["model_type"] = "llama"
    dtype = next(iter(tensors.values())).dtype
    config = {
        "architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
        "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "timm_model_ids": [timm_ids.get(s.__class__(**{**asdict(s), "image_size": 224}), f"kit-{s.kind}") for s in specs],
        "timm_override_act_layers": [None, None], "image_sizes": [s.image_size for s in specs],
        "pad_token_id": model.config.pad_token_id, "pad_to_multiple_of": 64, "n_action_bins": 256,
        "text_config": text_config, "norm_stats": norm_stats or {},
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if any(name.startswith("kit-") for name in config["timm_model_ids"]):
        config["kit_vision_towers"] = [asdict(s) for s in specs]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(path)
    if norm_stats:
        with open(os.path.join(path, "dataset_statistics.json"), "w") as f:
            json.dump(norm_stats, f, indent=2)
    return path
