"""The CRL-VLA objective (Eq. 8 of the paper), one term per function (docs/method.md).

    L = -L_PPO + alpha * L_KL + beta_V * L_GCV + eta * L_MC  (- c_ent * H, optional)

Every term is a mean over its own samples: L_PPO and L_MC over current-task samples, L_KL
and L_GCV over anchor samples (old goals). With no anchor samples (first task, or no
anchor callback) the two anchor terms are zero.
"""
from __future__ import annotations

import torch


def ppo_clipped_surrogate(log_prob, old_log_prob, advantage, clip_eps: float):
    """L_PPO = E[min(r A, clip(r, 1-eps, 1+eps) A)], r = pi(a|s,g) / pi_old(a|s,g).
    Returns (L_PPO, approx_kl, clip_fraction); approx_kl = E[(r - 1) - log r] (Schulman's k3)."""
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_fraction = ((ratio - 1).abs() > clip_eps).float().mean()
    return surrogate.mean(), approx_kl, clip_fraction


def kl_to_old_policy(old_token_log_probs, token_log_probs):
    """L_KL = E_{(s,g) old}[KL(pi_old(.|s,g) || pi(.|s,g))].

    Token VLAs: the sequence KL equals E_{a~pi_old}[sum_t KL_t] with both models
    teacher-forced on the old policy's sampled prefix, so the exact per-token KLs over the
    action vocabulary are summed over tokens. Inputs: [B, n_tokens, bins] log-probs."""
    kl = (old_token_log_probs.exp() * (old_token_log_probs - token_log_probs)).sum(-1)
    return kl.sum(-1).mean()


def value_regression(prediction, target):
    """Squared error. L_MC: trainable critic vs Monte-Carlo returns G_t (current task).
    L_GCV: frozen anchor head on the current backbone vs V_old(s, g_old) (old goals);
    the anchor head is frozen, so L_GCV's gradient reaches phi only."""
    return (prediction - target).pow(2).mean()


def crl_loss(*, log_prob, old_log_prob, advantage, value, value_target, entropy,
             anchor_token_log_probs=None, anchor_old_token_log_probs=None,
             anchor_value=None, anchor_value_target=None, kl_fn=None,
             clip_eps: float, alpha: float, beta_v: float, eta: float, entropy_coef: float = 0.0,
             current_weight: float = 1.0, anchor_weight: float = 1.0):
    """Eq. 8. Returns the total loss and every term (for logging). ``kl_fn(old, new)``: the
    policy's own L_KL over its distribution parameters (continuous policies); default: the
    per-token categorical KL. ``current_weight`` / ``anchor_weight`` scale the terms over current /
    anchor samples: a minibatch cut into slices gives each slice its share of each kind of sample,
    so the slices' totals (and gradients) add up to the whole minibatch's."""
    l_ppo, approx_kl, clip_fraction = ppo_clipped_surrogate(log_prob, old_log_prob, advantage, clip_eps)
    l_mc = value_regression(value, value_target)
    zero = l_mc.new_zeros(())
    l_kl = ((kl_fn or kl_to_old_policy)(anchor_old_token_log_probs, anchor_token_log_probs)
            if anchor_token_log_probs is not None else zero)
    l_gcv = (value_regression(anchor_value, anchor_value_target)
             if anchor_value is not None else zero)
    ent = entropy.mean()
    cw, aw = current_weight, anchor_weight
    total = -cw * l_ppo + aw * alpha * l_kl + aw * beta_v * l_gcv + cw * eta * l_mc - cw * entropy_coef * ent
    return total, {"loss": total.detach(), "ppo": l_ppo.detach(), "kl_old": l_kl.detach(),
                   "gcv": l_gcv.detach(), "mc": l_mc.detach(), "entropy": ent.detach(),
                   "approx_kl": approx_kl, "clip_fraction": clip_fraction}
