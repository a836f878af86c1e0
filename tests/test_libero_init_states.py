"""Real LIBERO workers take their training resets' initial states from the curriculum's queues
(shared memory, popped inside the worker process) and report them as ``init_state_id``; a joint
env runs task i mod K in worker i; an evaluation env stays pinned."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("libero")
pytestmark = pytest.mark.libero

from torchrl.collectors import Collector

from datamodules.init_states import InitStateQueues
from datamodules.libero_setup import task_language
from datamodules.tasks import make_env, make_joint_env, parse_stream

SMALL = {"render_size": 64, "image_size": 32, "jpeg_quality": None, "center_crop": False, "settle_steps": 1,
         "max_steps": 3}
NOOP = torch.tensor([0.0] * 6 + [1.0])


def test_workers_reset_to_the_queued_init_states():
    tasks = parse_stream([{"env": "libero", "suite": "libero_goal", "task_ids": [8, 1], **SMALL}])
    queues = InitStateQueues(2, capacity=4)
    queues.set([[7, 3, 41], [0, 49, 2]])
    env = make_joint_env(tasks, 2, seed=0, init_state_queues=queues)
    collector = Collector(env, lambda td: td.set("action", NOOP.expand(2, 7).clone()), frames_per_batch=2 * 7,
                          total_frames=-1)
    try:
        rollout = next(iter(collector))
    finally:
        collector.shutdown()
        env.close()
    # 3-step episodes: resets at the start, after step 2 and after step 5 pop the queue in order
    ids = rollout["next", "init_state_id"].squeeze(-1).tolist()
    assert ids == [[7, 7, 7, 3, 3, 3, 41], [0, 0, 0, 49, 49, 49, 2]]
    assert rollout["next", "done"].squeeze(-1)[:, [2, 5]].all()
    assert queues.remaining(0) == [] and queues.remaining(1) == []
    texts = [rollout[i, 0]["language_instruction"] for i in range(2)]
    assert texts == [task_language("libero_goal", 8), task_language("libero_goal", 1)]


def test_evaluation_env_stays_pinned():
    task = parse_stream([{"env": "libero", "suite": "libero_goal", "task_id": 8, **SMALL}])[0]
    env = make_env(task, 1, seed=0, init_state_ids=[53])  # wraps around: 53 mod 50
    try:
        td = env.reset()
        assert td["init_state_id"].reshape(-1).tolist() == [3]
        for _ in range(4):  # through the 3-step limit and an auto-reset: still state 3
            td = env.step_and_maybe_reset(td.set("action", NOOP.expand(1, 7).clone()))[1]
        assert td["init_state_id"].reshape(-1).tolist() == [3]
    finally:
        env.close()
