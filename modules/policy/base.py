"""The policy interface the CRL module, the rollout policy and the callbacks rely on.

Implementations: ``TokenVLAPolicy`` (autoregressive action tokens, OpenVLA / VLA-RL) and
``OFTPolicy`` (a parallel-decoded continuous action chunk, OpenVLA-OFT / CRL-VLA). One base
class (not a ``Union`` type) so the CLI's errors for either stay one line.

* ``encode(instructions)`` -> prompts; ``act(images, prompts, greedy)`` and
  ``evaluate(images, prompts, actions)`` -> an output with ``tokens, log_prob, token_log_probs,
  entropy, phi, emb`` (one backbone forward each);
* ``env_action(actions)`` -> what the env takes; ``snapshot()`` -> the frozen old policy;
* ``feature_dim`` (width of phi(s)), ``goal_dim`` (of emb(g)), ``uses_lora``, ``backbone``;
* ``act_batch_hint()``: the batch size ``act`` is cheapest at (a kept decode cache), or None;
* ``observation(td)``: what ``act`` / ``evaluate`` take as ``images`` from an env TensorDict:
  ``("observation", "image")`` uint8 [B, 3, H, W] by default; a policy with more inputs (OFT:
  the wrist camera and the proprioceptive state) returns a TensorDict of them, which the CRL
  module indexes, concatenates and stores as it does an image tensor.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


class VLAPolicy(nn.Module):
    def act_batch_hint(self) -> int | None:
        """Rows per ``act`` call that reuse what acting already allocated (None: any size)."""
        return None

    def observation(self, td):
        """The policy's input from an env TensorDict (batched like ``td``)."""
        return td.get(("observation", "image"))


def act_in_chunks(act, images: torch.Tensor, prompts, chunk: int, pad: bool, greedy: bool):
    """``act(images, prompts, greedy)`` over the rows in chunks of ``chunk`` rows, outputs
    concatenated. ``pad``: every call gets exactly ``chunk`` rows (the last chunk is filled up by
    repeating its first row and the filler's outputs are dropped), so a static decode cache and
    the CUDA graphs made for that batch are reused and no cache for more rows is allocated."""
    n = images.shape[0]
    outs = []
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(start + chunk, n), device=images.device)
        real = len(idx)
        if pad and real < chunk:
            idx = torch.cat([idx, idx[:1].expand(chunk - real)])
        out = act(images[idx], prompts.index(idx.to(prompts.input_ids.device)), greedy=greedy)
        outs.append(out if real == len(idx) else type(out)(
            **{f.name: getattr(out, f.name)[:real] for f in dataclasses.fields(out)}))
    if len(outs) == 1:
        return outs[0]
    return type(outs[0])(**{f.name: torch.cat([getattr(o, f.name) for o in outs])
                            for f in dataclasses.fields(outs[0])})
