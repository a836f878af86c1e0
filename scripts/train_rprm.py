"""Train VLA-RL's robotic process reward model on pseudo-labelled demonstrations.

    python scripts/train_rprm.py --config configs/rprm.yaml [--data.data_dir DIR --trainer.max_epochs N ...]

A LightningCLI (omegaconf parser mode) over RPRMModule and RPRMDataModule; every knob is in the
YAML and shows with --print_config. The dataset is built from ``data.demos`` on first use.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from lightning.pytorch.cli import LightningCLI

    from datamodules.rprm_data import RPRMDataModule
    from modules.vla_rl.rprm_module import RPRMModule

    if os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        cli = LightningCLI(RPRMModule, RPRMDataModule, run=False, args=argv,
                           parser_kwargs={"parser_mode": "omegaconf"},
                           save_config_kwargs={"overwrite": True}, seed_everything_default=0)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        held_out = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        print("held-out episodes, last epoch: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(held_out.items())),
              flush=True)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
