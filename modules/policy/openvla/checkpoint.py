"""An OpenVLA checkpoint directory -> the kit's ``PrismaticForActionPrediction``, by name.

Parameter names as OpenVLA's ``modeling_prismatic.py`` saves them (timm ViTs; LayerScale
``gamma`` renamed ``scale_factor`` by its HF-compatibility patch) and where they go:

  vision_backbone.featurizer.*        (timm DINOv2-reg4) -> model.vision_backbone.featurizer.*
  vision_backbone.fused_featurizer.*  (timm SigLIP)      -> model.vision_backbone.fused_featurizer.*
  projector.fc{1,2,3}.*                                  -> model.projector.fc{1,2,3}.*
  language_model.model.*                                 -> model.language_model.*
  language_model.lm_head.weight                          -> lm_head.weight

Inside a tower: ``blocks.N.attn.qkv`` is split into q/k/v (rows [q; k; v]); ``ls1/ls2`` ->
``layer_scale1/2.lambda1``; DINOv2's ``pos_embed`` covers the patches only (timm's
``no_embed_class``), transformers' has a class-token row first, which is zero here. The last
block, the final norm and SigLIP's pooling head come after the features: they are skipped.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import torch
from safetensors import safe_open
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from modules.policy.openvla.adapter import merge_adapter
from modules.policy.openvla.config import TIMM_TOWERS, TowerSpec, llama_config, make_config
from modules.policy.openvla.modeling import PrismaticForActionPrediction

EMBED = {
    "dinov2": {"cls_token": "embeddings.cls_token", "reg_token": "embeddings.register_tokens",
               "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias"},
    "siglip": {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias"},
}
LAYER = {"dinov2": "encoder.layer.{}.", "siglip": "encoder.layers.{}."}
BLOCK = {
    "dinov2": {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
               "mlp.fc2": "mlp.fc2", "ls1": "layer_scale1", "ls2": "layer_scale2"},
    "siglip": {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
}
QKV = {"dinov2": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
       "siglip": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
AFTER_FEATURES = ("norm.", "fc_norm.", "attn_pool.", "head.")  # never computed by OpenVLA either
TOWERS = ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer.")
LEGACY_DINO = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
               "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}


def _tower_tensor(rest: str, t: torch.Tensor, spec: TowerSpec) -> list[tuple[str, torch.Tensor]] | None:
    """timm name (inside a tower) -> [(transformers name, tensor)]; [] = skipped; None = unknown."""
    kind = spec.kind
    if rest == "pos_embed":
        if kind == "dinov2":
            return [("embeddings.position_embeddings", torch.cat([t.new_zeros(1, 1, t.shape[-1]), t], 1))]
        return [("embeddings.position_embedding.weight", t[0])]
    if rest in EMBED[kind]:
        return [(EMBED[kind][rest], t)]
    if rest.startswith(AFTER_FEATURES):
        return []
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|scale_factor|gamma)", rest)
    if m is None or int(m[1]) >= spec.depth:
        return None
    if int(m[1]) == spec.depth - 1:
        return []  # the last block: the features are the second-to-last block's output
    layer, module, suffix = LAYER[kind].format(m[1]), m[2], m[3]
    if module == "attn.qkv":
        return [(layer + name + "." + suffix, part.clone()) for name, part in zip(QKV[kind], t.chunk(3, 0))]
    if module not in BLOCK[kind]:
        return None
    if suffix in ("scale_factor", "gamma"):
        suffix = "lambda1"
    return [(layer + BLOCK[kind][module] + "." + suffix, t)]


def convert(name: str, t: torch.Tensor, specs: list[TowerSpec]) -> list[tuple[str, torch.Tensor]] | None:
    """One checkpoint tensor -> the kit's (name, tensor) pairs ([] = skipped, None = unknown name)."""
    for prefix, spec, kit in zip(TOWERS, specs, ("featurizer", "fused_featurizer")):
        if name.startswith(prefix):
            out = _tower_tensor(name[len(prefix):], t, spec)
            return None if out is None else [(f"model.vision_backbone.{kit}.{k}", v) for k, v in out]
    if re.fullmatch(r"projector\.fc[123]\.(weight|bias)", name):
        return [("model." + name, t)]
    if name.startswith("language_model.model."):
        return [("model.language_model." + name[len("language_model.model."):], t)]
    if name == "language_model.lm_head.weight":
        return [("lm_head.weight", t)]
    return None


def read_config(path: str, key: str):
    """config.json of an OpenVLA checkpoint -> the kit's ``PrismaticConfig``."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{key}={path!r}: no config.json")
    with open(file) as f:
        raw = json.load(f)
    if raw.get("model_type") not in ("openvla", "prismatic"):
        raise ValueError(f"{key}={path!r}: config.json model_type={raw.get('model_type')!r}, not an OpenVLA checkpoint")
    if not raw.get("use_fused_vision_backbone"):
        raise ValueError(f"{key}={path!r}: only the fused DINOv2 + SigLIP backbone is supported "
                         f"(vision_backbone_id={raw.get('vision_backbone_id')!r})")
    if any(a is not None for a in raw.get("timm_override_act_layers") or []):
        raise ValueError(f"{key}={path!r}: timm_override_act_layers={raw['timm_override_act_layers']} (need null: GELU)")
    if "kit_vision_towers" in raw:  # tiny test checkpoints: towers timm does not have
        towers = [TowerSpec(**t) for t in raw["kit_vision_towers"]]
    else:
        ids = raw.get("timm_model_ids") or []
        unknown = [i for i in ids if i not in TIMM_TOWERS]
        if len(ids) != 2 or unknown:
            raise ValueError(f"{key}={path!r}: timm_model_ids={ids}; supported: {sorted(TIMM_TOWERS)}")
        towers = [TIMM_TOWERS[i] for i in ids]
    sizes = raw.get("image_sizes") or [t.image_size for t in towers]
    towers = [replace(t, image_size=int(s)) for t, s in zip(towers, sizes)]
    text = dict(raw.get("text_config") or {})
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"{key}={path!r}: text_config.model_type={text['model_type']!r}; the kit builds Llama only")
    text.setdefault("pad_token_id", raw.get("pad_token_id"))
    return make_config(towers, llama_config(text))


def _weight_files(path: str, key: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if not files or missing:
        raise FileNotFoundError(f"{key}={path!r}: no safetensors weights" + (f" (missing {missing})" if missing else ""))
    return [os.path.join(path, f) for f in files]


def _materialize_buffers(model: PrismaticForActionPrediction) -> None:
    """Non-persistent buffers are not in a checkpoint: rebuild the ones a meta-device build left empty."""
    lm = model.model.language_model
    lm.rotary_emb = LlamaRotaryEmbedding(config=model.config.text_config)
    emb = model.model.vision_backbone.fused_featurizer.embeddings
    emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers left uninitialised after loading: {left}")


def convert_all(items, specs: list[TowerSpec], expected: dict, dtype: torch.dtype = torch.float32):
    """(name, tensor) pairs of a checkpoint -> (the model's state dict, unknown checkpoint names)."""
    state, unknown = {}, []
    for name, tensor in items:
        out = convert(name, tensor, specs)
        if out is None:
            unknown.append(name)
        for k, v in out or []:
            if k not in expected:  # transformers before ~5.2x: DINOv2 attention under v4 names
                k = next((k.replace(new, old) for new, old in LEGACY_DINO.items()
                          if new in k and k.replace(new, old) in expected), k)
            state[k] = v.to(dtype)
    mask = "model.vision_backbone.featurizer.embeddings.mask_token"  # kit-only, unused: zeros
    state[mask] = torch.zeros(expected[mask].shape, dtype=dtype)
    return state, unknown


def _tensors(files: list[str]):
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                yield name, f.get_tensor(name)


def load_checkpoint(path: str, key: str, dtype: torch.dtype = torch.float32, adapter: str | None = None,
                    adapter_key: str = "adapter") -> PrismaticForActionPrediction:
    """Build on the meta device (no random init of 7B weights), then assign the converted tensors.
    ``adapter``: a PEFT LoRA adapter folder merged into the weights as they load
    (modules/policy/openvla/adapter.py)."""
    config = read_config(path, key)
    with torch.device("meta"):
        model = PrismaticForActionPrediction(config)
    expected = model.state_dict()
    items = _tensors(_weight_files(path, key))
    if adapter is not None:
        items = merge_adapter(items, adapter, adapter_key)
    state, unknown = convert_all(items, config.tower_specs, expected, dtype)
    missing = sorted(set(expected) - set(state))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if unknown or missing or shapes:
        raise ValueError(f"{key}={path!r}: checkpoint does not match the OpenVLA architecture: "
                         f"unknown {unknown[:5]} ({len(unknown)}), missing {missing[:5]} ({len(missing)}), "
                         f"shape mismatches {shapes[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model)
    return model
