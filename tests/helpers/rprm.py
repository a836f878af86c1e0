"""A tiny Llava + LoRA RPRM, as the RPRM tests build it."""
import torch
from conftest import WORDS

from modules.policy import TinyLlava
from modules.vla_rl.rprm import QUESTION_WORDS, RPRM

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def make_rprm(seed=0, lora=LORA):
    backbone = TinyLlava(words=WORDS + QUESTION_WORDS, action_bins=3, hidden_size=32, vision_hidden_size=32,
                         layers=1, vision_layers=1, heads=2, seed=seed)
    torch.manual_seed(seed)  # the head's init
    return RPRM(backbone, lora=lora)
