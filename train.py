"""Entry point: python train.py --config configs/quickstart.yaml [--trainer.devices 2 ...]

A LightningCLI (omegaconf parser mode) over CRLModule and OnPolicyDataModule, or with
``stage: sft`` over SFTModule and DemoDataModule (modules/stages.py). Every knob is in the
YAML and shows with --print_config. --ckpt_path resumes a run where it stopped.
"""
from __future__ import annotations

import os
import re
import sys
import warnings


def _threads_per_process() -> None:
    """Split the cores between DDP ranks on CPU instead of oversubscribing them."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):  # set by the caller (e.g. a sweep of parallel runs)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))


def _check_mujoco_gl() -> None:
    """A MUJOCO_GL that cannot render makes even ``import torchrl`` fail with a GL traceback
    (torchrl imports mujoco-based libs): check it first, in a subprocess, for one clear line."""
    renderer = os.environ.get("MUJOCO_GL")
    if renderer in ("egl", "osmesa") and os.environ.get("CRL_KIT_RENDERER_OK") != renderer:
        from datamodules.libero_setup import check_renderer

        check_renderer(renderer)
        os.environ["CRL_KIT_RENDERER_OK"] = renderer


# the kit's own errors read "<key>=<value>: <what is wrong>" (e.g. TaskSwitch.success_window=0: must be >= 1)
_KIT_ERROR = re.compile(r"[A-Za-z_][\w.\[\]]*=\S.*?: \S.*")


def _one_line(message: str) -> str:
    """jsonargparse wraps an error raised while it validates a class in a union or a list (e.g. a
    callback's) in a paragraph of alternatives: keep the kit's own message if there is one."""
    parts = [" ".join(p.split()) for p in re.split(r"\s- ", message)]
    return next((p for p in parts if _KIT_ERROR.fullmatch(p)), " ".join(message.split()))


def main(argv: list[str] | None = None) -> int:
    # the caching allocator grows segments instead of keeping many fixed ones: the update's micro-batches,
    # the decode caches and evaluation interleave tensors of many sizes (set the variable to override)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        _check_mujoco_gl()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from callbacks.iteration_timing import IterationTiming
    from modules.stages import STAGES, requested_stage, stage_classes

    try:
        stage = requested_stage(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    module_class, data_class = stage_classes(stage)  # rl: CRLModule, OnPolicyDataModule; sft: modules/stages.py

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_argument("--stage", type=str, default="rl", choices=list(STAGES),
                                help="rl (CRL / PPO on env rollouts) or sft (supervised fine-tuning on demonstrations)")
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="resume from this Lightning checkpoint")
            parser.add_argument("--seed", type=int, default=0, help="global seed (seed_everything)")
            # every run logs its per-iteration timing breakdown (``timing:`` in YAML configures it)
            parser.add_lightning_class_args(IterationTiming, "timing")

        def before_instantiate_classes(self):
            from lightning.pytorch import seed_everything

            seed_everything(self.config.seed, workers=True, verbose=False)
            ckpt = self.config.ckpt_path
            if ckpt is not None and not os.path.isfile(ckpt):
                raise FileNotFoundError(f"ckpt_path={ckpt!r}: no such checkpoint file")

    _threads_per_process()
    try:
        cli = CLI(module_class, data_class, run=False, args=argv,
                  parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                  save_config_kwargs={"overwrite": True}, seed_everything_default=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path,
                        weights_only=False)  # our own checkpoints hold RNG and datamodule state
    except (ValueError, FileNotFoundError, MisconfigurationException, ArgumentError) as err:
        print("error: " + _one_line(str(err)), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
