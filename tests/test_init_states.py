"""Fixed initial states and the curriculum's resets on the real BabyAI env: layouts are fixed and
reported, curriculum-driven resets use exactly the sampled ids (checked against the ids the env
reports), outcomes are attributed to (task, id), the queues cross process boundaries, and the
evaluation temperature knob."""
import multiprocessing as mp

import pytest
import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import RandomPolicy

from datamodules.babyai import BabyAIEnv
from datamodules.curriculum_resets import CurriculumResets
from datamodules.init_states import InitStateChooser, InitStateQueues
from datamodules.tasks import make_joint_env, parse_stream

TARGETS = ["red ball", "green key"]


def test_layouts_are_fixed_and_reported():
    env = BabyAIEnv(target="red ball", num_envs=3, seed=5, max_steps=8, num_init_states=10,
                    init_state_ids=[3, 3, 7])
    first = env.reset()
    assert first["init_state_id"].reshape(-1).tolist() == [3, 3, 7]
    image = first["observation", "image"]
    assert torch.equal(image[0], image[1]) and not torch.equal(image[0], image[2])  # layout 3 twice
    other = BabyAIEnv(target="red ball", num_envs=1, seed=99, num_init_states=10, init_state_ids=[7]).reset()
    assert torch.equal(other["observation", "image"][0], image[2])  # layout 7 whatever the env seed
    # a pinned env returns to its layout after every episode; ids are reported on steps too
    td = env.rollout(30, RandomPolicy(env.action_spec), break_when_any_done=False)
    assert (td["next", "init_state_id"].squeeze(-1) == torch.tensor([3, 3, 7])[:, None]).all()
    assert td["next", "done"].any()
    # without a pin or a queue: uniform draws from the set, reproducible from the seed
    a = BabyAIEnv(target="red ball", num_envs=4, seed=1, num_init_states=10).reset()["init_state_id"]
    b = BabyAIEnv(target="red ball", num_envs=4, seed=1, num_init_states=10).reset()["init_state_id"]
    assert torch.equal(a, b) and ((a >= 0) & (a < 10)).all()


def _curriculum(env_tasks, floor=0.001):
    tasks = parse_stream([{"env": "babyai", "level": "GoToObjectRoom", "target": t, "num_init_states": 5,
                           "max_steps": 6} for t in TARGETS])
    resets = CurriculumResets({"window": 4, "target": 0.5, "temperature": 0.05, "floor": floor}, tasks, seed=0)
    return tasks, resets


def _episode_starts(rollout, env):
    """The init-state ids env ``env`` reported at each episode start inside ``rollout`` (the first
    step's id, then the id after every done)."""
    ids = rollout["init_state_id"][env].reshape(-1).tolist()
    done = rollout["next", "done"][env].reshape(-1).tolist()
    return [ids[0]] + [ids[t + 1] for t in range(len(ids) - 1) if done[t]]


def test_curriculum_driven_resets_use_the_sampled_ids():
    tasks, resets = _curriculum(None)
    env_tasks = [i % 2 for i in range(4)]  # joint: env i pursues task i mod 2
    # task 0: only state 2 is at the target success (0.5); the others solved (1) or hopeless (0)
    resets.curriculum.add_keys([(0, s) for s in range(5)])
    for s, outcomes in {0: [1, 1], 1: [0, 0], 2: [1, 0], 3: [1, 1], 4: [0, 0]}.items():
        resets.curriculum.update([(0, s)] * 2, outcomes)
    queues = resets.new_env(env_tasks, resets_per_rollout=17)  # 16 steps per env + the first reset
    drawn = [list(q) for q in resets.last_queues]
    assert all(len(q) == 17 for q in drawn)
    task0 = [s for i in (0, 2) for s in drawn[i]]
    assert task0.count(2) / len(task0) > 0.9  # weights: 1 vs 4 x 0.001
    assert len(set(drawn[1] + drawn[3])) > 2  # task 1 untried: every state at the target, uniform
    env = make_joint_env(tasks, 4, seed=3, init_state_queues=queues)
    torch.manual_seed(0)
    collector = Collector(env, RandomPolicy(env.action_spec), frames_per_batch=64, total_frames=-1)
    it = iter(collector)
    rollout = next(it)
    for i in range(4):
        starts = _episode_starts(rollout, i)
        assert len(starts) >= 3  # max_steps 6 -> several episodes in 16 steps
        assert starts == drawn[i][:len(starts)]  # the env used the sampled ids, in order
        assert queues.remaining(i) == drawn[i][len(starts):]
    stats = resets.update(rollout)
    n_done = int(rollout["next", "done"].sum())
    assert stats["curriculum/episodes"] == n_done and stats["curriculum/keys"] == 10
    # outcomes were recorded under (the env's task, the id the env reported), with its success
    done = rollout["next", "done"].squeeze(-1)
    for task in (0, 1):
        for s in range(5):
            mask = done & (rollout["next", "init_state_id"].squeeze(-1) == s)
            mask[[i for i in range(4) if env_tasks[i] != task]] = False
            expected = rollout["next", "success"].squeeze(-1)[mask].long().tolist()
            prior = {0: [1, 1], 1: [0, 0], 2: [1, 0], 3: [1, 1], 4: [0, 0]}.get(s, []) if task == 0 else []
            assert list(resets.curriculum.history[(task, s)]) == (prior + expected)[-4:]
    # the next rollout: new queues from the updated curriculum; the episodes in flight keep their id
    resets.refill()
    second = [list(q) for q in resets.last_queues]
    rollout2 = next(it)
    collector.shutdown()
    for i in range(4):
        starts = _episode_starts(rollout2, i)
        assert starts[0] == rollout["next", "init_state_id"][i, -1].item()  # continued episode
        assert starts[1:] == second[i][:len(starts) - 1]


def _pop_in_child(queues, out):
    out.put([queues.pop(1), queues.pop(1), queues.scene_seed(1)])


def test_queues_are_shared_with_worker_processes():
    queues = InitStateQueues(2, capacity=4)
    queues.set([[0], [4, 1, 3]], scene_seeds=[7, 900])
    ctx = mp.get_context("spawn")  # how LIBERO workers are started
    out = ctx.Queue()
    proc = ctx.Process(target=_pop_in_child, args=(queues, out))
    proc.start()
    assert out.get(timeout=120) == [4, 1, 900]
    proc.join(30)
    assert queues.remaining(1) == [3] and queues.pop(1) == 3 and queues.pop(1) is None
    queues.push(1, 2)  # the evaluation hands an idle worker its next episode
    assert queues.pop(1) == 2 and queues.pop(1) is None
    chooser = InitStateChooser(5, pinned=12, queues=queues, env_index=0)
    assert chooser.scene_seed() == 7
    assert [chooser.next(), chooser.next()] == [0, 2]  # the queue, then the pin (12 mod 5)
    with pytest.raises(ValueError, match="capacity"):
        queues.set([[0] * 5, []])
    queues.set([[0], [1, 2, 3, 4]])  # no scene seeds: the env's own RNG places the scene
    assert chooser.scene_seed() is None and queues.scene_seed(1) is None
    with pytest.raises(ValueError, match="full"):
        queues.push(1, 0)


def test_evaluation_temperature(tiny_policy):
    from callbacks.evaluation import PerTaskEvaluation
    from modules.rollout_policy import RolloutPolicy

    with pytest.raises(ValueError, match="PerTaskEvaluation.temperature"):
        PerTaskEvaluation(greedy=True, temperature=0.5)
    policy = tiny_policy(temperature=1.5)
    env = BabyAIEnv(target="red ball", num_envs=4, seed=0)
    td = env.reset()
    base = RolloutPolicy(policy)(td.clone())["token_log_probs"]  # at the training temperature 1.5
    cold = RolloutPolicy(policy, temperature=0.5)(td.clone())["token_log_probs"]
    # log_softmax(z / 0.5) from log_softmax(z / 1.5): rescale by 1.5 / 0.5 and renormalise
    assert torch.allclose(cold, torch.log_softmax(base * 3.0, -1), atol=1e-5)
    assert policy.temperature == 1.5  # restored
