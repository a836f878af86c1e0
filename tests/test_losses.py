"""Each term of Eq. 8 against values worked by hand."""
import math

import torch

from modules.losses import crl_loss, kl_to_old_policy, ppo_clipped_surrogate, value_regression


def test_clipped_surrogate_by_hand():
    # ratios: e^0.5 = 1.6487 (clipped to 1.2 for A>0), e^-0.5 = 0.6065 (A<0: min(-0.6065*1, -0.8*1))
    logp = torch.tensor([0.5, -0.5, 0.0])
    old = torch.zeros(3)
    adv = torch.tensor([2.0, -1.0, 3.0])
    l_ppo, kl, clipfrac = ppo_clipped_surrogate(logp, old, adv, clip_eps=0.2)
    expected = (min(math.exp(0.5) * 2, 1.2 * 2) + min(math.exp(-0.5) * -1, 0.8 * -1) + 3.0) / 3
    assert abs(l_ppo.item() - expected) < 1e-6
    k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.5) - 1 + 0.5) + 0) / 3
    assert abs(kl.item() - k3) < 1e-6
    assert abs(clipfrac.item() - 2 / 3) < 1e-6


def test_kl_old_policy_by_hand():
    # one sample, two tokens over 2 bins: p_old=(0.5,0.5),(0.9,0.1); p=(0.25,0.75),(0.9,0.1)
    old = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log()
    new = torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(kl_to_old_policy(old, new).item() - expected) < 1e-6
    assert kl_to_old_policy(old, old).item() == 0.0


def test_value_regression_by_hand():
    assert abs(value_regression(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item() - 2.5) < 1e-6


def test_crl_loss_combines_terms_as_eq8():
    logp, old, adv = torch.tensor([0.1, -0.2]), torch.zeros(2), torch.tensor([1.0, -1.0])
    value, target = torch.tensor([0.5, 0.0]), torch.tensor([1.0, 1.0])
    ent = torch.tensor([1.0, 0.6])
    a_new = torch.tensor([[[0.25, 0.75]]]).log()
    a_old = torch.tensor([[[0.5, 0.5]]]).log()
    a_v, a_t = torch.tensor([2.0]), torch.tensor([1.0])
    alpha, beta, eta, c = 0.3, 0.7, 0.5, 0.01
    total, terms = crl_loss(log_prob=logp, old_log_prob=old, advantage=adv, value=value,
                            value_target=target, entropy=ent, anchor_token_log_probs=a_new,
                            anchor_old_token_log_probs=a_old, anchor_value=a_v,
                            anchor_value_target=a_t, clip_eps=0.2, alpha=alpha, beta_v=beta,
                            eta=eta, entropy_coef=c)
    l_ppo = (min(math.exp(0.1), 1.2) * 1 + min(math.exp(-0.2) * -1, 0.8 * -1)) / 2
    l_kl = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    l_gcv, l_mc = 1.0, (0.25 + 1.0) / 2
    expected = -l_ppo + alpha * l_kl + beta * l_gcv + eta * l_mc - c * 0.8
    assert abs(total.item() - expected) < 1e-6
    for key, val in (("ppo", l_ppo), ("kl_old", l_kl), ("gcv", l_gcv), ("mc", l_mc)):
        assert abs(terms[key].item() - val) < 1e-6


def test_anchor_terms_zero_without_anchor_samples():
    total, terms = crl_loss(log_prob=torch.zeros(2), old_log_prob=torch.zeros(2),
                            advantage=torch.ones(2), value=torch.zeros(2), value_target=torch.zeros(2),
                            entropy=torch.zeros(2), clip_eps=0.2, alpha=1.0, beta_v=1.0, eta=1.0)
    assert terms["kl_old"].item() == 0 and terms["gcv"].item() == 0
    assert abs(total.item() + 1.0) < 1e-6
