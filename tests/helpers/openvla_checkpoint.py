"""A tiny OpenVLA checkpoint in OpenVLA's own on-disk format: timm / prismatic parameter names,
sharded safetensors (the language model in bf16), config.json with Prismatic fields and
norm_stats, a Llama-layout tokenizer. ``write_checkpoint(path)`` writes it into a folder."""
import json
import os

import torch
from safetensors.torch import save_file

DINO = {"kind": "dinov2", "hidden_size": 16, "depth": 3, "heads": 2, "mlp_size": 64, "patch_size": 7,
        "image_size": 28, "registers": 4}
SIGLIP = {"kind": "siglip", "hidden_size": 24, "depth": 3, "heads": 2, "mlp_size": 40, "patch_size": 7,
          "image_size": 28, "registers": 0}
N_PATCHES = (28 // 7) ** 2  # 16 (OpenVLA-7B: 256)
TEXT = {"model_type": "llama", "vocab_size": 32064, "pad_token_id": 32000, "torch_dtype": "bfloat16",
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4}
NORM_STATS = {"libero_goal_no_noops": {"action": {
    "q01": [-0.5, -1.0, 0.0, -0.2, -0.2, -0.4, 0.0], "q99": [1.5, 1.0, 0.5, 0.2, 0.6, 0.4, 1.0],
    "mask": [True, True, True, True, True, True, False],
    "mean": [0.0] * 7, "std": [1.0] * 7, "min": [-1.0] * 7, "max": [1.0] * 7}},
    "bridge_orig": {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7, "mask": [True] * 7}}}

# -- the checkpoint, in OpenVLA's format --------------------------------------------------------
def _timm_vit(prefix: str, spec: dict, g: torch.Generator) -> dict:
    d, m, p = spec["hidden_size"], spec["mlp_size"], spec["patch_size"]

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    sd = {"patch_embed.proj.weight": r(d, 3, p, p, scale=(3 * p * p) ** -0.5), "patch_embed.proj.bias": r(d, scale=0.2),
          "pos_embed": r(1, N_PATCHES, d, scale=0.5), "norm.weight": r(d), "norm.bias": r(d)}
    if spec["kind"] == "dinov2":
        sd.update({"cls_token": r(1, 1, d), "reg_token": r(1, spec["registers"], d)})
    else:  # SigLIP's attention-pooling head: after the features, never used
        sd.update({"attn_pool.latent": r(1, 1, d), "attn_pool.q.weight": r(d, d), "attn_pool.kv.weight": r(2 * d, d),
                   "attn_pool.proj.weight": r(d, d), "attn_pool.mlp.fc1.weight": r(m, d)})
    for i in range(spec["depth"]):  # the last block is in the checkpoint but after the features
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(d, scale=0.2, shift=1.0), b + "norm1.bias": r(d, scale=0.2),
                   b + "attn.qkv.weight": r(3 * d, d, scale=d ** -0.5), b + "attn.qkv.bias": r(3 * d, scale=0.2),
                   b + "attn.proj.weight": r(d, d, scale=d ** -0.5), b + "attn.proj.bias": r(d, scale=0.2),
                   b + "norm2.weight": r(d, scale=0.2, shift=1.0), b + "norm2.bias": r(d, scale=0.2),
                   b + "mlp.fc1.weight": r(m, d, scale=d ** -0.5), b + "mlp.fc1.bias": r(m, scale=0.2),
                   b + "mlp.fc2.weight": r(d, m, scale=m ** -0.5), b + "mlp.fc2.bias": r(d, scale=0.2)})
        if spec["kind"] == "dinov2":  # LayerScale, as OpenVLA's HF patch renames timm's gamma
            sd.update({b + "ls1.scale_factor": r(d, scale=0.2, shift=1.0),
                       b + "ls2.scale_factor": r(d, scale=0.2, shift=1.0)})
    return {prefix + k: v for k, v in sd.items()}


def _language_model(g: torch.Generator) -> dict:
    h, f, v = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["vocab_size"]

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    sd = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": r(h, scale=0.2, shift=1.0),
          "lm_head.weight": r(v, h, scale=h ** -0.5)}
    for i in range(TEXT["num_hidden_layers"]):
        b = f"model.layers.{i}."
        sd.update({b + f"self_attn.{n}_proj.weight": r(h, h, scale=h ** -0.5) for n in "qkvo"})
        sd.update({b + "mlp.gate_proj.weight": r(f, h, scale=h ** -0.5), b + "mlp.up_proj.weight": r(f, h, scale=h ** -0.5),
                   b + "mlp.down_proj.weight": r(h, f, scale=f ** -0.5),
                   b + "input_layernorm.weight": r(h, scale=0.2, shift=1.0),
                   b + "post_attention_layernorm.weight": r(h, scale=0.2, shift=1.0)})
    return {"language_model." + k: val.to(torch.bfloat16) for k, val in sd.items()}  # as shipped: bf16


def write_checkpoint(path: str) -> None:
    from modules.policy.openvla import llama_layout_tokenizer

    g = torch.Generator().manual_seed(0)
    vision = {**_timm_vit("vision_backbone.featurizer.", DINO, g),
              **_timm_vit("vision_backbone.fused_featurizer.", SIGLIP, g)}
    d = DINO["hidden_size"] + SIGLIP["hidden_size"]
    vision.update({"projector.fc1.weight": torch.randn(4 * d, d, generator=g) * d ** -0.5,
                   "projector.fc1.bias": torch.randn(4 * d, generator=g) * 0.2,
                   "projector.fc2.weight": torch.randn(32, 4 * d, generator=g) * (4 * d) ** -0.5,
                   "projector.fc2.bias": torch.randn(32, generator=g) * 0.2,
                   "projector.fc3.weight": torch.randn(32, 32, generator=g) * 32 ** -0.5,
                   "projector.fc3.bias": torch.randn(32, generator=g) * 0.2})
    shards = {"model-00001-of-00002.safetensors": vision, "model-00002-of-00002.safetensors": _language_model(g)}
    for name, tensors in shards.items():
        save_file(tensors, os.path.join(path, name))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, t in shards.items() for k in t}}
    config = {"architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
              "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                           "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
              "arch_specifier": "no-align+fused-gelu-mlp", "vision_backbone_id": "dinosiglip-vit-so-224px",
              "llm_backbone_id": "llama2-7b-pure", "hf_llm_id": "meta-llama/Llama-2-7b-hf",
              "use_fused_vision_backbone": True, "image_resize_strategy": "resize-naive",
              "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
              "timm_override_act_layers": [None, None], "image_sizes": [28, 28], "llm_max_length": 2048,
              "pad_token_id": 32000, "pad_to_multiple_of": 64, "n_action_bins": 256, "text_config": TEXT,
              "norm_stats": NORM_STATS, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
              "kit_vision_towers": [DINO, SIGLIP]}  # tiny towers: the timm ids' shapes would be ViT-L / So400m
    tok = llama_layout_tokenizer(["go to the red ball"])
    tok.backend_tokenizer.save(os.path.join(path, "tokenizer.json"))
    files = {"model.safetensors.index.json": index, "config.json": config, "added_tokens.json": {"<PAD>": 32000},
             "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                         "pad_token": "<PAD>"},
             "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                       "add_eos_token": False, "legacy": False, "model_max_length": 2048,
                                       "padding_side": "right", "pad_token": "<PAD>", "bos_token": "<s>",
                                       "eos_token": "</s>", "unk_token": "<unk>"}}
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)
