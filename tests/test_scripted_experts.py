"""Scripted LIBERO-Goal experts: the pose controller's numbers, and each expert succeeding on
real LIBERO (no rendering) from stored initial state 0 under the evaluation protocol (10
settle steps, at most 300 steps, LIBERO's own success predicate). The 50-state success rates
are measured by scripts/scripted_success.py (docs/libero_one_gpu.md)."""
from __future__ import annotations

import numpy as np
import pytest

from modules.experts.scene import down, horizontal, pose_action


def test_pose_action_is_the_osc_delta_for_the_target():
    pos, mat = np.zeros(3), down(0.0)
    a = pose_action(pos, mat, np.array([0.01, 0.0, -0.02]), mat, gripper=1.0)
    np.testing.assert_allclose(a, [0.2, 0.0, -0.4, 0.0, 0.0, 0.0, 1.0], atol=1e-9)  # metres / 0.05, gripper as given
    capped = pose_action(pos, mat, np.array([0.3, 0.4, 0.0]), mat, -1.0, max_speed=0.5)
    np.testing.assert_allclose(capped[:3], [0.3, 0.4, 0.0], atol=1e-9)  # norm capped at 0.5, direction kept
    # a target turned 0.1 rad about the world z axis: axis-angle (0, 0, 0.1) / 0.5 rad
    turned = pose_action(pos, mat, pos, down(0.1), -1.0)
    np.testing.assert_allclose(turned[3:6], [0.0, 0.0, 0.2], atol=1e-5)  # robosuite converts in float32


def test_orientations():
    d = down(0.0)
    np.testing.assert_allclose(d @ [0, 0, 1], [0, 0, -1])  # pointing down
    np.testing.assert_allclose(d @ [1, 0, 0], [0, 1, 0])  # the fingers close along the world y axis
    h = horizontal(np.array([0.0, -1.0, 0.0]))
    np.testing.assert_allclose(h @ [0, 0, 1], [0, -1, 0])  # pointing at -y
    np.testing.assert_allclose(h @ [1, 0, 0], [0, 0, -1])  # the fingers close vertically
    np.testing.assert_allclose(h.T @ h, np.eye(3), atol=1e-12)
    # down(0) pitched by 90 degrees about the world x axis: the smallest turn between the two
    assert np.isclose(np.arccos((np.trace(h @ d.T) - 1) / 2), np.pi / 2)


def test_unknown_task_is_one_clear_error():
    from modules.experts.libero_goal import libero_goal_expert

    with pytest.raises(ValueError, match=r"task_id=10: no scripted LIBERO-Goal expert"):
        libero_goal_expert(10)


def _succeeds(task_id: int):
    pytest.importorskip("libero")
    from modules.experts.collect import Job, run_jobs

    ((_, episode),) = list(run_jobs([Job("libero_goal", task_id, 0)]))
    assert episode.success, f"task {task_id}: failed in phase {episode.phase!r}"
    assert episode.steps < 300


@pytest.mark.libero
@pytest.mark.parametrize("task_id", [8, 1, 4])
def test_expert_succeeds_on_the_stream_tasks(task_id):
    _succeeds(task_id)


@pytest.mark.libero
@pytest.mark.slow
@pytest.mark.parametrize("task_id", [0, 2, 3, 5, 6, 7, 9])
def test_expert_succeeds_on_the_other_tasks(task_id):
    _succeeds(task_id)
