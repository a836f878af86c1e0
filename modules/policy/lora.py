"""LoRA adapters through PEFT, and the frozen old policy as a second adapter.

The trainable adapter is PEFT's ``default``. At a task boundary its weights are copied into
an adapter named ``old`` on the *same* base weights (never a second copy of the base model);
the old policy's forward switches the active adapter for the duration of the call.
Adapters are saved in PEFT's own format (``PeftModel.from_pretrained`` loads them).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model

TRAIN_ADAPTER, OLD_ADAPTER = "default", "old"


@dataclass
class LoRA:
    """PEFT LoRA adapters on a backbone; the base weights stay frozen.

    Args:
        r: rank of each adapter's update B A.
        alpha: scaling of the update (alpha / r * B A).
        dropout: dropout on the adapters' input.
        target_modules: the linear layers adapted, by name, or ``all-linear``.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])


def lora_kwargs(lora: LoRA | dict) -> dict:
    """``apply_lora``'s keyword arguments from a ``LoRA`` (the CLI's) or a plain mapping."""
    return asdict(lora) if is_dataclass(lora) else dict(lora)


def apply_lora(model: torch.nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: list[str] | str = ("q_proj", "v_proj")) -> PeftModel:
    """Wrap ``model`` with a trainable LoRA adapter; the base weights are frozen."""
    if r <= 0:
        raise ValueError(f"model.policy.lora.r={r!r}: must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.policy.lora.dropout={dropout!r}: must be in [0, 1)")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    return get_peft_model(model, config)


@contextmanager
def active_adapter(model: PeftModel, name: str):
    """Run with adapter ``name`` active (frozen); the trainable adapter is active again after."""
    model.base_model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.base_model.set_adapter(TRAIN_ADAPTER)  # also restores requires_grad: default only


@torch.no_grad()
def snapshot_adapter(model: PeftModel, src: str = TRAIN_ADAPTER, dst: str = OLD_ADAPTER) -> None:
    """Copy adapter ``src``'s weights into adapter ``dst`` (created on first use), frozen."""
    if dst not in model.peft_config:
        model.add_adapter(dst, model.peft_config[src])
    params = dict(model.named_parameters())
    marker_dst, marker_src = f".{dst}.", f".{src}."
    copied = 0
    for name, p in params.items():
        if marker_dst in name:
            p.copy_(params[name.replace(marker_dst, marker_src)])
            copied += 1
    if not copied:
        raise RuntimeError(f"no parameters of adapter {dst!r} found to copy into")
    model.base_model.set_adapter(src)  # src trainable, dst frozen


def reset_adapter(model: PeftModel, name: str = TRAIN_ADAPTER) -> None:
    """Fresh LoRA weights for adapter ``name`` (A random, B = 0: the base model's behaviour)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.reset_lora_parameters(name, init_lora_weights=True)


def adapter_names(state_dict_keys) -> set[str]:
    """Names of the LoRA adapters whose weights appear in a state dict."""
    names = set()
    for key in state_dict_keys:
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                names.add(key.split(part, 1)[1].split(".", 1)[0])
    return names


class AdapterPolicy:
    """The frozen old policy: the live policy with adapter ``name`` active. Not an
    nn.Module, so its (shared) weights are counted and checkpointed once, in the policy."""

    def __init__(self, policy, name: str = OLD_ADAPTER):
        self.policy, self.name = policy, name

    def act(self, *args, **kwargs):
        with active_adapter(self.policy.backbone.model, self.name):
            return self.policy.act(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with active_adapter(self.policy.backbone.model, self.name), torch.no_grad():
            return self.policy.evaluate(*args, **kwargs)
