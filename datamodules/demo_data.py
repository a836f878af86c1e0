"""Demonstrations for supervised fine-tuning (SFT): LIBERO HDF5 demo files -> training batches
whose images are exactly what the policy sees online.

Every frame goes through the same steps as a LIBERO env's observation in the kit
(datamodules/libero.py, with the stream entry's options): flipped 180 degrees, JPEG round-trip,
TF's Lanczos3 resize to ``image_size`` and OpenVLA's 0.9-area centre crop. The recorded render
size must equal the entry's ``render_size`` (else SFT and RL would see different pixels; one
error line says which). With ``random_crop`` the crop is OpenVLA's training augmentation
instead: a square box of 0.9 of the area at a random place, resized back (bilinear), done on
the batch's device; the centred box is what evaluation and RL see.

Actions are converted to OpenVLA's convention (gripper 1 open / 0 closed: 1 - clip(g, 0, 1));
with ``chunk_size`` K each sample's target is the K actions from its step on, the last one
repeated past the episode's end (OFT-style chunks; K = 1 for a token VLA).

The stream and the task switching are the on-policy datamodule's: ``joint: true`` (default)
samples every task's demos in every batch (multi-task SFT, OpenVLA's recipe); ``joint: false``
samples only the current task's (sequential behaviour cloning, LIBERO's lifelong baseline).
TaskSwitch cuts training into one block per task either way, and PerTaskEvaluation scores
every task on its fixed initial states after each block. One Lightning epoch is
``steps_per_iteration`` batches.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from datamodules.libero_hdf5 import demo_file_for, import_h5py, openvla_actions, read_statistics
from datamodules.tasks import Task, TaskStream, make_env, parse_stream

CROP_AREA = 0.9  # OpenVLA's crop_scale


class _Batches(IterableDataset):
    def __init__(self, dm: "DemoDataModule"):
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.steps_per_iteration

    def __iter__(self):
        for _ in range(self.dm.steps_per_iteration):
            yield self.dm.sample_batch()


def random_crop(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, 3, S, S] (not yet cropped) -> a random square box of 0.9 of the area per
    image, resized back to S (bilinear). The centred box is OpenVLA's evaluation crop."""
    b = images.shape[0]
    scale = math.sqrt(CROP_AREA)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - scale)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


class DemoDataModule(TaskStream, LightningDataModule):
    def __init__(self, stream: list[dict], demos: str, demos_per_task: int | None = None,
                 batch_size: int = 64, steps_per_iteration: int = 100, joint: bool = True,
                 chunk_size: int = 1, camera: str = "agentview", random_crop: bool = False,
                 unnorm_key: str | None = None, seed: int = 0):
        """``stream``: the tasks (as ``data.stream`` of the on-policy datamodule; LIBERO entries,
        whose options fix the image pipeline and the evaluation envs). ``demos``: the folder of
        ``<task name>_demo.hdf5`` files (scripts/write_libero_demos.py or LIBERO's own);
        ``demos_per_task``: use only the first N of each file (null: all). ``camera``:
        ``agentview`` or ``eye_in_hand``. ``unnorm_key``: which entry of the folder's
        dataset_statistics.json the policy's action codec must use (checked at fit start; null:
        the only one)."""
        super().__init__()
        self.tasks: list[Task] = parse_stream(stream)
        bad = [i for i, t in enumerate(self.tasks) if t.env != "libero"]
        if bad:
            raise ValueError(f"data.stream[{bad[0]}].env={self.tasks[bad[0]].env!r}: demonstrations are LIBERO's")
        for name, value in (("batch_size", batch_size), ("steps_per_iteration", steps_per_iteration),
                            ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r}: must be an integer >= 1")
        if demos_per_task is not None and demos_per_task < 1:
            raise ValueError(f"data.demos_per_task={demos_per_task!r}: must be >= 1 (or null: all)")
        if camera not in ("agentview", "eye_in_hand"):
            raise ValueError(f"data.camera={camera!r}: agentview or eye_in_hand")
        self.save_hyperparameters()
        self.demos, self.demos_per_task = demos, demos_per_task
        self.batch_size, self.steps_per_iteration, self.joint = batch_size, steps_per_iteration, joint
        self.chunk_size, self.camera, self.random_crop, self.seed = chunk_size, camera, random_crop, seed
        self.statistics, self.unnorm_key = read_statistics(demos, unnorm_key)
        self.task_index = 0
        self.frames: list[torch.Tensor] | None = None  # per task: uint8 [N, 3, S, S]
        self.targets: list[torch.Tensor] = []  # per task: float32 [N, K, 7], OpenVLA's convention
        self.generator = torch.Generator().manual_seed(seed)

    # -- the stream (the interface TaskSwitch, PerTaskEvaluation and the progress bar use) --------
    @property
    def frames_per_batch(self) -> int:
        """Env frames an iteration collects: none (callbacks/iteration_timing.py reads it)."""
        return 0

    def set_task(self, index: int) -> None:
        self.task_index = index

    def make_env(self, task: Task, num_envs: int, seed: int, init_state_ids: list[int] | None = None,
                 init_state_queues=None):
        return make_env(task, num_envs, seed, init_state_ids, init_state_queues)

    # -- loading ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.frames is not None:
            return
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        self.generator.manual_seed(self.seed + 1_000_003 * rank)
        self.frames, self.targets = [], []
        for i, task in enumerate(self.tasks):
            frames, targets = load_task_demos(task, self.demos, self.demos_per_task, self.camera,
                                              self.chunk_size, crop=not self.random_crop, where=f"data.stream[{i}]")
            self.frames.append(frames)
            self.targets.append(targets)

    def sample_batch(self) -> dict:
        tasks = range(self.num_tasks) if self.joint else [self.task_index]
        sizes = torch.tensor([len(self.frames[k]) for k in tasks], dtype=torch.float64)
        which = torch.multinomial(sizes, self.batch_size, replacement=True, generator=self.generator)
        images, actions, instructions = [], [], []
        for slot, k in enumerate(tasks):
            n = int((which == slot).sum())
            if n == 0:
                continue
            idx = torch.randint(len(self.frames[k]), (n,), generator=self.generator)
            images.append(self.frames[k][idx])
            actions.append(self.targets[k][idx])
            instructions += [self.tasks[k].instruction] * n
        return {"image": torch.cat(images), "action": torch.cat(actions), "instruction": instructions}

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.random_crop:
            batch["image"] = random_crop(batch["image"], self.generator)
        return batch

    def train_dataloader(self):
        return DataLoader(_Batches(self), batch_size=None, num_workers=0, collate_fn=_identity)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"task_index": self.task_index, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.set_task(state["task_index"])
        self.generator.set_state(state["generator"])


def load_task_demos(task: Task, folder: str, limit: int | None, camera: str, chunk_size: int, crop: bool,
                    where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's demo file -> (frames uint8 [N, 3, S, S] through the task's image pipeline,
    action chunks float32 [N, K, 7] in OpenVLA's convention)."""
    from datamodules.libero import libero_options, openvla_stages
    from datamodules.libero_env import chw_frame

    options = libero_options(task.params, where)
    if not crop and not options["center_crop"]:
        raise ValueError(f"{where}.center_crop=False: data.random_crop needs the env's centre crop (it replaces it "
                         "in training; evaluation and RL see the centred box)")
    path = demo_file_for(folder, task.level, task.target)
    frames, targets = [], []
    with import_h5py().File(path, "r") as f:
        names = sorted((k for k in f["data"] if k.startswith("demo_")), key=lambda s: int(s.split("_")[-1]))
        if limit is not None:
            if len(names) < limit:
                raise ValueError(f"data.demos_per_task={limit}: {path} holds {len(names)} demonstrations")
            names = names[:limit]
        for name in names:
            demo = f["data"][name]
            images = demo[f"obs/{camera}_rgb"][()]
            if images.shape[1] != options["render_size"]:
                raise ValueError(f"{where}.render_size={options['render_size']}: the demonstrations in {folder} are "
                                 f"{images.shape[1]} px; render at their size so SFT and RL see the same pixels")
            chw = torch.stack([chw_frame(np.asarray(im)) for im in images])  # flipped as the env flips
            stages = ("jpeg", "resize")
            frames.append(openvla_stages(chw, stages, options["image_size"], options["jpeg_quality"],
                                         crop and options["center_crop"]))
            actions = torch.as_tensor(openvla_actions(demo["actions"][()]), dtype=torch.float32)
            steps = torch.arange(len(actions))[:, None] + torch.arange(chunk_size)[None]
            targets.append(actions[steps.clamp(max=len(actions) - 1)])
    return torch.cat(frames), torch.cat(targets)


def _identity(batch):
    return batch
