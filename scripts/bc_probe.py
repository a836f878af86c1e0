"""Diagnostic: can a policy read the GoTo target's position from the frame? Behaviour cloning
of a breadth-first-search expert on the BabyAI quickstart tasks, held-out accuracy per step.

    python scripts/bc_probe.py --model tiny_llava --backbone '{"initializer_range": 0.1, "position_init_std": 0.3}'
    python scripts/bc_probe.py --model cnn      # a small CNN baseline on the same data

Labels come from an expert that knows the full grid while the frame is egocentric and
partial, so the achievable accuracy is below 1 (the CNN reaches ~0.77).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datamodules.babyai import GOTO_OBJECTS, GoToObjectRoom, _TileRenderer  # noqa: E402

DIRS = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # minigrid's direction vectors
LEFT, RIGHT, FORWARD = 0, 1, 2


def expert_action(env: GoToObjectRoom) -> int:
    """First action of a shortest path to facing the target without facing a wrong object."""
    goal = next((x, y) for x in range(env.width) for y in range(env.height)
                if (o := env.grid.get(x, y)) is not None and o.type in ("ball", "key", "box")
                and f"{o.color} {o.type}" == env.target)

    def front(p, d):
        return p[0] + DIRS[d][0], p[1] + DIRS[d][1]

    def faces_wrong_object(p, d):
        f = front(p, d)
        o = env.grid.get(*f)
        return o is not None and o.type in ("ball", "key", "box") and f != goal

    start = (tuple(env.agent_pos), env.agent_dir)
    first = {start: None}
    queue = collections.deque([start])
    while queue:
        p, d = queue.popleft()
        if front(p, d) == goal:
            return first[(p, d)] if first[(p, d)] is not None else FORWARD
        f = front(p, d)
        moves = ((LEFT, (p, (d - 1) % 4)), (RIGHT, (p, (d + 1) % 4)),
                 (FORWARD, (f, d) if env.grid.get(*f) is None else (p, d)))
        for a, nxt in moves:
            if nxt in first or faces_wrong_object(*nxt):
                continue
            first[nxt] = a if first[(p, d)] is None else first[(p, d)]
            queue.append(nxt)
    return FORWARD


def collect(n: int, task: int, seed: int, eps: float = 0.3):
    """n frames of an epsilon-noisy expert; labels are the expert's action at each frame."""
    rng = np.random.default_rng(seed)
    env = GoToObjectRoom(GOTO_OBJECTS[task])
    obs, _ = env.reset(seed=seed)
    views, labels = [], []
    while len(views) < n:
        a = expert_action(env)
        views.append(obs["image"].copy())
        labels.append(a)
        obs, _, term, trunc, _ = env.step(a if rng.random() > eps else int(rng.integers(3)))
        if term or trunc:
            obs, _ = env.reset()
    return np.stack(views), np.array(labels)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 8, 8), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(64 + 3, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, images, goals):
        x = self.net(images.float() / 255)
        return self.head(torch.cat([x, nn.functional.one_hot(goals, 3).float()], -1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny_llava", "cnn"), default="tiny_llava")
    p.add_argument("--backbone", default="{}", help="TinyLlava init args as JSON (over the quickstart's)")
    p.add_argument("--frames_per_task", type=int, default=4000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    render = _TileRenderer(8)
    data = [collect(args.frames_per_task, t, args.seed + t) for t in range(3)]
    images = torch.from_numpy(np.concatenate([render(v) for v, _ in data]))
    labels = torch.from_numpy(np.concatenate([a for _, a in data]))
    goals = torch.cat([torch.full((len(a),), t) for t, (_, a) in enumerate(data)])
    n = len(labels)
    print(f"{n} frames; label shares {np.round(np.bincount(labels.numpy(), minlength=3) / n, 3).tolist()}")
    perm = torch.randperm(n)
    test, train = perm[:1500], perm[1500:]
    if args.model == "cnn":
        model = SmallCNN()

        def logits(idx):
            return model(images[idx], goals[idx])
    else:
        from modules.policy import TinyLlava, TokenVLAPolicy
        cfg = dict(hidden_size=32, layers=1, heads=2, vision_hidden_size=32, vision_layers=1)
        cfg.update(json.loads(args.backbone))
        words = [f"go to the {o}" for o in GOTO_OBJECTS]
        model = TokenVLAPolicy(TinyLlava(words=words, action_bins=3, **cfg), action_tokens=1, action_bins=3)
        prompts = model.encode([words[g] for g in goals.tolist()])

        def logits(idx):
            out = model.evaluate(images[idx], prompts.index(idx), labels[idx][:, None])
            return out.token_log_probs[:, 0]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = time.time()
    for step in range(args.steps + 1):
        idx = train[torch.randint(len(train), (args.batch_size,))]
        loss = nn.functional.cross_entropy(logits(idx), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                acc = (logits(test).argmax(-1) == labels[test]).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.3f}  held-out accuracy {acc:.3f}  {time.time() - start:.0f}s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
