"""ExportPolicy: at the end of training, writes the policy where RL configs load it from (only
when the stream ran to its end: a run stopped early by a signal or max_epochs exports nothing).

``path`` (default ``<log dir>/policy``): an OpenVLA checkpoint directory for an OpenVLA
backbone (an OpenVLA-OFT one, with OFT's action head file, for an OFT policy), ``tiny_llava.pt``
for a tiny Llava, and the demos' ``dataset_statistics.json`` (modules/policy/export.py). Written by rank 0 into
``<path>.partial`` and renamed when complete, so a crash never leaves a directory that looks
like a finished export.
"""
from __future__ import annotations

import os
import shutil

from lightning import Callback
from lightning.pytorch.utilities import rank_zero_info

from callbacks.task_switch import stopped_before_stream_end
from modules.policy.export import export_policy


class ExportPolicy(Callback):
    def __init__(self, path: str | None = None):
        """``path``: the export directory (replaced if it exists); null: ``<log dir>/policy``."""
        self.path = path

    def on_train_end(self, trainer, pl_module):
        path = self.path or os.path.join(trainer.log_dir or ".", "policy")  # every rank asks (broadcast)
        if stopped_before_stream_end(trainer):
            rank_zero_info("[export] training stopped before the stream's end: nothing exported")
            return
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        stats = getattr(dm, "statistics", None)
        if stats is not None and getattr(dm, "unnorm_key", None) is not None:
            stats = {dm.unnorm_key: stats[dm.unnorm_key]}
        tmp = path.rstrip("/") + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        export_policy(pl_module.policy, tmp, stats)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        rank_zero_info(f"[export] policy written to {path}")
