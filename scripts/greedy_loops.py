"""Diagnostic: why greedy decoding of a trained BabyAI policy fails where sampling succeeds.

The tiny VLA is memoryless (one egocentric frame + the instruction) and a GoToObjectRoom room
is static, so the frame is a function of the agent's (position, direction). A greedy policy
that comes back to a (position, direction) it has visited in the episode therefore repeats
the same actions forever: the episode is lost to a deterministic loop. Per task, this prints
the greedy success and splits the failures into "looped" (a state repeated: provably stuck
until the step limit) and "wrong object" (the episode ended facing another object), and, from
the same start states, the success of the policy sampled at its training temperature.

    python scripts/greedy_loops.py RUN_DIR [RUN_DIR ...] [--n 64] [--seed 12345]

RUN_DIR holds ``config.yaml`` and ``checkpoints/`` (the latest task<k>_end.ckpt, else last.ckpt);
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

from datamodules.tasks import make_env, parse_stream  # noqa: E402
from modules.checkpoint_io import safe_load  # noqa: E402
from modules.policy import TokenVLAPolicy  # noqa: E402


def load_policy(run: str) -> TokenVLAPolicy:
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    args = dict(cfg["model"]["policy"]["init_args"])
    policy = TokenVLAPolicy(**{**args, "backbone": instantiate_class((), args["backbone"])})
    ends = sorted(glob.glob(os.path.join(run, "checkpoints", "task*_end.ckpt")))
    path = ends[-1] if ends else os.path.join(run, "checkpoints", "last.ckpt")
    state = safe_load(path, "checkpoint")["state_dict"]  # weights_only=True (docs/reliability.md)
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


@torch.no_grad()
def rollout(policy, env, instruction: str, greedy: bool) -> dict:
    """One episode per env: success, a wrong object faced, or a (position, direction) repeated."""
    n = env.batch_size.numel()
    td = env.reset()
    prompts = policy.encode([instruction] * n)
    seen = [set() for _ in range(n)]
    finished = torch.zeros(n, dtype=torch.bool)
    success = torch.zeros(n, dtype=torch.bool)
    looped = torch.zeros(n, dtype=torch.bool)
    wrong = torch.zeros(n, dtype=torch.bool)
    while not finished.all():
        for i, e in enumerate(env.envs):
            state = (tuple(int(x) for x in e.agent_pos), int(e.agent_dir))
            if not finished[i] and state in seen[i]:
                looped[i] = True
            seen[i].add(state)
        out = policy.act(td.get(("observation", "image")), prompts, greedy=greedy)
        td = env.step(td.set("action", policy.env_action(out.tokens)))["next"]
        done = td.get("done").reshape(-1)
        first, succeeded = done & ~finished, td.get("success").reshape(-1)
        success |= first & succeeded
        wrong |= first & td.get("terminated").reshape(-1) & ~succeeded
        finished |= done
    return {"success": int(success.sum()), "looped": int((looped & ~success & ~wrong).sum()),
            "wrong": int(wrong.sum()), "timeout": int((~looped & ~success & ~wrong).sum())}


def main(argv=None) -> None:
    args = run_dir_args(__doc__, argv, seed=12345)
    for run in args.runs:
        policy, cfg, path = load_policy(run)
        print(f"{run} ({os.path.basename(path)}), {args.n} episodes per task:")
        for task in parse_stream(cfg["data"]["stream"]):
            row = []
            for greedy in (True, False):
                torch.manual_seed(args.seed)
                env = make_env(task, args.n, args.seed)
                row.append(rollout(policy, env, task.instruction, greedy))
            g, s = row
            print(f"  {task.instruction:<22s} greedy {g['success'] / args.n:.2f} "
                  f"(failures: {g['looped']} looped, {g['wrong']} wrong object, {g['timeout']} timed out "
                  f"without a loop)  sampled {s['success'] / args.n:.2f}")


if __name__ == "__main__":
    main()
