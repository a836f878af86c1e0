"""Online EWC: Fisher and penalty against hand-computed values, and the callback in a real run."""
import glob
import os

import pytest
import torch

from conftest import run_train, small_config
from modules.ewc import diagonal_fisher, ewc_penalty


def test_diagonal_fisher_of_a_softmax_policy_by_hand():
    # pi(a | x) = softmax(W x), W = 0 -> uniform; d log pi(a|x) / dW = (e_a - 1/3) x^T
    W = torch.nn.Parameter(torch.zeros(3, 2))
    xs = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    actions = [0, 2]

    def log_prob_of(i):
        return torch.log_softmax(W @ xs[i], -1)[actions[i]]

    fisher = diagonal_fisher(log_prob_of, {"W": W}, 2)["W"]
    # sample 1: (2/3, -1/3, -1/3) x (1, 2); sample 2: (-1/3, -1/3, 2/3) x (0, 1); mean of squares
    expected = torch.tensor([[2 / 9, 17 / 18], [1 / 18, 5 / 18], [1 / 18, 4 / 9]])
    assert torch.allclose(fisher, expected, atol=1e-6)
    assert W.grad is None  # autograd.grad: no .grad side effect on the optimiser's buffers


def test_ewc_penalty_by_hand():
    theta = {"w": torch.tensor([1.0, 3.0], requires_grad=True)}
    fisher, anchor = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.0, 1.0])}
    value = ewc_penalty(theta, fisher, anchor, lam=4.0)  # 4/2 * (1*1^2 + 2*2^2) = 18
    assert value.item() == pytest.approx(18.0)
    value.backward()  # d/dtheta = lam * F * (theta - theta*) = (4, 16)
    assert torch.allclose(theta["w"].grad, torch.tensor([4.0, 16.0]))


@pytest.mark.slow
def test_online_ewc_callback_anchors_the_task_end_weights(tmp_path):
    res = run_train("--config", small_config(tmp_path, "ewc", iterations=2, tasks=2, ablation="ewc"))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt_dir = glob.glob(str(tmp_path / "runs" / "ewc" / "version_*" / "checkpoints"))[0]
    task0 = torch.load(os.path.join(ckpt_dir, "task0_end.ckpt"), weights_only=False)
    final = torch.load(os.path.join(ckpt_dir, "task1_end.ckpt"), weights_only=False)
    state = next(v for k, v in final["callbacks"].items() if "OnlineEWC" in k)
    fisher, anchor = state["fisher"], state["anchor"]
    trainable = {k for k, v in task0["state_dict"].items() if k.startswith("policy.")}
    assert fisher and {f"policy.{k}" for k in fisher} <= trainable
    assert all((f >= 0).all() for f in fisher.values())
    assert sum(f.sum().item() for f in fisher.values()) > 0
    # theta* is the policy at the end of task 0 (not the last task: no anchor after it) ...
    for k, a in anchor.items():
        assert torch.equal(a, task0["state_dict"][f"policy.{k}"].float()), k
    # ... and training on task 1 moved the policy away from it, so the penalty was live
    moved = sum((final["state_dict"][f"policy.{k}"].float() - a).abs().sum().item() for k, a in anchor.items())
    assert moved > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.dirname(ckpt_dir))
    acc.Reload()
    ewc = [e.value for e in acc.Scalars("train/ewc")]
    assert len(ewc) == 2 and all(v > 0 for v in ewc)  # logged from the first task-1 iteration
