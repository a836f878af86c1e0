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


def test_dueling_q_is_v_plus_centred_advantage():
    from modules.critics import DuelingQCritic

    torch.manual_seed(0)
    q = DuelingQCritic(4, [8], action_tokens=2, action_bins=3)
    with torch.no_grad():
        q.advantage.weight.normal_()  # a trained A
    phi, emb = torch.randn(5, 4), torch.randn(5, 4)
    logp = torch.log_softmax(torch.randn(5, 2, 3), -1)
    tokens = torch.randint(3, (5, 2))
    v, a = q.parts(phi, emb)
    by_hand = v + sum(a[:, t].gather(-1, tokens[:, t:t + 1]).squeeze(-1) - (logp[:, t].exp() * a[:, t]).sum(-1)
                      for t in range(2))
    assert torch.allclose(q(phi, emb, tokens, logp), by_hand, atol=1e-6)
    assert torch.equal(q.state_value(phi, emb, logp), v)
    # E_{a~pi} Q(s, a) = V(s): enumerate the 9 joint actions of the factorised pi
    joint = sum(logp[:, 0, i].exp() * logp[:, 1, j].exp() * q(phi, emb, torch.tensor([[i, j]] * 5), logp)
                for i in range(3) for j in range(3))
    assert torch.allclose(joint, v, atol=1e-5)
    # no distribution: A centred on the uniform mean (the classic dueling head)
    uniform = torch.full_like(logp, 1 / 3).log()
    assert torch.allclose(q(phi, emb, tokens), q(phi, emb, tokens, uniform), atol=1e-6)


def test_dueling_advantage_is_zero_at_init_and_learns_from_returns(tiny_policy):
    """critic_type q_dueling: a fresh head gives A = 0 exactly (no noise drives the policy);
    after MC regression steps A is the return's signal, so the paper's advantage is non-zero."""
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], critic_type="q_dueling")
    rollout = _rollout(module, T=16)
    samples, _, stats = module.process_rollout(rollout, [])
    assert samples.get("advantage").abs().max() == 0 and stats["theory/adv_abs_current"] == 0
    flat = rollout.reshape(-1)
    phi, emb, tokens, logp = flat.get("phi"), flat.get("emb"), flat.get("action_tokens"), flat.get("token_log_probs")
    target = samples.get("value_target")
    opt = torch.optim.Adam(module.critic.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        (module.critic(phi, emb, tokens, logp) - target).pow(2).mean().backward()
        opt.step()
    after, _, _ = module.process_rollout(rollout, [])
    assert after.get("advantage").abs().mean() > 1e-3


def test_beta_q_weights_the_anchor_term_of_q_heads(tiny_policy):
    """beta_Q is its own coefficient: with Q heads beta_V is ignored (and vice versa)."""
    q = CRLModule(tiny_policy(), critic_hidden_sizes=[16], critic_type="q_dueling", alpha=0.0, beta_v=1.0, beta_q=0.0)
    v = CRLModule(tiny_policy(), critic_hidden_sizes=[16], alpha=0.0, beta_v=0.5, beta_q=1.0)
    assert (q.beta_anchor, v.beta_anchor) == (0.0, 0.5)
    q.freeze_anchor()
    _, anchors, _ = q.process_rollout(_rollout(q), ["go to the red ball"])
    assert anchors is None  # alpha = beta_Q = 0: no anchor term, so no anchor samples


def test_return_std_scaling_uses_the_running_std_of_the_returns(tiny_policy):
    from modules.returns import RunningStd

    torch.manual_seed(0)
    chunks = [torch.randn(50) * 3 + 1, torch.randn(30) * 0.5, torch.randn(70) + 4]
    rs = RunningStd()
    for c in chunks:
        rs.update(c)
    allx = torch.cat(chunks).double()
    assert torch.allclose(rs.std, allx.std(unbiased=False), atol=1e-9)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], advantage_scaling="return_std")
    samples, _, _ = module.process_rollout(_rollout(module), [])
    adv = torch.tensor([0.5, -1.0, 2.0])
    std = samples.get("value_target").double().std(unbiased=False)
    assert module.return_std.count == samples.numel()
    assert torch.allclose(module._scale_advantage(adv), adv / std.clamp_min(1e-2).float(), atol=1e-6)
    module.hparams.advantage_scaling = "none"
    assert torch.equal(module._scale_advantage(adv), adv)
