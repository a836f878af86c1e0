"""Diagnostic: train the quickstart on a cut stream with overrides and print the per-iteration
rollout success and explained variance (read back from TensorBoard).

    python scripts/rl_probe.py NAME tasks=1 iters=40 eval=32 model.policy_lr=5e-4 \
        model.policy.init_args.backbone.init_args.layers=2

``tasks=K`` keeps the first K tasks, ``iters=N`` sets TaskSwitch's iterations per task,
``eval=E`` the evaluation episodes, ``room=S`` the room size, ``noanchor`` drops
AnchorCriticFreeze; any other ``dotted.key=value`` (YAML value) is set in the config.
(The LightningCLI cannot override one element of the callback list, hence this script.)
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import yaml
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _value(text: str):
    """YAML value; '5e-4' too (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def build(name: str, overrides: list[str], out: str):
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "quickstart.yaml"))
    cfg.trainer.logger.init_args.save_dir = out
    cfg.trainer.logger.init_args.name = name
    cfg.trainer.callbacks = [c for c in cfg.trainer.callbacks
                             if not c.class_path.endswith(("TaskProgressBar", "ModelCheckpoint"))]
    cfg.trainer.enable_progress_bar = False

    def callback(suffix):
        return next(c for c in cfg.trainer.callbacks if c.class_path.endswith(suffix))
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "tasks":
            cfg.data.stream = cfg.data.stream[:int(value)]
        elif key == "iters":
            callback("TaskSwitch").init_args.iterations_per_task = int(value)
        elif key == "eval":
            callback("PerTaskEvaluation").init_args.episodes_per_task = int(value)
            callback("PerTaskEvaluation").init_args.num_envs = int(value)
        elif key == "room":
            for task in cfg.data.stream:
                task.room_size = int(value)
        elif key == "noanchor":
            cfg.trainer.callbacks = [c for c in cfg.trainer.callbacks
                                     if not c.class_path.endswith("AnchorCriticFreeze")]
        else:
            OmegaConf.update(cfg, key, _value(value), force_add=True)
    return cfg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    name, overrides = argv[0], argv[1:]
    out = os.path.join(ROOT, "runs", "probes")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.yaml")
    OmegaConf.save(build(name, overrides, out), path)
    start = time.time()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", path], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)))
    print(f"rc {res.returncode}  wall {time.time() - start:.0f}s")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(sorted(glob.glob(os.path.join(out, name, "version_*")))[-1])
    acc.Reload()
    for tag in ("rollout/success", "rollout/explained_variance", "train/entropy", "train/approx_kl"):
        if tag in acc.Tags()["scalars"]:
            print(tag, [round(e.value, 2) for e in acc.Scalars(tag)])
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
