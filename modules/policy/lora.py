"""LoRA adapters through PEFT, and the frozen old policy as a second adapter.

The trainable adapter is PEFT's ``default``. At a task boundary its weights are copied into
an adapter named ``old`` on the *same* base weights (never a second copy of the base model);
the old policy's forward switches the active adapter for the duration of the call.
Adapters are saved in PEFT's own format (``PeftModel.from_pretrained`` loads them).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model

TRAIN_ADAPTER, OLD_ADAPTER = "default", "old"


COMPUTE_DTYPES = ("float32", "backbone")


class _BranchLinear(torch.nn.Linear):
    """A LoRA A/B matrix that multiplies in its input's dtype: the float32 master weight is cast
    to the activations' dtype (bf16 with a bf16 backbone) for the matmul; gradients still reach
    the float32 weight, so the optimiser steps in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _branches_in_backbone_dtype(model: PeftModel) -> None:
    """``compute_dtype: backbone`` on every adapter of ``model`` (also ones added later)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False  # PEFT would copy the activations to float32
            for branch in (*module.lora_A.values(), *module.lora_B.values()):
                if type(branch) is torch.nn.Linear:
                    branch.__class__ = _BranchLinear


@functools.cache
def _fused_lora_linear_class():
    """PEFT's LoRA ``Linear`` with the plain single-adapter forward done in one ``addmm``
    (built on first use: PEFT is imported lazily)."""
    from peft.tuners.lora import Linear as PeftLinear

    class FusedLoraLinear(PeftLinear):
        """``y = base(x) + (A x) (s B)^T`` as ``addmm(base(x), A x, (s B)^T)``: the scale s is folded
        into B's r columns and the sum is the matmul's epilogue, where PEFT's
        ``base(x) + B(A x) * s`` spends two element-wise passes over the full output width
        (and one more in the backward). Same arithmetic up to rounding; anything else
        (several or merged adapters, dropout, biases, variants, PEFT's keyword arguments)
        takes PEFT's own forward."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            names = self.active_adapters
            name = names[0] if len(names) == 1 else None
            base = self.base_layer
            if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
                    or name in self.lora_variant or self.lora_B[name].bias is not None
                    or not isinstance(self.lora_dropout[name], torch.nn.Identity)
                    or type(base) is not torch.nn.Linear or x.dtype != base.weight.dtype):
                return super().forward(x, *args, **kwargs)
            down = torch.nn.functional.linear(x, self.lora_A[name].weight.to(x.dtype))  # A x: r wide
            up = (self.lora_B[name].weight * self.scaling[name]).to(x.dtype).t()         # (s B)^T: r x out
            y = torch.nn.functional.linear(x, base.weight, base.bias)
            return torch.addmm(y.reshape(-1, y.shape[-1]), down.reshape(-1, down.shape[-1]), up).view(y.shape)

    return FusedLoraLinear


def set_fused_lora(model: torch.nn.Module, fused: bool) -> int:
    """Switch every LoRA linear layer of ``model`` between PEFT's forward and the fused one
    (``LoRA.fused``); returns how many layers were switched."""
    from peft.tuners.lora import Linear as PeftLinear

    fused_cls, switched = _fused_lora_linear_class(), 0
    for module in model.modules():
        if type(module) in (PeftLinear, fused_cls):
            module.__class__ = fused_cls if fused else PeftLinear
            switched += 1
    return switched


@dataclass
class LoRA:
    """PEFT LoRA adapters on a backbone; the base weights stay frozen.

    Args:
        r: rank of each adapter's update B A.
        alpha: scaling of the update (alpha / r * B A).
        dropout: dropout on the adapters' input.
        target_modules: the linear layers adapted, by name, or ``all-linear``.
        compute_dtype: ``float32`` (PEFT's: the branches multiply in float32) or ``backbone``
            (in the backbone's dtype, bf16 on a GPU, from float32 master weights).
        fused: with ``compute_dtype: backbone``, each adapted linear layer adds its branch inside
            one matmul (``addmm``, scale folded into B) instead of PEFT's two full-width passes.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    compute_dtype: str = "float32"
    fused: bool = False


def lora_kwargs(lora: LoRA | dict) -> dict:
    """``apply_lora``'s keyword arguments from a ``LoRA`` (the CLI's) or a plain mapping."""
    return asdict(lora) if is_dataclass(lora) else dict(lora)


def apply_lora(model: torch.nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
               target_modules: list[str] | str = ("q_proj", "v_proj"), compute_dtype: str = "float32",
               fused: bool = False) -> PeftModel:
    """Wrap ``model`` with a trainable LoRA adapter; the base weights are frozen.

    Args:
        r, alpha, dropout, target_modules: PEFT's ``LoraConfig`` (rank, scale alpha / r, dropout on
            the branch input, the adapted modules or ``all-linear``).
        compute_dtype: ``float32`` (PEFT's default: each branch copies its input to float32 and
            multiplies in float32) or ``backbone`` (the branch multiplies in the backbone's dtype,
            bf16 on a GPU, from float32 master weights: no float32 copy of every linear layer's
            input, and bf16 tensor cores). The weights and the optimiser stay float32 either way.
        fused: ``compute_dtype: backbone`` only: ``y = addmm(base(x), A x, (s B)^T)``, one matmul
            whose epilogue adds the branch, in place of PEFT's ``base(x) + B(A x) * s`` (a
            full-width multiply and add per layer, and the multiply's backward).
    """
    if r <= 0:
        raise ValueError(f"model.policy.lora.r={r!r}: must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.policy.lora.dropout={dropout!r}: must be in [0, 1)")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.policy.lora.compute_dtype={compute_dtype!r}: one of {list(COMPUTE_DTYPES)}")
    if fused and compute_dtype != "backbone":
        raise ValueError(f"model.policy.lora.fused={fused!r}: needs compute_dtype: backbone "
                         f"(got {compute_dtype!r}; PEFT's float32 branches add in float32)")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft_model = get_peft_model(model, config)
    peft_model.kit_compute_dtype = compute_dtype
    if compute_dtype == "backbone":
        _branches_in_backbone_dtype(peft_model)
    if fused:
        set_fused_lora(peft_model, True)
    return peft_model


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
        if getattr(model, "kit_compute_dtype", "float32") == "backbone":
            _branches_in_backbone_dtype(model)
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


def ensure_adapters(model: PeftModel, names) -> None:
    """Create the adapters ``names`` that ``model`` lacks, as frozen copies of the trainable one
    (e.g. before loading a checkpoint that has them)."""
    for name in sorted(set(names) - {TRAIN_ADAPTER}):
        if name not in model.peft_config:
            snapshot_adapter(model, dst=name)


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
