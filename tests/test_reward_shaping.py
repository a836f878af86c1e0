"""Reward shaping with a real (tiny, frozen) RPRM on rollouts of the real BabyAI env:
reward = sparse + scale * score, the sparse reward and the score kept under their own keys."""
import torch
from helpers.rprm import make_rprm
from torchrl.collectors import Collector
from torchrl.envs import TransformedEnv
from torchrl.envs.utils import RandomPolicy, check_env_specs

from datamodules.babyai import BabyAIEnv
from datamodules.rprm_shaping import RPRMRewardShaping

SCALE = 0.5


def _rollout(num_envs=8, steps=16, seed=0):
    """One [envs, T] batch from a TorchRL Collector with a random policy (as the datamodule collects)."""
    env = BabyAIEnv(target=["red ball", "green key", "blue box"], num_envs=num_envs, seed=seed, max_steps=12)
    torch.manual_seed(seed)
    collector = Collector(env, RandomPolicy(env.action_spec), frames_per_batch=num_envs * steps,
                          total_frames=-1)
    rollout = next(iter(collector))
    collector.shutdown()
    return rollout


def _expected_scores(rprm, rollout):
    """The RPRM's score of each step's next frame under the step's instruction, env by env."""
    rows = []
    for i in range(rollout.batch_size[0]):
        env_td = rollout[i]
        texts = env_td.get("language_instruction").tolist()
        rows.append(rprm.score(env_td.get(("next", "observation", "image")), texts))
    return torch.stack(rows).unsqueeze(-1)


def test_shaped_reward_on_a_collected_rollout():
    rprm = make_rprm(seed=0)
    rollout = _rollout()
    assert rollout.batch_size == (8, 16)
    original = rollout.get(("next", "reward")).clone()
    assert (original > 0).any() and rollout.get(("next", "success")).any()  # some episodes succeed
    shaped = RPRMRewardShaping(rprm, scale=SCALE, batch_size=20)(rollout)
    score = shaped.get(("next", "rprm_score"))
    assert score.shape == original.shape == (8, 16, 1)
    assert torch.allclose(score, _expected_scores(rprm, rollout), atol=1e-6)
    assert score.std() > 0 and ((score >= 0) & (score <= 1)).all()
    assert torch.equal(shaped.get(("next", "reward_sparse")), original)
    assert torch.allclose(shaped.get(("next", "reward")), original + SCALE * score, atol=1e-7)
    assert not any(p.requires_grad for p in rprm.parameters())  # frozen
    # applying it again starts from the sparse reward: no double shaping
    again = RPRMRewardShaping(rprm, scale=SCALE)(shaped)
    assert torch.allclose(again.get(("next", "reward")), original + SCALE * score, atol=1e-7)


def test_only_nonterminal_offset_and_success_flag():
    rprm = make_rprm(seed=0)
    rollout = _rollout(seed=1)
    original = rollout.get(("next", "reward")).clone()
    success = rollout.get(("next", "success")).float()
    terminated = rollout.get(("next", "terminated"))
    assert terminated.any() and (~terminated).any()
    shaped = RPRMRewardShaping(rprm, scale=SCALE, offset=0.5, only_nonterminal=True,
                               sparse_from_success=True)(rollout)
    score = shaped.get(("next", "rprm_score"))
    reward = shaped.get(("next", "reward"))
    assert torch.equal(shaped.get(("next", "reward_sparse")), success)
    assert torch.equal(reward[terminated], success[terminated])  # no shaping on terminal steps
    expected = success + SCALE * (score - 0.5)
    assert torch.allclose(reward[~terminated], expected[~terminated], atol=1e-7)
    assert not torch.equal(success, original)  # BabyAI's reward is 1 - 0.9 t / T, not the flag


def test_inside_the_env():
    rprm = make_rprm(seed=0)
    env = TransformedEnv(BabyAIEnv(target="red ball", num_envs=4, seed=2, max_steps=12),
                         RPRMRewardShaping(rprm, scale=SCALE))
    check_env_specs(env)
    torch.manual_seed(0)
    td = env.rollout(10, break_when_any_done=False)
    nxt = td.get("next")
    score = nxt.get("rprm_score")
    assert torch.allclose(score, _expected_scores(rprm, td), atol=1e-6)
    assert torch.allclose(nxt.get("reward"), nxt.get("reward_sparse") + SCALE * score, atol=1e-7)
