"""Pretrain the quickstart's tiny Llava as a *VLM* (no actions): referring-expression grounding
on BabyAI frames, the role Prismatic's VLM pretraining plays for OpenVLA.

    python scripts/pretrain_tiny_vlm.py --out checkpoints/tiny_llava_babyai.pt

Data: rooms with 3-5 objects drawn from all 18 "<colour> <ball|key|box>" names, the agent at a
random pose (uniform over layouts, not trajectories: no policy, no task). Two objectives on one
forward pass: grounding, "In: Where is the <colour> <type>?\\nOut:" -> which of the 7x7 view
cells holds it, or "not in view" (50 classes, a linear head on the last position's hidden
state), and per-cell labels, every image position -> what its cell holds (20 classes). The heads
are saved beside the weights (to check the checkpoint) and not used by the policy.
The action tokens' rows of the LM head are never trained here, so the checkpoint acts untrained
(its success per quickstart task, and the training that made the committed file:
docs/experiments/quickstart.md, "The starting model"): RL post-training starts from random-level
success, but from a model that can already read the image and the instruction.

The checkpoint holds the backbone's init args and its weights; ``TinyLlava(checkpoint=...)``
loads it and rejects any init arg that differs from the stored one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from minigrid.core.constants import COLOR_NAMES, COLOR_TO_IDX, OBJECT_TO_IDX  # noqa: E402

from datamodules.babyai import GoToObjectRoom, _TileRenderer  # noqa: E402

ALL_OBJECTS = tuple(f"{c} {t}" for c in COLOR_NAMES for t in ("ball", "key", "box"))
VIEW = 7
NOT_IN_VIEW = VIEW * VIEW  # the 50th class


def question(name: str) -> str:
    return f"In: Where is the {name}?\nOut:"


def grounding_data(n: int, seed: int, room_size: int = 6, p_absent: float = 0.1):
    """n (symbolic view, object name, cell) triples from random rooms and poses."""
    rng = np.random.default_rng(seed)
    env = GoToObjectRoom(ALL_OBJECTS[0], room_size=room_size, objects=ALL_OBJECTS[:3])
    views, names, cells = [], [], []
    for i in range(n):
        k = int(rng.integers(3, 6))
        present = [ALL_OBJECTS[j] for j in rng.choice(len(ALL_OBJECTS), k, replace=False)]
        env.objects, env.target = tuple(present), present[0]
        obs, _ = env.reset(seed=int(rng.integers(2 ** 31)))
        absent = [o for o in ALL_OBJECTS if o not in present]
        name = absent[rng.integers(len(absent))] if rng.random() < p_absent else present[rng.integers(k)]
        views.append(obs["image"])
        names.append(name)
        cells.append(view_cell(obs["image"], name))
    return np.stack(views), names, torch.tensor(cells)


def view_cell(view: np.ndarray, name: str) -> int:
    """Index of ``name``'s cell in the frame's patch order (row y, column x), or NOT_IN_VIEW."""
    hit = (cell_classes(view[None])[0] == 2 + ALL_OBJECTS.index(name)).nonzero()
    return int(hit[0, 0]) if len(hit) else NOT_IN_VIEW


def backbone_config(**overrides) -> dict:
    """The quickstart's TinyLlava init args (configs/quickstart.yaml, whose ``words`` are this
    pretraining's vocabulary), without its ``checkpoint``."""
    from omegaconf import OmegaConf

    quickstart = OmegaConf.load(os.path.join(ROOT, "configs", "quickstart.yaml"))
    cfg = OmegaConf.to_container(quickstart.model.policy.init_args.backbone.init_args)
    cfg.pop("checkpoint", None)
    cfg.update(overrides)
    return cfg


CELL_CLASSES = ("empty", "wall") + ALL_OBJECTS  # what a view cell holds (unseen cells: "empty")


def cell_classes(views: np.ndarray) -> torch.Tensor:
    """[B, 7, 7, 3] symbolic views -> [B, 49] class of every cell in patch order (row y, col x)."""
    kind, colour = views[..., 0], views[..., 1]
    out = np.zeros(kind.shape, np.int64)
    out[kind == OBJECT_TO_IDX["wall"]] = 1
    for i, name in enumerate(ALL_OBJECTS):
        c, k = name.split()
        out[(kind == OBJECT_TO_IDX[k]) & (colour == COLOR_TO_IDX[c])] = 2 + i
    return torch.from_numpy(out.transpose(0, 2, 1).reshape(len(views), -1))


class Grounder(nn.Module):
    """The backbone plus two throw-away heads: the last prompt position -> the named object's
    view cell (grounding), and every image position -> what its cell holds (dense labels)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        backbone.prompt = question  # this instance only: its prompt cache is its own
        self.where = nn.Linear(backbone.hidden_size, NOT_IN_VIEW + 1)
        self.what = nn.Linear(backbone.hidden_size, len(CELL_CLASSES))

    def forward(self, images: torch.Tensor, names: list[str]):
        prompts = self.backbone.encode(names)
        hidden, _ = self.backbone(prompts.input_ids, prompts.attention_mask,
                                  self.backbone.preprocess(images))
        patches = hidden[prompts.image_mask].view(len(names), -1, hidden.shape[-1])
        return self.where(hidden[:, -1]), self.what(patches)


def pretrain(backbone, steps: int, pool: int = 60000, batch_size: int = 256, lr: float = 1e-3,
             seed: int = 0, device: str = "cpu", log=print) -> tuple[Grounder, dict]:
    """Train ``backbone`` in place on ``pool`` random frames (plus 2000 held out); returns the
    trained ``Grounder`` (backbone + heads) and the held-out grounding accuracy before and after."""
    torch.manual_seed(seed)
    views, names, cells = grounding_data(pool + 2000, seed)
    classes = cell_classes(views)
    render = _TileRenderer(backbone.image_size // VIEW)
    model = Grounder(backbone).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    test = np.arange(pool, pool + 2000)

    def batch(idx):
        images = torch.from_numpy(render(views[idx])).to(device)
        return model(images, [names[i] for i in idx])

    def accuracy() -> float:
        with torch.no_grad():
            return (batch(test)[0].argmax(-1).cpu() == cells[test]).float().mean().item()

    history = {"accuracy_before": accuracy()}
    start = time.time()
    for step in range(1, steps + 1):
        idx = np.random.default_rng(seed * 100003 + step).integers(pool, size=batch_size)
        where, what = batch(idx)
        loss_where = nn.functional.cross_entropy(where, cells[idx].to(device))
        loss_what = nn.functional.cross_entropy(what.flatten(0, 1), classes[idx].flatten().to(device))
        if step == 1:
            history["what_loss_first"] = loss_what.item()
        opt.zero_grad()
        (loss_where + loss_what).backward()
        opt.step()
        if step % 200 == 0 or step == steps:
            log(f"step {step:5d}  where {loss_where.item():.3f}  what {loss_what.item():.3f}  "
                f"held-out grounding accuracy {accuracy():.3f}  {time.time() - start:.0f}s", flush=True)
    history.update(what_loss_last=loss_what.item(), accuracy_after=accuracy(), steps=steps, pool=pool,
                   batch_size=batch_size, lr=lr, seed=seed,
                   majority=float((cells[test] == NOT_IN_VIEW).float().mean()))
    del backbone.prompt
    backbone._prompt_cache.clear()
    return model.to("cpu"), history


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--pool", type=int, default=60000, help="random frames to draw batches from")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from modules.policy.tiny_llava import TinyLlava

    torch.manual_seed(args.seed)
    cfg = backbone_config()
    backbone = TinyLlava(**cfg)
    grounder, history = pretrain(backbone, args.steps, args.pool, args.batch_size, args.lr, args.seed,
                                 args.device)
    print(history)
    heads = {k: v for k, v in grounder.state_dict().items() if not k.startswith("backbone.")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    torch.save({"init_args": backbone.init_args, "state_dict": backbone.model.state_dict(),
                "pretraining": history, "pretraining_heads": heads}, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
