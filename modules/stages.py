"""The training stages ``train.py`` can run, and which one a command line asks for.

``stage: rl`` (default): ``CRLModule`` + ``OnPolicyDataModule`` (PPO / CRL-VLA on env rollouts).
``stage: sft``: ``SFTModule`` + ``DemoDataModule`` (supervised fine-tuning on demonstrations).
The stage is a top-level key of the config (``stage: sft``) or ``--stage sft``; the last one
given wins, as for every other key. It is read before the parser is built because the parser's
``model`` and ``data`` arguments are those of the stage's classes.
"""
from __future__ import annotations

import importlib

STAGES = {
    "rl": ("modules.crl_module:CRLModule", "datamodules.on_policy:OnPolicyDataModule"),
    "sft": ("modules.sft_module:SFTModule", "datamodules.demo_data:DemoDataModule"),
}


def requested_stage(argv: list[str]) -> str:
    """``stage`` from the ``--config`` files and ``--stage`` flags of ``argv``, in order."""
    import yaml

    stage = "rl"
    i = 0
    while i < len(argv):
        arg, value = argv[i], None
        if "=" in arg and arg.split("=", 1)[0] in ("--config", "--stage"):
            arg, value = arg.split("=", 1)
        elif arg in ("--config", "--stage") and i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        if arg == "--stage" and value is not None:
            stage = value
        elif arg == "--config" and value is not None:
            try:
                with open(value) as f:
                    config = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                config = None  # the CLI reports an unreadable config itself
            if isinstance(config, dict) and "stage" in config:
                stage = config["stage"]
        i += 1
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: one of {list(STAGES)}")
    return stage


def stage_classes(stage: str):
    """(LightningModule class, LightningDataModule class) of ``stage``."""
    out = []
    for spec in STAGES[stage]:
        module, name = spec.split(":")
        out.append(getattr(importlib.import_module(module), name))
    return tuple(out)
