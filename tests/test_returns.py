"""GAE and MC returns with a truncation in the middle of a rollout."""
import torch

from modules.returns import gae, mc_returns


def test_truncation_bootstraps_termination_does_not():
    g, lam = 0.9, 0.8
    # one env, 5 steps: truncation after step 1 (t=1), termination at t=3, rollout ends at t=4
    r = torch.tensor([[1.0, 2.0, 0.0, 5.0, 1.0]])
    v = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1]])
    nv = torch.tensor([[0.4, 7.0, 0.2, 9.0, 3.0]])  # V(s') (7.0: the truncated episode's real last obs)
    done = torch.tensor([[False, True, False, True, False]])
    term = torch.tensor([[False, False, False, True, False]])
    adv, target = gae(r, v, nv, done, term, g, lam)
    # by hand, backwards
    d4 = 1.0 + g * 3.0 - 0.1
    a4 = d4
    d3 = 5.0 - 0.2  # terminated: no bootstrap
    a3 = d3
    d2 = 0.0 + g * 0.2 - 0.3
    a2 = d2 + g * lam * a3
    d1 = 2.0 + g * 7.0 - 0.4  # truncated: bootstrap from V(s') = 7, trajectory cut
    a1 = d1
    d0 = 1.0 + g * 0.4 - 0.5
    a0 = d0 + g * lam * a1
    expected = torch.tensor([[a0, a1, a2, a3, a4]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(target, expected + v, atol=1e-6)

    mc = mc_returns(r, v, nv, done, term, g)
    g1 = 2.0 + g * 7.0
    g0 = 1.0 + g * g1
    g3 = 5.0
    g2 = 0.0 + g * g3
    g4 = 1.0 + g * 3.0
    assert torch.allclose(mc, torch.tensor([[g0, g1, g2, g3, g4]]), atol=1e-5)
