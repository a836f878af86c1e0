"""Ad-hoc (session 9): where a plateau policy fails. 512 episodes of the run's first task, the
policy sampled as trained: success split by whether the target is in the 7x7 view at the start;
failures whose target was never in view; for each failure (an episode that ends facing a wrong
object) the last action, whether the agent moved, and whether it was the episode's first action.

    python docs/data/quickstart_threshold/plateau_failures.py RUN_DIR
"""
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(__file__).rsplit("/docs/", 1)[0])
from datamodules.tasks import make_env, parse_stream  # noqa: E402
from scripts.greedy_actions import load_policy  # noqa: E402

ACTIONS = {0: "left", 1: "right", 2: "forward"}


def target_pos(e):
    return next((x, y) for x in range(e.width) for y in range(e.height)
                if (o := e.grid.get(x, y)) is not None and f"{o.color} {o.type}" == e.target)


@torch.no_grad()
def main():
    torch.set_num_threads(2)
    policy, cfg, path = load_policy(sys.argv[1])
    task = parse_stream(cfg["data"]["stream"])[0]
    n = 512
    torch.manual_seed(1)
    env = make_env(task, n, 999)
    td = env.reset()
    visible0 = torch.tensor([bool(e.in_view(*target_pos(e))) for e in env.envs])
    ever_visible = visible0.clone()
    prompts = policy.encode([task.instruction] * n)
    finished, success = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    steps = torch.zeros(n)
    last_action = collections.Counter()
    t = 0
    while not finished.all():
        before = [tuple(e.agent_pos) for e in env.envs]
        action = policy.env_action(policy.act(td.get(("observation", "image")), prompts).tokens)
        td = env.step(td.set("action", action))["next"]
        done, ok = td.get("done").reshape(-1), td.get("success").reshape(-1)
        wrong = done & td.get("terminated").reshape(-1) & ~ok
        for i, e in enumerate(env.envs):
            if finished[i]:
                continue
            if wrong[i]:
                moved = "moved" if tuple(e.agent_pos) != before[i] else "did not move"
                last_action[(ACTIONS[int(action.reshape(-1)[i])], moved, "first action" if t == 0 else "later")] += 1
            elif not done[i]:
                ever_visible[i] |= bool(e.in_view(*target_pos(e)))
        success |= done & ~finished & ok
        steps += (~finished).float()
        finished |= done
        t += 1
    print(path)
    print(f"success {success.float().mean():.3f}; target in view at the start {visible0.float().mean():.2f}")
    print(f"success | in view at the start {success[visible0].float().mean():.3f} (n={int(visible0.sum())}), "
          f"not in view {success[~visible0].float().mean():.3f} (n={int((~visible0).sum())})")
    print(f"failures whose target was never in view: {int((~success & ~ever_visible).sum())} of {int((~success).sum())}")
    print(f"mean steps: successes {steps[success].mean():.1f}, failures {steps[~success].mean():.1f}")
    print("failures by last action:", ", ".join(f"{a} ({m}, {w}) {c}" for (a, m, w), c in last_action.most_common()))


if __name__ == "__main__":
    main()
