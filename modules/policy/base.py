"""The policy interface the CRL module, the rollout policy and the callbacks rely on.

Implementations: ``TokenVLAPolicy`` (autoregressive action tokens, OpenVLA / VLA-RL) and
``OFTPolicy`` (a parallel-decoded continuous action chunk, OpenVLA-OFT / CRL-VLA). One base
class (not a ``Union`` type) so the CLI's errors for either stay one line.

* ``encode(instructions)`` -> prompts; ``act(images, prompts, greedy)`` and
  ``evaluate(images, prompts, actions)`` -> an output with ``tokens, log_prob, token_log_probs,
  entropy, phi, emb`` (one backbone forward each);
* ``env_action(actions)`` -> what the env takes; ``snapshot()`` -> the frozen old policy;
* ``feature_dim`` (width of phi(s)), ``goal_dim`` (of emb(g)), ``uses_lora``, ``backbone``.
"""
from torch import nn


class VLAPolicy(nn.Module):
    pass
