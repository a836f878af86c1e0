"""The Robotic Process Reward Model (VLA-RL): a VLM (+ LoRA) asked "is this step completing a
sub-task of <instruction>?", answering with a binary head.

Head choice: a linear layer on the hidden state of the *last prompt token* (prompts are
left-padded, so position -1 is always a real token, never padding: the public critic's defect of
reading a padding position cannot happen), not a yes/no token logit. Why: it works with every
backbone of the kit, including the tiny word-level tokenizer that has no "yes"/"no" tokens and
OpenVLA, whose LM head was re-purposed for action tokens; the head's sigmoid is the score in
[0, 1] that the reward shaping adds; and training it is plain BCE on one logit.
"""
from __future__ import annotations

import torch
from torch import nn

from modules.policy.backbone import VLMBackbone
from modules.policy.lora import LoRA, apply_lora, lora_kwargs

DEFAULT_QUESTION = "In: Is this step completing a sub-task of {instruction}?\nOut:"
# the question's words, for a word-level tokenizer (TinyLlava(words=...))
QUESTION_WORDS = ["is", "this", "step", "completing", "a", "sub", "-", "task", "of"]


class QuestionPrompt:
    """The RPRM's prompt in place of the policy's (a picklable callable; the backbone's
    ``encode`` locates the instruction's tokens in it)."""

    def __init__(self, template: str):
        if "{instruction}" not in template:
            raise ValueError(f"model.rprm.question={template!r}: must contain '{{instruction}}'")
        self.template = template

    def __call__(self, instruction: str) -> str:
        return self.template.format(instruction=instruction.lower())


def use_question(backbone: VLMBackbone, template: str) -> None:
    """Make ``backbone.encode`` build the RPRM's question (this instance only): VLMBackbone's
    tokenisation calls ``self.prompt``; HFVisionLanguageBackbone formats ``self.template``."""
    backbone.prompt = QuestionPrompt(template)
    if hasattr(backbone, "template"):
        backbone.template = template
    backbone._prompt_cache.clear()


class RPRM(nn.Module):
    def __init__(self, backbone: VLMBackbone, lora: LoRA | None = None, question: str = DEFAULT_QUESTION,
                 head_dropout: float = 0.0):
        """
        Args:
            backbone: the VLM that reads the frame and the question.
            lora: PEFT LoRA on the VLM ({r, alpha, dropout, target_modules}; VLA-RL fine-tunes the
                RPRM with LoRA); None: the whole VLM trains.
            question: the prompt template in place of the policy's; must contain ``{instruction}``
                (filled with the lower-cased instruction).
            head_dropout: dropout before the binary head's linear layer.
        """
        super().__init__()
        use_question(backbone, question)
        hidden = backbone.hidden_size
        if lora is not None:
            backbone.model = apply_lora(backbone.model, **lora_kwargs(lora))
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(hidden, 1))

    @property
    def device(self) -> torch.device:
        return self.head[1].weight.device

    def forward(self, images: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """uint8 images [B, 3, H, W] + instructions -> logits [B] of "completes a sub-task"."""
        prompts = self.backbone.encode(list(instructions)).to(self.device)
        pixel_values = self.backbone.preprocess(images.to(self.device))
        hidden, _ = self.backbone(prompts.input_ids, prompts.attention_mask, pixel_values)
        return self.head(hidden[:, -1].float()).squeeze(-1)  # the last prompt token (left padding)

    @torch.no_grad()
    def score(self, images: torch.Tensor, instructions: list[str], batch_size: int = 256) -> torch.Tensor:
        """P(step completes a sub-task) [B] in [0, 1], batched, no grad, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            out = [torch.sigmoid(self(images[s:s + batch_size], instructions[s:s + batch_size]))
                   for s in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, device=self.device)
