"""scripts/greedy_loops.py: a greedy policy that only turns is caught looping, with a real tiny VLA."""
import torch

from datamodules.tasks import make_env, parse_stream
from scripts.greedy_loops import rollout


def test_a_policy_that_only_turns_loops_or_faces_an_object(tiny_policy):
    policy = tiny_policy().eval()
    # a zero final norm makes every hidden state 0: equal action logits, so greedy decoding
    # always takes action 0 (turn left) and never moves; sampling is uniform
    policy.backbone.model.model.language_model.norm.weight.data.zero_()
    task = parse_stream([{"env": "babyai", "level": "GoToObjectRoom", "target": "red ball", "max_steps": 16}])[0]
    n = 16
    greedy = rollout(policy, make_env(task, n, seed=3), task.instruction, greedy=True)
    assert greedy["success"] + greedy["looped"] + greedy["wrong"] + greedy["timeout"] == n
    # turning in place comes back to its start after 4 turns: every episode that does not
    # start next to an object loops; none can time out without a loop
    assert greedy["timeout"] == 0 and greedy["looped"] >= n // 2
    torch.manual_seed(0)
    sampled = rollout(policy, make_env(task, n, seed=3), task.instruction, greedy=False)
    assert sampled["success"] + sampled["looped"] + sampled["wrong"] + sampled["timeout"] == n
    assert sampled["success"] + sampled["wrong"] > greedy["success"] + greedy["wrong"]  # the walk ends episodes
