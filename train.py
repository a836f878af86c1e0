"""Entry point: python train.py --config configs/quickstart.yaml [--trainer.devices 2 ...]

A LightningCLI (omegaconf parser mode) over CRLModule and OnPolicyDataModule. Every knob is
in the YAML and shows with --print_config. --ckpt_path resumes a run where it stopped.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
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
    """Exit status: 0 done, 2 bad input (one ``error:`` line), 3 stopped before the end of the
    stream (trainer.max_epochs and the like), 128 + N after signal N (SIGINT 130, SIGTERM 143)."""
    try:
        _check_mujoco_gl()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return _run(argv, tmp)


def _run(argv: list[str], tmp: str) -> int:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")  # we pass sys.argv on
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from callbacks.interrupt import RunInterrupted, StopOnSignal, resume_command
    from callbacks.task_switch import TaskSwitch
    from datamodules.on_policy import OnPolicyDataModule
    from modules import run_checks
    from modules.checkpoint_io import KitCheckpointIO
    from modules.crl_module import CRLModule

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="resume from this Lightning checkpoint")
            parser.add_argument("--seed", type=int, default=0, help="global seed (seed_everything)")
            parser.add_argument("--trust_checkpoint", type=bool, default=False,
                                help="load --ckpt_path with full pickle, which can run code stored in the file: "
                                     "only for a legacy checkpoint you wrote (docs/reliability.md)")

        def before_instantiate_classes(self):
            from lightning.pytorch import seed_everything

            config = self.config.as_dict()
            run_checks.check_finite(config)
            run_checks.check_devices(config["trainer"].get("devices", "auto"))
            run_checks.check_output_dirs(config["trainer"])
            seed_everything(self.config.seed, workers=True, verbose=False)
            ckpt = self.config.ckpt_path
            if ckpt is not None and not os.path.isfile(ckpt):
                raise FileNotFoundError(f"ckpt_path={ckpt!r}: no such checkpoint file")

    _threads_per_process()
    cli = None
    try:
        run_checks.check_config_files(argv)
        cli = CLI(CRLModule, OnPolicyDataModule, run=False, args=run_checks.nested_nulls_as_config(argv, tmp),
                  parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                  save_config_kwargs={"overwrite": True}, seed_everything_default=False)
        # atomic checkpoint writes; --ckpt_path loaded with weights_only=True (modules/checkpoint_io.py)
        cli.trainer.strategy.checkpoint_io = KitCheckpointIO(trust=cli.config.trust_checkpoint)
        cli.trainer.callbacks.append(StopOnSignal(argv))  # SIGINT/SIGTERM: checkpoint, resume command, exit 128+N
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    except RunInterrupted as stop:
        print(str(stop), file=sys.stderr, flush=True)
        return 128 + stop.signum
    except (ValueError, FileNotFoundError, MisconfigurationException, ArgumentError) as err:
        if cli is not None and cli.trainer.is_global_zero and cli.trainer.logger is not None:
            run_checks.remove_failed_run(cli.trainer.logger.log_dir)  # the logger's: trainer.log_dir broadcasts
        print("error: " + _one_line(str(err)), file=sys.stderr)
        return 2
    switch = next((cb for cb in cli.trainer.callbacks if isinstance(cb, TaskSwitch)), None)
    if switch is not None and not switch.finished:
        dm = cli.datamodule
        last = cli.trainer.strategy.checkpoint_io.last_saved
        t = cli.trainer
        by_epochs = t.max_epochs not in (None, -1) and t.current_epoch >= t.max_epochs
        limit = f"trainer.max_epochs={t.max_epochs}" if by_epochs else f"trainer.max_steps={t.max_steps} or trainer.max_time"
        print(f"error: {limit}: training stopped after {t.current_epoch} "
              f"iterations, in task {dm.task_index + 1} of {dm.num_tasks}: the results are incomplete "
              "(metrics.json: complete false)" + (f"; go on with: {resume_command(argv, last[0])} "
                                                  "--trainer.max_epochs -1" if last else ""), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
