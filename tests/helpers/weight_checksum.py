"""A test-only callback: each rank writes a checksum of its weights when training ends, so a
DDP test can check that the ranks (which collect different rollouts) ended identical."""
import os

import torch
from lightning import Callback


class WeightChecksum(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            total = sum(p.double().sum().item() for p in pl_module.parameters())
            squares = sum(p.double().pow(2).sum().item() for p in pl_module.parameters())
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.txt"), "w") as f:
            f.write(f"{total!r} {squares!r}\n")
