"""Entry point: python train.py [test] --config configs/quickstart.yaml [--trainer.devices 2 ...]

A LightningCLI (omegaconf parser mode) over CRLModule and OnPolicyDataModule, or with
``stage: sft`` over SFTModule and DemoDataModule (modules/stages.py). Every knob is in the
YAML and shows with --print_config. Training: --ckpt_path resumes a run where it stopped.
``test`` (or ``validate``, the same): scores the policy of --ckpt_path (or, without it, the
weights the config loads, e.g. an OpenVLA checkpoint folder) on every task of the stream with
the config's evaluation callbacks, without training.
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


# jsonargparse's report on a typed knob (a class or a dataclass inside a class): the nested keys,
# the classes between them, and either an option it does not take or a value of the wrong type
_NESTED = re.compile(r'Parser key "([^"]+)"|class_path \'([^\']+)\'|Option \'([^\']+)\' is not accepted')
_WRONG_TYPE = re.compile(r"Expected a <class '([\w.]+)'>\. Got value: (\S+)")


def _is_dataclass(path: str) -> bool:
    import dataclasses
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return dataclasses.is_dataclass(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return False


def _typed_knob_error(message: str) -> str | None:
    """``key.path: unknown key`` or ``key.path=value: expected <type>`` from such a report."""
    path, between = [], None
    for key, cls, option in _NESTED.findall(message):
        if cls:
            between = cls
            continue
        if path and between and not _is_dataclass(between):
            path.append("init_args")  # a class's arguments sit under init_args in the YAML
        path.append(key or option)
        between = None
        if option:
            return f"{'.'.join(path)}: unknown key"
    wrong = _WRONG_TYPE.search(message)
    if len(path) > 1 and wrong:
        return f"{'.'.join(path)}={wrong[2]}: expected {wrong[1]}"
    return None


def _one_line(message: str) -> str:
    """jsonargparse wraps an error raised while it validates a class in a union or a list (e.g. a
    callback's) in a paragraph of alternatives: keep the kit's own message if there is one, else
    name the typed knob's key in full."""
    parts = [" ".join(p.split()) for p in re.split(r"\s- ", message)]
    own = next((p for p in parts if _KIT_ERROR.fullmatch(p)), None)
    return own or _typed_knob_error(message) or " ".join(message.split())


def _quiet_library_chatter() -> None:
    """The console shows the kit's progress and results: Lightning's product tips and a torch
    deprecation raised inside Lightning are dropped (nothing the user can act on)."""
    import logging

    class DropTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")

    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one ``error:`` line), 3 stopped before the end of the
    stream (trainer.max_epochs and the like), 128 + N after signal N (SIGINT 130, SIGTERM 143)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    evaluate = bool(argv) and argv[0] in ("test", "validate")
    if evaluate:
        argv = argv[1:]
        # a checkpoint from another run's folder: ModelCheckpoint's notice that its paths moved
        warnings.filterwarnings("ignore", message="The dirpath has changed")
    # the caching allocator grows segments instead of keeping many fixed ones: the update's micro-batches,
    # the decode caches and evaluation interleave tensors of many sizes (set the variable to override)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        _check_mujoco_gl()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        return _run(argv, evaluate, tmp)


def _run(argv: list[str], evaluate: bool, tmp: str) -> int:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # argv minus `test`
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from callbacks.interrupt import RunInterrupted, StopOnSignal, resume_command
    from callbacks.iteration_timing import IterationTiming
    from callbacks.task_boundary import ContinualMethod, with_method
    from callbacks.task_switch import stopped_before_stream_end
    from modules import run_checks
    from modules.checkpoint_io import KitCheckpointIO
    from modules.stages import STAGES, requested_stage, stage_classes

    try:
        stage = requested_stage(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    module_class, data_class = stage_classes(stage)  # rl: CRLModule, OnPolicyDataModule; sft: modules/stages.py

    _quiet_library_chatter()

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_argument("--stage", type=str, default="rl", choices=list(STAGES),
                                help="rl (CRL / PPO on env rollouts) or sft (supervised fine-tuning on demonstrations)")
            parser.add_argument("--ckpt_path", type=str | None, default=None,
                                help="resume from this Lightning checkpoint (train.py test: score it)")
            parser.add_argument("--seed", type=int, default=0, help="global seed (seed_everything)")
            parser.add_argument("--trust_checkpoint", type=bool, default=False,
                                help="load --ckpt_path with full pickle, which can run code stored in the file: "
                                     "only for a legacy checkpoint you wrote (docs/reliability.md)")
            parser.add_argument("--method", type=ContinualMethod | None, default=None,
                                help="the continual-learning method, a callback that acts at task boundaries "
                                     "(callbacks.anchor.AnchorCriticFreeze: CRL-VLA; callbacks.ewc.OnlineEWC; "
                                     "callbacks.adapters.PerTaskAdapters); null: sequential fine-tuning")
            # every run logs its per-iteration timing breakdown (``timing:`` in YAML configures it)
            parser.add_lightning_class_args(IterationTiming, "timing")

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

        def instantiate_trainer(self, **kwargs):
            callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks")
            return super().instantiate_trainer(
                **kwargs, callbacks=with_method(callbacks, self._get(self.config_init, "method")))

    _threads_per_process()
    cli = None
    try:
        run_checks.check_config_files(argv)
        cli = CLI(module_class, data_class, run=False, args=run_checks.nested_nulls_as_config(argv, tmp),
                  parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                  save_config_kwargs={"overwrite": True}, seed_everything_default=False)
        # atomic checkpoint writes; --ckpt_path loaded with weights_only=True (modules/checkpoint_io.py)
        cli.trainer.strategy.checkpoint_io = KitCheckpointIO(trust=cli.config.trust_checkpoint)
        if not evaluate:  # SIGINT/SIGTERM: a checkpoint, the resume command, exit 128 + N
            cli.trainer.callbacks.append(StopOnSignal(argv))
        run = cli.trainer.test if evaluate else cli.trainer.fit
        run(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path, weights_only=False)
    except RunInterrupted as stop:
        print(str(stop), file=sys.stderr, flush=True)
        return 128 + stop.signum
    except (ValueError, FileNotFoundError, MisconfigurationException, ArgumentError) as err:
        if cli is not None and cli.trainer.is_global_zero and cli.trainer.logger is not None:
            run_checks.remove_failed_run(cli.trainer.logger.log_dir)  # the logger's: trainer.log_dir broadcasts
        print("error: " + _one_line(str(err)), file=sys.stderr)
        return 2
    if not evaluate and stopped_before_stream_end(cli.trainer):
        return _stopped_early(cli, argv, resume_command)
    return 0


def _stopped_early(cli, argv: list[str], resume_command) -> int:
    """trainer.max_epochs (max_steps, max_time) ended the run before the end of the stream."""
    t, dm = cli.trainer, cli.datamodule
    last = t.strategy.checkpoint_io.last_saved
    by_epochs = t.max_epochs not in (None, -1) and t.current_epoch >= t.max_epochs
    limit = f"trainer.max_epochs={t.max_epochs}" if by_epochs else f"trainer.max_steps={t.max_steps} or trainer.max_time"
    go_on = f"; go on with: {resume_command(argv, last[0])} --trainer.max_epochs -1" if last else ""
    print(f"error: {limit}: training stopped after {t.current_epoch} iterations, in task {dm.task_index + 1} of "
          f"{dm.num_tasks}: the results are incomplete (metrics.json: complete false){go_on}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
