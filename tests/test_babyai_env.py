"""The BabyAI GoTo room: schema, success on the named object, failure on a wrong one."""
import torch
from minigrid.core.world_object import Ball, Key
from torchrl.envs.utils import check_env_specs

from datamodules.babyai import BabyAIEnv, GoToObjectRoom


def test_specs_and_schema():
    env = BabyAIEnv(target="green key", num_envs=3, seed=0)
    check_env_specs(env)
    td = env.reset()
    assert td.get(("observation", "image")).shape == (3, 3, 56, 56)
    assert td.get(("observation", "image")).dtype == torch.uint8
    assert td.get("language_instruction").tolist() == ["go to the green key"] * 3


def _facing(env: GoToObjectRoom, obj):
    """Agent at (2, 3) facing east, obj at (4, 3): one step forward puts obj in front."""
    env.reset(seed=0)
    env.agent_dir = 0
    env.agent_pos = (2, 3)
    for cell in [(3, 3), (4, 3)]:
        env.grid.set(*cell, None)
    env.grid.set(4, 3, obj)
    return env.step(2)  # forward


def test_success_on_target_and_failure_on_wrong_object():
    env = GoToObjectRoom(target="red ball")
    _, r, term, trunc, info = _facing(env, Ball("red"))
    assert term and info["success"] and abs(r - (1 - 0.9 * 1 / 64)) < 1e-6
    _, r, term, trunc, info = _facing(env, Key("green"))
    assert term and not info["success"] and r == 0.0


def test_truncation_at_max_steps():
    env = BabyAIEnv(target="red ball", num_envs=2, seed=3, max_steps=5)
    td = env.reset()
    for t in range(5):
        td["action"] = torch.tensor([0, 1])  # turn in place: ends only by facing an object or time
        td = env.step(td)
        nxt = td["next"]
        if t < 4:
            assert not (nxt["truncated"].any())
        td = nxt
    # after 5 steps: each env either terminated (faced an object while turning) or truncated
    assert (nxt["terminated"] | nxt["truncated"]).all()
    assert not (nxt["terminated"] & nxt["truncated"]).any()


def test_random_policy_is_near_one_third():
    env = BabyAIEnv(target="blue box", num_envs=64, seed=1)
    td = env.reset()
    finished = torch.zeros(64, dtype=torch.bool)
    success = torch.zeros(64, dtype=torch.bool)
    for _ in range(64):
        td["action"] = torch.randint(0, 3, (64,))
        td = env.step(td)
        done = td["next", "done"].squeeze(-1)
        success |= done & ~finished & td["next", "success"].squeeze(-1)
        finished |= done
        td = td["next"]
    rate = success.float().mean().item()
    assert 0.1 < rate < 0.55, rate


def test_joint_env_runs_every_task_of_the_stream_side_by_side():
    """data.joint (the MTL oracle): env i pursues task i mod K, in one batch."""
    import pytest

    from datamodules.tasks import instructions_of, make_joint_env, parse_stream

    stream = parse_stream([{"env": "babyai", "level": "GoToObjectRoom", "target": t}
                           for t in ("red ball", "green key", "blue box")])
    env = make_joint_env(stream, num_envs=6, seed=0)
    td = env.reset()
    assert instructions_of(td) == [f"go to the {t}" for t in ("red ball", "green key", "blue box")] * 2
    assert [e.target for e in env.envs] == ["red ball", "green key", "blue box"] * 2
    with pytest.raises(ValueError, match="data.num_envs=2"):
        make_joint_env(stream, num_envs=2, seed=0)
    mixed = stream[:2] + parse_stream([{"env": "babyai", "level": "GoToObjectRoom", "target": "blue box",
                                        "room_size": 5}])
    with pytest.raises(ValueError, match="data.joint"):
        make_joint_env(mixed, num_envs=6, seed=0)


def test_a_five_object_room_for_longer_streams():
    import pytest

    from datamodules.tasks import parse_stream

    five = ["red ball", "green key", "blue box", "yellow ball", "purple key"]
    env = GoToObjectRoom(target="yellow ball", objects=five)
    env.reset(seed=4)
    placed = sorted(f"{o.color} {o.type}" for o in env.grid.grid if o is not None and o.type != "wall")
    assert placed == sorted(five)
    _, r, term, _, info = _facing(env, Ball("yellow"))
    assert term and info["success"] and r > 0.9
    _, r, term, _, info = _facing(env, Key("purple"))
    assert term and not info["success"] and r == 0.0
    batched = BabyAIEnv(target="purple key", num_envs=2, seed=0, objects=five)
    assert batched.reset().get("language_instruction").tolist() == ["go to the purple key"] * 2
    for entry, key in [({"target": "yellow ball"}, "target"),                 # not in the default three
                       ({"target": "red ball", "objects": ["red ball", "red ball"]}, "objects"),
                       ({"target": "red ball", "objects": ["pink ball"]}, "objects"),
                       ({"target": "red ball", "room_size": 3,  # 9 objects and the agent in 9 cells
                         "objects": [f"{c} {k}" for c in ("red", "green", "blue") for k in ("ball", "key", "box")]},
                        "room_size")]:
        with pytest.raises(ValueError, match=rf"data.stream\[0\]\.{key}="):
            parse_stream([{"env": "babyai", "level": "GoToObjectRoom", **entry}])
    (task,) = parse_stream([{"env": "babyai", "level": "GoToObjectRoom", "target": "purple key", "objects": five}])
    assert task.instruction == "go to the purple key" and task.params["objects"] == five


def test_fast_view_is_minigrids_view():
    """GoToObjectRoom.gen_obs (a slice of the room's cached encoding) returns minigrid's own
    observation (MiniGridEnv.gen_obs: per-cell slice, rotate, encode) in every state reached by
    random actions, including pick-up / drop / toggle (which change the room), every direction,
    cells next to the walls, and rooms of several sizes."""
    import numpy as np
    from minigrid.minigrid_env import MiniGridEnv

    rng = np.random.default_rng(0)
    checked = carried = 0
    for room_size, objects in [(3, ("red ball", "green key")), (6, ("red ball", "green key", "blue box")),
                               (9, ("red ball", "green key", "blue box", "purple key", "yellow ball"))]:
        env = GoToObjectRoom(target=objects[0], room_size=room_size, objects=objects, max_steps=1000)
        for episode in range(15):
            obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
            for _ in range(40):
                ref = MiniGridEnv.gen_obs(env)
                assert np.array_equal(obs["image"], ref["image"]) and obs["image"].dtype == ref["image"].dtype
                assert obs["direction"] == ref["direction"] and obs["mission"] == ref["mission"]
                checked += 1
                carried += env.carrying is not None
                # all 7 minigrid actions, mostly navigation; pick up what the agent faces at
                # the start (facing an object later ends the episode)
                front = env.grid.get(*env.front_pos)
                if front is not None and front.can_pickup() and env.carrying is None:
                    action = env.actions.pickup
                else:
                    action = int(rng.integers(3)) if rng.random() < 0.7 else int(rng.integers(3, 7))
                obs, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    break
    assert checked > 500 and carried > 0  # the carried object shows in the agent's cell too
