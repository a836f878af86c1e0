"""V and Q goal-conditioned critics, and the Q variant's advantage on a real rollout."""
import torch

from modules.critics import GoalConditionedCritic, GoalConditionedQCritic
from modules.crl_module import CRLModule
from helpers.rollouts import babyai_rollout as _rollout


def test_v_critic_ignores_the_action():
    torch.manual_seed(0)
    v = GoalConditionedCritic(4, [8])
    phi, emb = torch.randn(5, 4), torch.randn(5, 4)
    a, b = torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1, dtype=torch.long)
    assert torch.equal(v(phi, emb, a), v(phi, emb, b))
    assert torch.equal(v.state_value(phi, emb, None), v(phi, emb))


def test_q_state_value_is_the_policy_weighted_sum_over_bins():
    torch.manual_seed(0)
    q = GoalConditionedQCritic(4, [8], action_tokens=1, action_bins=3)
    phi, emb = torch.randn(5, 4), torch.randn(5, 4)
    logp = torch.log_softmax(torch.randn(5, 1, 3), -1)
    by_hand = sum(logp[:, 0, a].exp() * q(phi, emb, torch.full((5, 1), a)) for a in range(3))
    assert torch.allclose(q.state_value(phi, emb, logp), by_hand, atol=1e-6)
    # the action matters to Q
    assert (q(phi, emb, torch.zeros(5, 1, dtype=torch.long)) - q(phi, emb, torch.ones(5, 1, dtype=torch.long))).abs().max() > 1e-4


def test_q_state_value_multi_token_samples_the_policy():
    torch.manual_seed(0)
    q = GoalConditionedQCritic(4, [8], action_tokens=3, action_bins=5, baseline_samples=4)
    phi, emb = torch.randn(2, 4), torch.randn(2, 4)
    chosen = torch.tensor([[1, 4, 0], [3, 3, 2]])
    # a deterministic policy: every sample is the chosen action, so E_pi Q = Q(s, chosen)
    logp = torch.full((2, 3, 5), -1e9).scatter(-1, chosen.unsqueeze(-1), 0.0).log_softmax(-1)
    assert torch.allclose(q.state_value(phi, emb, logp), q(phi, emb, chosen), atol=1e-6)


def test_q_variant_advantage_on_a_real_rollout(tiny_policy):
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], critic_type="q")
    rollout = _rollout(module)
    samples, _, stats = module.process_rollout(rollout, [])
    flat = rollout.reshape(-1)
    phi, emb, tokens = flat.get("phi"), flat.get("emb"), flat.get("action_tokens")
    logp = flat.get("token_log_probs")  # [N, 1, 3], the acting distribution
    # the stored distribution is the policy's own: it gives the stored log-prob of the action
    assert torch.allclose(logp.gather(-1, tokens.unsqueeze(-1)).sum((-1, -2)), flat.get("sample_log_prob"), atol=1e-6)
    q_all = torch.stack([module.critic(phi, emb, torch.full_like(tokens, a)) for a in range(3)], -1)
    expected = module.critic(phi, emb, tokens) - (logp[:, 0].exp() * q_all).sum(-1)
    assert torch.allclose(samples.get("advantage"), expected, atol=1e-5)
    assert samples.get("advantage").abs().max() > 0
    assert "rollout/explained_variance" in stats


def test_q_advantage_gae_uses_the_rewards_with_expected_q_as_the_baseline(tiny_policy):
    """``q_advantage: gae``: the V variant's GAE, with V(s) = E_{a~pi} Q(s, a, g)."""
    from datamodules.tasks import instructions_of
    from modules.returns import gae

    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], critic_type="q", q_advantage="gae", gamma=0.9,
                       gae_lambda=0.8)
    rollout = _rollout(module)
    samples, _, _ = module.process_rollout(rollout, [])
    n_env, T = rollout.batch_size
    flat = rollout.reshape(-1)
    value = module.critic.state_value(flat.get("phi"), flat.get("emb"), flat.get("token_log_probs")).view(n_env, T)
    reward = rollout.get(("next", "reward")).squeeze(-1)
    done, term = rollout.get(("next", "done")).squeeze(-1), rollout.get(("next", "terminated")).squeeze(-1)
    nxt = torch.zeros_like(value)
    nxt[:, :-1] = value[:, 1:]
    need = done.clone()
    need[:, -1] = True
    need &= ~term
    if need.any():  # the module evaluates the real next observation there
        n = rollout.get("next")[need]
        out = module.policy.act(n.get(("observation", "image")),
                                module.policy.encode(instructions_of(n)), greedy=True)
        nxt[need] = module.critic.state_value(out.phi, out.emb, out.token_log_probs)
    expected, _ = gae(reward, value, nxt, done, term, 0.9, 0.8)
    assert torch.allclose(samples.get("advantage"), expected.reshape(-1), atol=1e-5)
    module.hparams.q_advantage = "q"  # the paper's advantage, same critic: a different signal
    paper, _, _ = module.process_rollout(rollout, [])
    assert (samples.get("advantage") - paper.get("advantage")).abs().max() > 1e-2


def test_q_advantage_must_be_known(tiny_policy):
    import pytest

    with pytest.raises(ValueError, match="model.q_advantage='td'"):
        CRLModule(tiny_policy(), critic_type="q", q_advantage="td")
