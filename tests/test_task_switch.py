"""TaskSwitch's success threshold: a window of rollout successes, weighted by episodes."""
from types import SimpleNamespace

import pytest
import torch

from callbacks.task_switch import TaskSwitch


class _Module(SimpleNamespace):
    """What TaskSwitch reads of the module: this iteration's rollout stats, and all_gather
    (one process here: the identity, as Lightning's single-device strategy)."""
    device = torch.device("cpu")

    def all_gather(self, t):
        return t


def _iterate(switch, successes, episodes=100.0):
    """Feed per-iteration successes; return the iteration (1-based) at which the task ends."""
    for i, s in enumerate(successes, 1):
        module = _Module(rollout_stats={} if s is None else
                         {"rollout/success": s, "rollout/episodes": episodes})
        switch.iteration_in_task += 1
        if switch._task_done(module):
            return i
    return None


def test_the_reason_names_threshold_or_budget():
    sw = TaskSwitch(iterations_per_task=3, success_threshold=0.9, success_window=2)
    sw.iteration_in_task = 1
    assert sw._task_done(_Module(rollout_stats={"rollout/success": 0.95, "rollout/episodes": 10.0})) is None
    sw.iteration_in_task = 2
    reason = sw._task_done(_Module(rollout_stats={"rollout/success": 0.93, "rollout/episodes": 10.0}))
    assert reason == "rollout success 0.940 over the last 2 iteration(s) >= 0.9"
    sw = TaskSwitch(iterations_per_task=2)
    sw.iteration_in_task = 2
    assert sw._task_done(_Module(rollout_stats={})) == "budget of 2 iterations"


def test_window_mean_must_reach_threshold():
    # window 3 at 0.9: 0.95 alone is not enough (window means 0.77, 0.897, 0.897, 0.897); mean(0.95, 0.85, 0.91) is
    sw = TaskSwitch(iterations_per_task=50, success_threshold=0.9, success_window=3)
    assert _iterate(sw, [0.5, 0.95, 0.85, 0.89, 0.95, 0.85, 0.91, 0.99]) == 7


def test_window_one_is_the_last_iteration_and_min_iterations_hold():
    sw = TaskSwitch(iterations_per_task=50, success_threshold=0.8, min_iterations=3)
    assert _iterate(sw, [0.9, 0.9, 0.7, 0.85]) == 4  # 0.9 at iterations 1-2 is before min_iterations


def test_iterations_without_episodes_do_not_count_and_the_cap_holds():
    sw = TaskSwitch(iterations_per_task=5, success_threshold=0.9, success_window=2)
    assert _iterate(sw, [0.95, None, 0.95, 0.1, 0.1, 1.0]) == 3  # the None iteration is skipped
    sw = TaskSwitch(iterations_per_task=4, success_threshold=0.9, success_window=2)
    assert _iterate(sw, [0.1, 0.2, 0.3, 0.4, 1.0, 1.0]) == 4  # the cap


def test_success_is_pooled_over_ranks_by_episodes():
    class TwoRanks(_Module):
        def all_gather(self, t):  # the other rank: 300 episodes at 1.0
            return torch.stack([t, torch.tensor([300.0, 300.0], dtype=t.dtype)])
    module = TwoRanks(rollout_stats={"rollout/success": 0.6, "rollout/episodes": 100.0})
    assert TaskSwitch._rollout_success(module) == pytest.approx((60 + 300) / 400)


def test_state_round_trip_keeps_the_window():
    sw = TaskSwitch(iterations_per_task=50, success_threshold=0.9, success_window=3)
    _iterate(sw, [0.9, 0.95])
    other = TaskSwitch(iterations_per_task=50, success_threshold=0.9, success_window=3)
    other.load_state_dict(sw.state_dict())
    assert other.recent_success == [0.9, 0.95] and other.iteration_in_task == 2
    assert _iterate(other, [0.86]) == 1  # mean(0.9, 0.95, 0.86) > 0.9


@pytest.mark.parametrize("kwargs, key", [({"success_window": 0}, "success_window"),
                                         ({"success_threshold": 1.5}, "success_threshold"),
                                         ({"min_iterations": -1}, "min_iterations")])
def test_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"TaskSwitch.{key}="):
        TaskSwitch(**kwargs)
