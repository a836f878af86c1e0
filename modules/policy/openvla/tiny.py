"""A tiny random OpenVLA: the same model class as a real checkpoint, with tiny towers and a tiny
Llama, but OpenVLA's vocabulary layout (32000 base ids + 64 padding rows = 32064 embedding
rows, <PAD> 32000, action ids 31744..31999) and a Llama-layout tokenizer built offline."""
from __future__ import annotations

import torch

from modules.policy.openvla.config import (
    LLAMA_BASE_VOCAB,
    PAD_TO_MULTIPLE_OF,
    PAD_TOKEN_ID,
    TIMM_TOWERS,
    TowerSpec,
    llama_config,
    make_config,
)
from modules.policy.openvla.modeling import PrismaticForActionPrediction
from modules.policy.openvla.tokenizer import llama_layout_tokenizer

TINY_DEFAULTS = {
    "words": [],  # instruction words that become whole tokenizer pieces (others split into characters)
    "image_size": 56, "patch_size": 14,  # 4 x 4 = 16 patches per tower
    "vision_hidden_size": 32, "vision_depth": 2, "vision_heads": 2, "registers": 4,  # depth - 1 blocks run
    "hidden_size": 32, "layers": 2, "heads": 2,
    "intermediate_size": None,  # None: 4 x hidden_size (Llama-2-7B: 11008)
    "towers": "tiny",  # "tiny": the vision_* keys above; "openvla": DINOv2-L/14-reg4 + SigLIP-So400m/14 at 224 px
    "initializer_range": 0.02, "seed": None,  # seed None: the global RNG (train.py's --seed)
}


def tiny_openvla(config: dict, key: str):
    """``config`` (keys of TINY_DEFAULTS) -> (model, tokenizer)."""
    unknown = sorted(set(config) - set(TINY_DEFAULTS))
    if unknown:
        raise ValueError(f"{key}.{unknown[0]}: unknown key (known: {sorted(TINY_DEFAULTS)})")
    c = {**TINY_DEFAULTS, **config}
    if c["vision_depth"] < 2:
        raise ValueError(f"{key}.vision_depth={c['vision_depth']}: need >= 2 (features: second-to-last block)")
    if c["towers"] not in ("tiny", "openvla"):
        raise ValueError(f"{key}.towers={c['towers']!r}: 'tiny' or 'openvla'")
    v = c["vision_hidden_size"]
    towers = [TowerSpec("dinov2", v, c["vision_depth"], c["vision_heads"], 4 * v, c["patch_size"], c["image_size"],
                        registers=c["registers"]),
              TowerSpec("siglip", v, c["vision_depth"], c["vision_heads"], 4 * v, c["patch_size"], c["image_size"])]
    if c["towers"] == "openvla":  # the real towers' shapes (random weights)
        towers = list(TIMM_TOWERS.values())
    h = c["hidden_size"]
    text = llama_config({"vocab_size": LLAMA_BASE_VOCAB + PAD_TO_MULTIPLE_OF, "hidden_size": h,
                         "intermediate_size": c["intermediate_size"] or 4 * h, "num_hidden_layers": c["layers"],
                         "num_attention_heads": c["heads"],
                         "num_key_value_heads": c["heads"], "pad_token_id": PAD_TOKEN_ID, "bos_token_id": 1,
                         "eos_token_id": 2}, initializer_range=c["initializer_range"])
    with torch.random.fork_rng():
        if c["seed"] is not None:
            torch.manual_seed(c["seed"])
        model = PrismaticForActionPrediction(make_config(towers, text, c["initializer_range"]))
    return model, llama_layout_tokenizer(list(c["words"]))
