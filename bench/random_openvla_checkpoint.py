"""Write a random-weight OpenVLA checkpoint directory in OpenVLA's own on-disk format.

For benchmarks and smoke runs of the real job on a machine with no OpenVLA download: the files
a released OpenVLA checkpoint has (config.json with Prismatic fields and norm_stats, sharded
``model-*.safetensors`` under OpenVLA's parameter names with timm's tower layout and the
language model in bf16, the index, a Llama-layout tokenizer), loaded by the kit's real loader
(``OpenVLABackbone(pretrained=DIR)``). ``--size 7b`` has OpenVLA-7B's shapes (Llama-2-7B +
DINOv2-L/14-reg4 + SigLIP-So400m/14 at 224 px, 7.5 B parameters, ~15 GB); ``--size tiny`` a
model of a few hundred thousand parameters with tiny towers, for tests.

The weights are the kit model's random initialisation, written back under OpenVLA's names
(the inverse of ``modules/policy/openvla/checkpoint.py``; the towers' last block and final norm,
which OpenVLA never computes, are written too, as a real checkpoint has them).

Usage: python bench/random_openvla_checkpoint.py --out /tmp/openvla-7b-random --size 7b [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modules.policy.openvla.checkpoint import BLOCK, EMBED, LAYER, LEGACY_DINO, QKV, TOWERS  # noqa: E402
from modules.policy.openvla.config import TIMM_TOWERS  # noqa: E402
from modules.policy.openvla.tiny import TINY_DEFAULTS, tiny_openvla  # noqa: E402

SIZES = {
    "7b": {"towers": "openvla", "hidden_size": 4096, "layers": 32, "heads": 32, "intermediate_size": 11008,
           "words": ["put the bowl on plate stove top of cabinet"]},
    "tiny": {"words": ["put the bowl on plate stove top of cabinet"], "seed": 0},
}
UNNORM_KEY = "libero_goal_no_noops"
# q01 / q99 of a LIBERO-style 7-D action (xyz, rotation, gripper; the gripper is not de-normalised)
NORM_STATS = {UNNORM_KEY: {"action": {"q01": [-0.75, -0.75, -0.9, -0.1, -0.15, -0.2, 0.0],
                                      "q99": [0.9, 0.8, 0.9, 0.15, 0.2, 0.25, 1.0],
                                      "mask": [True] * 6 + [False]}}}


class _LegacyNames(dict):
    """Tower tensors by the kit's names, also where older transformers name DINOv2's attention
    ``attention.attention.query`` etc. (``LEGACY_DINO``)."""

    def __missing__(self, key):
        for new, old in LEGACY_DINO.items():
            if new in key:
                return self[key.replace(new, old)]
        raise KeyError(key)


def _inverse_tower(kit: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """The kit's transformers-named tower tensors -> timm's names (one tower)."""
    kit = _LegacyNames(kit)
    kind, out = spec.kind, {}
    for timm, name in EMBED[kind].items():
        out[timm] = kit[name]
    if kind == "dinov2":
        out["pos_embed"] = kit["embeddings.position_embeddings"][:, 1:]  # no_embed_class: patches only
    else:
        out["pos_embed"] = kit["embeddings.position_embedding.weight"][None]
    for i in range(spec.depth):
        src = min(i, spec.depth - 2)  # the last block (never computed) repeats the one before it
        layer = LAYER[kind].format(src)
        for suffix in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([kit[f"{layer}{q}.{suffix}"] for q in QKV[kind]])
        for timm, name in BLOCK[kind].items():
            if timm.startswith("ls"):
                out[f"blocks.{i}.{timm}.scale_factor"] = kit[f"{layer}{name}.lambda1"]
                continue
            for suffix in ("weight", "bias"):
                out[f"blocks.{i}.{timm}.{suffix}"] = kit[f"{layer}{name}.{suffix}"]
    out["norm.weight"] = torch.ones_like(out["blocks.0.norm1.weight"])
    out["norm.bias"] = torch.zeros_like(out["blocks.0.norm1.bias"])
    last = f"blocks.{spec.depth - 1}."
    return {k: v.clone() if k.startswith(last) else v.contiguous() for k, v in out.items()}


def openvla_state_dict(model) -> dict[str, torch.Tensor]:
    """The kit's ``PrismaticForActionPrediction`` -> OpenVLA's parameter names and layout."""
    state = model.state_dict()
    out = {}
    for prefix, spec, kit in zip(TOWERS, model.config.tower_specs, ("featurizer", "fused_featurizer")):
        head = f"model.vision_backbone.{kit}."
        tower = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
        out.update({prefix + k: v for k, v in _inverse_tower(tower, spec).items()})
    for k, v in state.items():
        if k.startswith("model.projector."):
            out[k[len("model."):]] = v
        elif k.startswith("model.language_model."):
            out["language_model.model." + k[len("model.language_model."):]] = v
    out["language_model.lm_head.weight"] = state["lm_head.weight"]
    return out


def write(path: str, size: str = "tiny", device: str = "cpu", shard_gib: float = 4.0) -> str:
    """Write the checkpoint directory; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    cfg = SIZES[size]
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model, tokenizer = tiny_openvla(cfg, "size")
        finally:
            torch.set_default_dtype(prev)
    tensors = openvla_state_dict(model)
    towers = model.config.tower_specs
    del model
    shards, current, used = [], {}, 0
    for name, t in tensors.items():
        t = (t.to(torch.bfloat16) if name.startswith("language_model.") else t.float()).cpu()
        if current and used + t.numel() * t.element_size() > shard_gib * 2**30:
            shards.append(current)
            current, used = {}, 0
        current[name] = t
        used += t.numel() * t.element_size()
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    text = model_text_config(cfg)
    config = {"architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
              "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
              "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
              "image_resize_strategy": "resize-naive", "timm_override_act_layers": [None, None],
              "pad_token_id": 32000, "pad_to_multiple_of": 64, "n_action_bins": 256, "llm_max_length": 2048,
              "text_config": text, "norm_stats": NORM_STATS, "torch_dtype": "bfloat16"}
    config.update({"timm_model_ids": list(TIMM_TOWERS), "image_sizes": [t.image_size for t in towers]})
    if cfg.get("towers") != "openvla":  # tiny towers timm does not know: spelt out for the kit's loader
        config["kit_vision_towers"] = [asdict(t) for t in towers]
    tokenizer.backend_tokenizer.save(os.path.join(path, "tokenizer.json"))
    files = {"config.json": config, "model.safetensors.index.json": {"metadata": {"total_size": total},
                                                                     "weight_map": weight_map},
             "added_tokens.json": {"<PAD>": 32000},
             "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                         "pad_token": "<PAD>"},
             "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                       "add_eos_token": False, "legacy": False, "model_max_length": 2048,
                                       "padding_side": "right", "pad_token": "<PAD>", "bos_token": "<s>",
                                       "eos_token": "</s>", "unk_token": "<unk>"},
             "dataset_statistics.json": NORM_STATS}
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)
    return path


def model_text_config(cfg: dict) -> dict:
    """config.json's ``text_config`` of the Llama that ``tiny_openvla(cfg)`` builds."""
    c = {**TINY_DEFAULTS, **cfg}
    h = c["hidden_size"]
    return {"model_type": "llama", "vocab_size": 32064, "hidden_size": h,
            "intermediate_size": c["intermediate_size"] or 4 * h, "num_hidden_layers": c["layers"],
            "num_attention_heads": c["heads"], "num_key_value_heads": c["heads"], "pad_token_id": 32000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    write(a.out, a.size, a.device)
    n = sum(1 for f in os.listdir(a.out) if f.endswith(".safetensors"))
    print(f"wrote {a.out} ({a.size}, {n} shards)")


if __name__ == "__main__":
    main()
