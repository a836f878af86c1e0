"""A tiny Llava (CLIP vision tower + projector + Llama) built from a config, offline.

The tokenizer is a word-level ``tokenizers`` model over a word list, so nothing is
downloaded; its vocabulary ends with ``action_bins`` action tokens (OpenVLA's vocab-tail
layout). Used by the CPU quickstart and the tests.
"""
from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers import PreTrainedTokenizerFast

from modules.checkpoint_io import CheckpointError, require_keys, safe_load
from modules.policy.backbone import VLMBackbone

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_POSITIONS = ("first", "after_instruction")
PROMPT_WORDS = "in : what action should the robot take to ? out".split()


def word_tokenizer(words: list[str], action_bins: int) -> PreTrainedTokenizerFast:
    vocab = {}
    for w in SPECIALS + PROMPT_WORDS + sorted(set(words)) + [f"<act_{i}>" for i in range(action_bins)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


class TinyLlava(VLMBackbone):
    """Random-init Llava small enough to train with RL on two CPU cores."""

    def __init__(self, words: list[str] = (), action_bins: int = 3, image_size: int = 56,
                 patch_size: int = 8, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                 vision_hidden_size: int = 64, vision_layers: int = 2, initializer_range: float = 0.02,
                 position_init_std: float | None = None, seed: int | None = None,
                 image_position: str = "first", checkpoint: str | None = None):
        """
        Args:
            words: the vocabulary, as phrases whose words become tokens (the instructions').
            action_bins: action tokens at the vocabulary's tail.
            image_size: side of the (square) input image in pixels.
            patch_size: side of a vision patch in pixels.
            hidden_size: width of the language model.
            layers: language-model layers.
            heads: attention heads (vision and language).
            vision_hidden_size: width of the vision tower.
            vision_layers: vision-tower layers.
            initializer_range: std of the random weights (0.1 lets attention learn from scratch).
            position_init_std: std of the vision position embeddings (null: ``initializer_range``).
            seed: seed of the random weights (null: the global RNG).
            image_position: ``first`` (OpenVLA's order: BOS, image, prompt) or
                ``after_instruction`` (BOS, "In: ... <instruction>", image, "?\nOut:").
            checkpoint: a file from ``scripts/pretrain_tiny_vlm.py`` (a VLM pretrained without
                actions); every architecture argument it stores must equal the one given here.
        """
        super().__init__()
        self.source = checkpoint
        # what a checkpoint must agree with (the vocabulary as a set of words)
        self.init_args = init_args = dict(
            words=sorted({w for s in words for w in s.lower().split()}), action_bins=action_bins,
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, layers=layers,
            heads=heads, vision_hidden_size=vision_hidden_size, vision_layers=vision_layers,
            initializer_range=initializer_range, position_init_std=position_init_std,
            image_position=image_position)
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"model.policy.init_args.backbone.init_args.image_position={image_position!r}: "
                             f"one of {list(IMAGE_POSITIONS)}")
        self.image_position = image_position
        word_list = [w for s in words for w in s.lower().split()]
        self.tokenizer = word_tokenizer(word_list, action_bins)
        vocab = len(self.tokenizer)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.image_size, self.patch_size = image_size, patch_size
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
                num_hidden_layers=vision_layers, num_attention_heads=heads,
                image_size=image_size, patch_size=patch_size, num_channels=3,
                initializer_range=initializer_range),
            text_config=LlamaConfig(
                vocab_size=vocab, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                initializer_range=initializer_range),
            image_token_id=self.image_token_id, vision_feature_layer=-1,
            vision_feature_select_strategy="default", projector_hidden_act="gelu",
            initializer_range=initializer_range,
        )
        config.text_config._attn_implementation = "sdpa"
        config.vision_config._attn_implementation = "sdpa"
        # seed=None: the global RNG (train.py's --seed); an int: the same weights every time
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            self.model = LlavaForConditionalGeneration(config)
            if position_init_std is not None:
                # From scratch, CLIP's 0.02-std position embeddings are ~10x smaller than the
                # patch contents, so after the pre-LayerNorm *where* an object is barely
                # shows; a larger init lets a tiny model read positions from the start.
                self.model.model.vision_tower.embeddings.position_embedding.weight.data.normal_(
                    0.0, position_init_std)

        if checkpoint is not None:
            self._load(checkpoint, init_args)
        # Llava reads the vision tower's hidden states, never its pooled output: the pooled
        # output's LayerNorm gets no gradient, which DDP (find_unused_parameters=False) rejects.
        self.model.model.vision_tower.post_layernorm.requires_grad_(False)

    def _load(self, path: str, init_args: dict) -> None:
        key = "model.policy.init_args.backbone.init_args"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}.checkpoint={path!r}: no such file "
                                    "(scripts/pretrain_tiny_vlm.py writes one)")
        saved = safe_load(path, f"{key}.checkpoint")
        if isinstance(saved, dict) and "loops" in saved and "state_dict" in saved:
            raise CheckpointError(f"{key}.checkpoint={path!r}: a train.py checkpoint, not a pretrained VLM "
                                  "(scripts/pretrain_tiny_vlm.py writes those); to go on from it use --ckpt_path")
        require_keys(saved, ("init_args", "state_dict"), f"{key}.checkpoint={path!r}",
                     "a pretrained tiny VLM (scripts/pretrain_tiny_vlm.py)")
        for name, value in saved["init_args"].items():
            if init_args.get(name) != value:
                raise ValueError(f"{key}.{name}={init_args.get(name)!r}: the checkpoint {path} "
                                 f"was built with {value!r} ({key}.checkpoint: null trains from "
                                 "random weights)")
        self.model.load_state_dict(saved["state_dict"])

    def prompt(self, instruction: str) -> str:
        return f"In: What action should the robot take to {instruction.lower()}?\nOut:"

    @property
    def image_token_count(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size:
            images = torch.nn.functional.interpolate(images.float(), size=self.image_size,
                                                     mode="bilinear", antialias=True)
        return images.float().div(127.5).sub(1.0)
