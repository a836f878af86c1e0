"""The interface every VLA backbone implements, and the pieces shared by all of them.

A backbone owns a transformers vision-language model, its tokenizer, the prompt format and
the image preprocessing. ``TokenVLAPolicy`` only talks to this interface, so a tiny model
built from a config and a real checkpoint loaded from disk run through the same code.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EncodedPrompts:
    """Left-padded prompts. By default the image placeholders come first, then the text
    (OpenVLA's order; causal: the image positions never see the instruction, the instruction
    positions see the image); a backbone with ``image_position = "after_instruction"`` puts
    them right after the instruction's last token instead, so that every image position
    reads the instruction (instruction-conditioned perception, the role FiLM plays in
    BabyAI's own models)."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 0 on left padding
    image_mask: torch.Tensor  # [B, L] bool, image placeholder positions
    goal_mask: torch.Tensor  # [B, L] bool, positions of the instruction's own tokens

    def to(self, device) -> "EncodedPrompts":
        return EncodedPrompts(*(t.to(device) for t in
                                (self.input_ids, self.attention_mask, self.image_mask, self.goal_mask)))

    def index(self, idx) -> "EncodedPrompts":
        return EncodedPrompts(self.input_ids[idx], self.attention_mask[idx],
                              self.image_mask[idx], self.goal_mask[idx])


def cat_prompts(a: EncodedPrompts, b: EncodedPrompts) -> EncodedPrompts:
    """Stack two left-padded prompt batches into one (left-padding the shorter)."""
    length = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(t):
        return torch.nn.functional.pad(t, (length - t.shape[1], 0))

    return EncodedPrompts(*(torch.cat([pad(x), pad(y)]) for x, y in
                            zip((a.input_ids, a.attention_mask, a.image_mask, a.goal_mask),
                                (b.input_ids, b.attention_mask, b.image_mask, b.goal_mask))))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (0 at the first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class VLMBackbone(nn.Module):
    """Subclasses set ``self.model`` (a transformers ``*ForConditionalGeneration``) and
    ``self.tokenizer``, and implement ``prompt``, ``preprocess`` and ``image_token_count``."""

    model: nn.Module
    image_token_id: int
    prompt_suffix_ids: tuple[int, ...] = ()  # appended after the prompt's tokens (OpenVLA: 29871)
    image_position: str = "first"  # or "after_instruction" (see EncodedPrompts)
    source: str | None = None  # the local file or folder the weights came from (None: built from a config)

    def __init__(self):
        super().__init__()
        self._prompt_cache: dict[str, tuple[list[int], list[bool]]] = {}

    # -- what differs between model families -------------------------------------------
    def prompt(self, instruction: str) -> str:
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> pixel_values in the model's dtype."""
        raise NotImplementedError

    @property
    def image_token_count(self) -> int:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    @property
    def vlm(self) -> nn.Module:
        """The model without its LM head (``*ForConditionalGeneration.model``), through a
        PEFT wrapper if there is one."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.model

    @property
    def hidden_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def action_token_ids(self, bins: int) -> torch.Tensor:
        """OpenVLA's layout: the action tokens are the last ``bins`` ids of the tokenizer's
        base vocabulary (``tokenizer.vocab_size``: added tokens such as OpenVLA's pad id
        32000 and the embedding's padding rows up to 32064 are not part of it)."""
        end = self.tokenizer.vocab_size
        return torch.arange(end - bins, end)

    def unknown_words(self, instruction: str) -> list[str]:
        """The words of ``instruction`` that the tokenizer maps to its unknown token (a word-level
        vocabulary such as the tiny VLM's has them; byte-level BPE tokenizers do not)."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        return [w for w in instruction.split() if unk in self.tokenizer(w, add_special_tokens=False)["input_ids"]]

    def _tokenize_one(self, instruction: str) -> tuple[list[int], list[bool]]:
        if instruction not in self._prompt_cache:
            unknown = self.unknown_words(instruction)
            if unknown:  # the stream's fixed instructions are checked at the start (OnPolicyDataModule.setup)
                warnings.warn(f"instruction {instruction!r}: {unknown} are not in the tokenizer's vocabulary and "
                              "become its unknown token", stacklevel=2)
            text = self.prompt(instruction)
            start = text.find(instruction.lower()) if instruction.lower() in text else text.find(instruction)
            end = start + len(instruction)
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"] + list(self.prompt_suffix_ids)
            goal = [s < end and e > start for s, e in enc["offset_mapping"]] + [False] * len(self.prompt_suffix_ids)
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            n_img = self.image_token_count
            cut = 0  # where the image placeholders go in the text's tokens
            if self.image_position == "after_instruction":
                cut = max(i for i, g in enumerate(goal) if g) + 1
            self._prompt_cache[instruction] = (
                bos + ids[:cut] + [self.image_token_id] * n_img + ids[cut:],
                [False] * len(bos) + goal[:cut] + [False] * n_img + goal[cut:],
            )
        return self._prompt_cache[instruction]

    def encode(self, instructions: list[str]) -> EncodedPrompts:
        unique = list(dict.fromkeys(instructions))
        if len(unique) < len(instructions):  # build each distinct prompt once, then gather
            where = {s: i for i, s in enumerate(unique)}
            return self.encode(unique).index(torch.tensor([where[s] for s in instructions]))
        rows = [self._tokenize_one(s) for s in instructions]
        length = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id or 0
        b = len(rows)
        input_ids = torch.full((b, length), pad, dtype=torch.long)
        attention = torch.zeros(b, length, dtype=torch.long)
        goal = torch.zeros(b, length, dtype=torch.bool)
        for i, (ids, g) in enumerate(rows):
            input_ids[i, length - len(ids):] = torch.tensor(ids)
            attention[i, length - len(ids):] = 1
            goal[i, length - len(ids):] = torch.tensor(g)
        image = (input_ids == self.image_token_id) & attention.bool()
        return EncodedPrompts(input_ids, attention, image, goal)

    def forward(self, input_ids, attention_mask, pixel_values=None, position_ids=None,
                past_key_values=None, use_cache=False):
        """Last-layer hidden states [B, L, H] (after the final norm) and the KV cache."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        out = self.vlm(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values
