"""What an OpenVLA ("Prismatic") model is made of, as the kit builds it.

An OpenVLA checkpoint's config.json names its vision towers by timm model id only; the
shapes below are those timm ids' (timm's ``vit_large_patch14_reg4_dinov2`` and
``vit_so400m_patch14_siglip_224`` entry points, as OpenVLA creates them with ``act_layer=None``).
A tiny test checkpoint, whose towers timm does not know, spells its towers out in the
kit's own config.json key ``kit_vision_towers`` (a real checkpoint never needs it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from transformers import LlamaConfig, PreTrainedConfig

LLAMA_BASE_VOCAB = 32000  # Llama-2 tokenizer; the action tokens are its last 256 ids (31744..31999)
PAD_TOKEN_ID = 32000  # OpenVLA's added <PAD>
PAD_TO_MULTIPLE_OF = 64  # embedding rows 32000..32063: <PAD> and 63 rows never trained
IMAGE_PLACEHOLDER_ID = 32001  # kit-only: a padding row the tokenizer never emits; its embedding is never read
PROPRIO_PLACEHOLDER_ID = 32002  # kit-only, OpenVLA-OFT: the proprio token's position (its embedding is replaced)


@dataclass(frozen=True)
class TowerSpec:
    """One timm ViT as OpenVLA uses it. ``kind``: "dinov2" (class token + ``registers`` register
    tokens, LayerScale, position embeddings on patches only) or "siglip" (no prefix tokens,
    no LayerScale). Both: exact GELU, LayerNorm eps 1e-6, qkv bias, patch conv with bias."""

    kind: str
    hidden_size: int
    depth: int  # blocks in the checkpoint; the kit runs depth - 1 (features: second-to-last block)
    heads: int
    mlp_size: int
    patch_size: int
    image_size: int
    registers: int = 0

    @property
    def prefix_tokens(self) -> int:  # dropped from the features
        return 1 + self.registers if self.kind == "dinov2" else 0

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


TIMM_TOWERS = {
    "vit_large_patch14_reg4_dinov2.lvd142m": TowerSpec("dinov2", 1024, 24, 16, 4096, 14, 224, registers=4),
    "vit_so400m_patch14_siglip_224": TowerSpec("siglip", 1152, 27, 16, 4304, 14, 224),
}

# transformers 4.40's LlamaConfig defaults: what an OpenVLA config.json's short text_config
# (model_type, vocab_size, pad_token_id) was completed with when the checkpoint was made
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
             "rope_theta": 10000.0, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
             "tie_word_embeddings": False}


def llama_config(text_config: dict, initializer_range: float | None = None) -> LlamaConfig:
    fields = {**LLAMA2_7B, **{k: v for k, v in text_config.items() if k not in ("model_type", "torch_dtype")}}
    if initializer_range is not None:
        fields["initializer_range"] = initializer_range
    config = LlamaConfig(**fields)
    config._attn_implementation = "sdpa"
    return config


class PrismaticConfig(PreTrainedConfig):
    """The kit's model config: two tower specs (as dicts), a Llama config, the placeholder id."""

    model_type = "kit_prismatic"
    sub_configs_defaults: ClassVar[dict] = {"text_config": LlamaConfig}

    towers: list | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = IMAGE_PLACEHOLDER_ID
    pad_token_id: int | None = PAD_TOKEN_ID
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    @property
    def tower_specs(self) -> list[TowerSpec]:
        return [TowerSpec(**t) for t in self.towers]


def make_config(towers: list[TowerSpec], text_config: LlamaConfig, initializer_range: float = 0.02,
                image_token_index: int = IMAGE_PLACEHOLDER_ID) -> PrismaticConfig:
    if len(towers) != 2 or [t.kind for t in towers] != ["dinov2", "siglip"]:
        raise ValueError(f"OpenVLA needs a DINOv2 and a SigLIP tower (in that order), got {[t.kind for t in towers]}")
    if towers[0].patches != towers[1].patches:
        raise ValueError(f"the towers' patch grids differ: {towers[0].patches} vs {towers[1].patches}")
    if not 0 <= image_token_index < text_config.vocab_size:
        raise ValueError(f"image placeholder id {image_token_index} outside the {text_config.vocab_size}-row embedding")
    return PrismaticConfig(towers=[asdict(t) for t in towers], text_config=text_config,
                           image_token_index=image_token_index, initializer_range=initializer_range)
