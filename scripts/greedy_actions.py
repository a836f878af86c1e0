"""Diagnostic: which greedy action a trained BabyAI run picks, per task, over N start states.
A policy that ignores the image shows one action taking all N (CRL-VLA (Q) on the quickstart).

    python scripts/greedy_actions.py RUN_DIR [RUN_DIR ...] [--n 64] [--seed 123]

RUN_DIR holds ``config.yaml`` and ``checkpoints/`` (task<k>_end.ckpt or last.ckpt: the latest);
full fine-tuning or one LoRA adapter (not per-task adapters).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightning.pytorch.cli import instantiate_class  # noqa: E402

from datamodules.babyai import BabyAIEnv  # noqa: E402
from datamodules.tasks import parse_stream  # noqa: E402
from modules.checkpoint_io import safe_load  # noqa: E402
from modules.policy import TokenVLAPolicy  # noqa: E402


def load_policy(run: str) -> TokenVLAPolicy:
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    args = dict(cfg["model"]["policy"]["init_args"])
    policy = TokenVLAPolicy(**{**args, "backbone": instantiate_class((), args["backbone"])})
    ends = sorted(glob.glob(os.path.join(run, "checkpoints", "task*_end.ckpt")))
    path = ends[-1] if ends else os.path.join(run, "checkpoints", "last.ckpt")
    state = safe_load(path, "checkpoint")["state_dict"]
    policy.load_state_dict({k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")})
    return policy.eval(), cfg, path


def run_dir_args(doc: str, argv, seed: int) -> argparse.Namespace:
    """The arguments of the run-directory diagnostics: RUN_DIR..., --n, --seed (one torch thread)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=seed)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    return args


def main(argv=None) -> None:
    args = run_dir_args(__doc__, argv, seed=123)
    for run in args.runs:
        policy, cfg, path = load_policy(run)
        counts = {}
        for task in parse_stream(cfg["data"]["stream"]):
            env = BabyAIEnv(target=task.target, num_envs=args.n, seed=args.seed)
            td = env.reset()
            with torch.no_grad():
                out = policy.act(td.get(("observation", "image")), policy.encode([task.instruction] * args.n),
                                 greedy=True)
            counts[task.instruction] = torch.bincount(out.tokens.reshape(-1), minlength=policy.action_bins).tolist()
        print(f"{run} ({os.path.basename(path)}): greedy action counts over {args.n} start states: {counts}")


if __name__ == "__main__":
    main()
