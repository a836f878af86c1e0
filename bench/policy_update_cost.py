"""The tiny VLA's PPO-update cost per minibatch: ``evaluate`` + backward of the quickstart's
TinyLlava policy vs variants of it, same process, alternating, medians.

    python bench/policy_update_cost.py [--batch 256 --reps 12 --threads 2] [--variant heads=4 ...]

Each ``--variant KEY=VALUE`` overrides one TinyLlava argument of the quickstart's backbone
(configs/quickstart.yaml); the quickstart itself is the baseline. Prints ms per step and the
ratio to the baseline.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from modules.policy import TinyLlava, TokenVLAPolicy  # noqa: E402


def quickstart_policy(**overrides) -> TokenVLAPolicy:
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "quickstart.yaml")).model.policy.init_args
    # a variant changes the architecture, so no checkpoint loads into it: every policy here is
    # randomly initialised (the weights' values do not change the cost)
    bb = dict(cfg.backbone.init_args, checkpoint=None, **overrides)
    torch.manual_seed(0)
    return TokenVLAPolicy(TinyLlava(**bb), action_tokens=cfg.action_tokens, action_bins=cfg.action_bins)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="the quickstart's minibatch: 2048 frames / 8")
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", action="append", default=["heads=4"], help="KEY=VALUE (int)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    policies = {"quickstart": quickstart_policy()}
    for v in args.variant:
        key, value = v.split("=")
        policies[v] = quickstart_policy(**{key: int(value)})
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 56, 56), dtype=torch.uint8, generator=g)
    tokens = torch.randint(0, 3, (args.batch, 1), generator=g)
    prompts = policies["quickstart"].encode(["go to the red ball"] * args.batch)
    times = {name: [] for name in policies}
    for rep in range(args.reps + 2):  # 2 warm-up reps
        for name, policy in policies.items():
            t = time.perf_counter()
            out = policy.evaluate(images, prompts, tokens)
            (out.log_prob.sum() + out.phi.sum() + out.emb.sum()).backward()
            if rep >= 2:
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["quickstart"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.reps} reps (medians)")
    for name, ts in times.items():
        print(f"{name:12s} {statistics.median(ts) * 1000:7.1f} ms per evaluate + backward   ratio {statistics.median(ts) / base:.2f}")


if __name__ == "__main__":
    main()
