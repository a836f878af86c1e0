"""OpenVLA-OFT as a stochastic policy for PPO: OFT's parallel-decoding forward, its
L1-regression head as the mean of a Laplace distribution over the action chunk.

OFT's forward (Kim et al., arXiv 2502.19645; ``predict_action`` in OFT's modeling_prismatic.py),
reproduced exactly (tests/test_oft_checkpoint.py checks it against OFT's own code):
* the sequence: [BOS, camera patches (third-person, then wrist), the proprio token,
  prompt, 29871, K x D action placeholders, </s>]. The placeholders' input embeddings are
  zeros (OFT's "empty action embeddings"; ``learned_slots`` makes them trainable); the proprio
  token is the projector's output on the q01/q99-normalised state, clipped to [-1, 1];
* **bidirectional attention over the whole sequence** (OFT patches Llama's SDPA attention:
  every position attends to every non-padding position, not only the chunk's), one forward per
  chunk;
* the head reads the last hidden states at the K x D positions *before* each placeholder (the
  last prompt token and the first K x D - 1 placeholders, as OFT's ``predict_action`` slices
  them), groups them per chunk step ([B, K, D x H]) and maps each step to its D actions with
  OFT's MLPResNet: the chunk's mean mu [B, K, D] in the normalised action space.

The RL part:
* pi(.|s, g) = prod over the K x D entries of Laplace(mu, b): the L1 loss OFT is trained with
  is the negative log-likelihood of a Laplace with fixed scale, so the head's output is the
  location; the scale b is learned and state-independent (one per chunk step and dimension,
  ``init_scale`` at the start), as PPO's Gaussian policies learn their log-std. Greedy = mu.
* **One PPO action = the whole chunk** (executed step by step by datamodules/chunking.py): log
  pi(a|s,g) and the entropy are sums over K x D, gamma and GAE run over chunks.
* Bounds: the Laplace sample is unbounded; the env gets it clipped to [action_low, action_high]
  and de-normalised with the checkpoint's statistics (q01/q99, OFT's formula). The log-prob is
  that of the unclipped sample (the clip is part of the environment); the closed-form KL is
  between the unclipped distributions.
* phi(s) (mean over the image positions) and emb(g) (mean over the instruction's tokens) come
  from the same forward, so the critics cost no second pass. V(s, g) and, for CRL-VLA (Q),
  Q(s, chunk, g) (modules/chunk_critic.py) read them.

The output (``ChunkOutput``) keeps TokenVLAPolicy's ``PolicyOutput`` field names so the CRL
module handles both policies alike: ``tokens`` is the sampled chunk [B, K, D] (float,
unclipped), ``token_log_probs`` the distribution's parameters [B, K, D, 2] = (mu, log b);
``kl_to_old_policy`` replaces the categorical KL.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch import nn

from modules.critics import frozen_copy
from modules.policy.action_codec import load_norm_stats
from modules.policy.backbone import EncodedPrompts, VLMBackbone, positions_from_mask
from modules.policy.base import VLAPolicy
from modules.policy.laplace import (
    LaplaceChunkHead,
    laplace_entropy,
    laplace_kl,
    laplace_log_prob,
    laplace_sample,
)
from modules.policy.lora import (OLD_ADAPTER, TRAIN_ADAPTER, LoRA, active_adapter, apply_lora, ensure_adapters,
                                 lora_kwargs, snapshot_adapter)
from modules.policy.openvla.oft_checkpoint import action_head_state, head_shape, proprio_projector_state

KEY = "model.policy.init_args"
VIEW_KEYS = {"image": ("observation", "image"), "wrist_image": ("observation", "wrist_image"),
             "state": ("observation", "state")}


@dataclass
class ChunkOutput:
    """TokenVLAPolicy's ``PolicyOutput`` fields, for a continuous chunk."""

    tokens: torch.Tensor  # [B, K, D] the chunk (sampled, unclipped; greedy: mu)
    log_prob: torch.Tensor  # [B] sum over K x D
    token_log_probs: torch.Tensor  # [B, K, D, 2] the distribution: (mu, log b)
    entropy: torch.Tensor  # [B] sum over K x D
    phi: torch.Tensor  # [B, H] state features
    emb: torch.Tensor  # [B, H] goal (instruction) features

    @property
    def actions(self) -> torch.Tensor:
        return self.tokens


class ProprioProjector(nn.Module):
    """OFT's proprio projector: Linear(proprio_dim, H) -> GELU -> Linear(H, H), one token."""

    def __init__(self, proprio_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


def bidirectional_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """A left-padding mask [B, T] -> boolean [B, 1, T, T]: every query attends to every real key
    (OFT's bidirectional attention); a padding query attends to itself only (never read; it
    keeps the softmax finite)."""
    t = attention_mask.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=attention_mask.device)
    return attention_mask.bool()[:, None, None, :] | eye


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class OFTPolicy(VLAPolicy):
    token_actions = False  # continuous chunks (the CRL module builds a chunk Q critic for them)

    def __init__(self, backbone: VLMBackbone, chunk_size: int = 8, action_dim: int = 7,
                 head_hidden: int | None = None, head_blocks: int | None = None, init_scale: float = 0.1,
                 learned_slots: bool = False, action_low: float | list[float] | None = -1.0,
                 action_high: float | list[float] | None = 1.0, temperature: float = 1.0, lora: LoRA | None = None,
                 norm_stats: str | None = None, unnorm_key: str | None = None, proprio_dim: int = 8,
                 gradient_checkpointing: bool = False):
        """
        Args:
            backbone: the vision-language model: ``OFTOpenVLABackbone`` (an OpenVLA-OFT checkpoint
                or a random one), or any kit backbone (one image, no proprio).
            chunk_size: K, actions per decision (OFT on LIBERO: 8; a checkpoint's head does not
                record it: it must be the K the checkpoint was trained with).
            action_dim: D, dimensions per action (LIBERO: 7; checked against the checkpoint's head).
            head_hidden: width of the action head's MLP blocks (null: the checkpoint's, else 256).
            head_blocks: residual blocks of the action head (null: the checkpoint's, else 2).
            init_scale: the Laplace scale b at the start.
            learned_slots: learn the action placeholders' input embeddings (OFT: fixed zeros).
            action_low: lower clip bound(s) of the env's action, normalised space (null: no clip).
            action_high: upper clip bound(s) (null: no clip).
            temperature: multiplies b when acting and training (as a token VLA's logits / T).
            lora: PEFT LoRA on the backbone, ``{r, alpha, dropout, target_modules, compute_dtype}``
                (the head and the proprio projector train fully); null: full fine-tuning.
            norm_stats: statistics for the actions (and proprio) (a checkpoint directory or JSON
                file; null: the OFT checkpoint's own dataset_statistics.json, if any).
            unnorm_key: the dataset entry of ``norm_stats`` (null: its only entry).
            proprio_dim: width of the proprioceptive state when the projector is new (random);
                a checkpoint's projector sets it.
            gradient_checkpointing: recompute every transformer layer's activations in the backward pass.
        """
        super().__init__()
        sizes = (("chunk_size", chunk_size), ("action_dim", action_dim), ("proprio_dim", proprio_dim))
        for name, value in sizes + (("head_hidden", head_hidden), ("head_blocks", head_blocks)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{KEY}.{name}={value!r}: must be an integer >= 1")
        for name, value in (("init_scale", init_scale), ("temperature", temperature)):
            if not value > 0:
                raise ValueError(f"{KEY}.{name}={value!r}: must be > 0")
        self.temperature = temperature
        self.backbone = backbone
        self.num_images = getattr(backbone, "num_images", 1)
        self.chunk_size, self.action_dim = chunk_size, action_dim
        hidden = backbone.hidden_size
        head_state = None
        head_file = getattr(backbone, "action_head_file", None)
        if head_file is not None:  # OFT's trained head: its shapes rule
            head_state = action_head_state(head_file)
            shape = head_shape(head_state)
            if shape["action_dim"] != action_dim:
                raise ValueError(f"{KEY}.action_dim={action_dim}: {head_file} is a {shape['action_dim']}-D action head")
            if shape["in_dim"] != action_dim * hidden:
                raise ValueError(f"{head_file}: input width {shape['in_dim']} != action_dim {action_dim} x the VLA's "
                                 f"width {hidden}: the head does not belong to this checkpoint")
            for name, given, found in (("head_hidden", head_hidden, shape["hidden"]),
                                       ("head_blocks", head_blocks, shape["blocks"])):
                if given is not None and given != found:
                    raise ValueError(f"{KEY}.{name}={given}: {head_file} has {found} (leave it null)")
            head_hidden, head_blocks = shape["hidden"], shape["blocks"]
        self.head = LaplaceChunkHead(hidden, chunk_size, action_dim, head_hidden or 256,
                                     2 if head_blocks is None else head_blocks, init_scale, learned_slots)
        if head_state is not None:
            self.head.mlp.load_state_dict(head_state)
        self.proprio = self._proprio_projector(backbone, hidden, proprio_dim)
        self.old_head: nn.Module | None = None  # LoRA: the old policy's frozen head and projector (snapshot)
        self.old_proprio: nn.Module | None = None
        self.uses_lora = lora is not None
        if self.uses_lora:
            backbone.model = apply_lora(backbone.model, **lora_kwargs(lora))
        self.adapter_routes: dict[str, str] = {}  # PerTaskAdapters: not supported (the head is shared)
        # the LM head is never read (no token logits); frozen so that DDP sees no unused
        # trainable parameter (unless tied to the input embeddings, which are read)
        lm_head = backbone.model.get_output_embeddings()
        if lm_head.weight is not backbone.model.get_input_embeddings().weight:
            lm_head.requires_grad_(False)
        self._set_bounds(action_low, action_high)
        if norm_stats is None:
            norm_stats = getattr(backbone, "checkpoint_dir", None)
        self._set_norm_stats(norm_stats, unnorm_key)
        pad = backbone.tokenizer.pad_token_id
        self.placeholder_id = pad if pad is not None else (backbone.tokenizer.eos_token_id or 0)
        self.stop_id = backbone.tokenizer.eos_token_id  # OFT's </s> after the placeholders
        if self.placeholder_id == getattr(backbone, "image_token_id", None) or self.stop_id is None:
            raise ValueError("OFTPolicy: the backbone's tokenizer needs a pad (or eos) token that is not the "
                             "image token, and an eos token")
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            from modules.policy.token_vla import set_gradient_checkpointing

            if not set_gradient_checkpointing(backbone.model, True):
                raise ValueError(f"{KEY}.gradient_checkpointing=true: {type(backbone).__name__}'s model has no "
                                 "transformers layers to checkpoint")

    @staticmethod
    def _proprio_projector(backbone, hidden: int, proprio_dim: int) -> ProprioProjector | None:
        if not getattr(backbone, "uses_proprio", False):
            return None
        file = getattr(backbone, "proprio_projector_file", None)
        if file is None:
            return ProprioProjector(proprio_dim, hidden)
        state = proprio_projector_state(file)
        width, dim = state["fc1.weight"].shape
        if width != hidden:
            raise ValueError(f"{file}: projects to width {width}, the VLA's width is {hidden}: "
                             "the projector does not belong to this checkpoint")
        projector = ProprioProjector(dim, hidden)
        projector.load_state_dict(state)
        return projector

    def _set_bounds(self, low, high) -> None:
        if (low is None) != (high is None):
            raise ValueError(f"{KEY}.action_low={low!r} / action_high={high!r}: both or neither (no clip)")
        low, high = (torch.as_tensor(default if v is None else v, dtype=torch.float32).expand(self.action_dim).clone()
                     for v, default in ((low, -math.inf), (high, math.inf)))
        if not (low < high).all():
            raise ValueError(f"{KEY}.action_low={low.tolist()} / action_high={high.tolist()}: need low < high "
                             "in every dimension")
        self.register_buffer("action_low", low, persistent=False)
        self.register_buffer("action_high", high, persistent=False)

    def _set_norm_stats(self, norm_stats, unnorm_key) -> None:
        self.norm = self.proprio_norm = None
        if norm_stats is None:
            return
        stats = load_norm_stats(norm_stats)
        if unnorm_key is None and len(stats) == 1:
            unnorm_key = next(iter(stats))
        if unnorm_key not in stats:
            raise ValueError(f"{KEY}.unnorm_key={unnorm_key!r}: not in {norm_stats!r} (available: {sorted(stats)})")
        self.norm = _bounds_q99(stats[unnorm_key]["action"], self.action_dim, f"{norm_stats} {unnorm_key}.action")
        if self.proprio is not None:
            if "proprio" not in stats[unnorm_key]:
                raise ValueError(f"{KEY}.norm_stats={norm_stats!r}: {unnorm_key} has no proprio statistics "
                                 "(the proprio input is normalised with them)")
            self.proprio_norm = _bounds_q99(stats[unnorm_key]["proprio"], self.proprio.fc1.in_features,
                                            f"{norm_stats} {unnorm_key}.proprio")

    @property
    def feature_dim(self) -> int:
        return self.backbone.hidden_size

    @property
    def goal_dim(self) -> int:
        return self.backbone.hidden_size

    def encode(self, instructions: list[str]) -> EncodedPrompts:
        return self.backbone.encode(instructions).to(self.action_low.device)

    # -- the policy's inputs ---------------------------------------------------------------------
    def observation(self, td):
        """The third-person image [B, 3, H, W]; with a wrist camera or proprio, a TensorDict of
        ``image``, ``wrist_image`` (num_images 2) and ``state`` (proprio)."""
        wanted = ["image"] + (["wrist_image"] if self.num_images == 2 else []) + (
            ["state"] if self.proprio is not None else [])
        if wanted == ["image"]:
            return td.get(VIEW_KEYS["image"])
        missing = [VIEW_KEYS[k] for k in wanted if VIEW_KEYS[k] not in td.keys(True)]
        if missing:
            raise KeyError(f"OFTPolicy (num_images={self.num_images}, proprio={self.proprio is not None}) needs "
                           f"{missing} in the env's observation (LIBERO: wrist_camera: true, proprio: axis_angle)")
        return TensorDict({k: td.get(VIEW_KEYS[k]) for k in wanted}, batch_size=td.batch_size)

    def _pixel_values(self, obs) -> torch.Tensor:
        if isinstance(obs, torch.Tensor):
            return self.backbone.preprocess(obs)
        views = [obs.get("image")] + ([obs.get("wrist_image")] if self.num_images == 2 else [])
        return self.backbone.pixel_values(views) if len(views) > 1 else self.backbone.preprocess(views[0])

    def _proprio_input(self, obs) -> torch.Tensor:
        """OFT's ``normalize_proprio``: 2 (s - q01) / (q99 - q01 + 1e-8) - 1 on the masked
        dimensions, clipped to [-1, 1], in float64 (unnormalised without statistics)."""
        state = obs.get("state").double()
        if self.proprio_norm is not None:
            q01, q99, mask = (t.to(state.device) for t in self.proprio_norm)
            state = torch.where(mask, 2 * (state - q01) / (q99 - q01 + 1e-8) - 1, state).clamp(-1.0, 1.0)
        return state.to(self.proprio.fc1.weight.dtype)

    # -- the forward --------------------------------------------------------------------------
    @contextmanager
    def _input_embeddings(self, length: int, slots: torch.Tensor, proprio: torch.Tensor | None):
        """While active, the input embeddings of positions [length, length + K*D) are ``slots``
        and the proprio placeholder's is ``proprio`` [B, H]."""
        n = slots.shape[0]
        total = length + n + 1

        def hook(module, args, out):
            if out.ndim != 3 or out.shape[1] != total:
                return out
            out = torch.cat([out[:, :length], slots.to(out.dtype).expand(out.shape[0], -1, -1),
                             out[:, length + n:]], 1)
            if proprio is not None:
                where = (args[0] == self.backbone.proprio_token_id).unsqueeze(-1)
                out = torch.where(where, proprio.to(out.dtype).unsqueeze(1), out)
            return out

        handle = self.backbone.model.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _forward(self, obs, prompts: EncodedPrompts, head: LaplaceChunkHead, proprio: nn.Module | None):
        """One backbone pass -> (mu, log_b [B, K, D], phi, emb)."""
        n = self.chunk_size * self.action_dim
        ids, keys = prompts.input_ids, prompts.attention_mask
        b, length = ids.shape
        ids = torch.cat([ids, ids.new_full((b, n), self.placeholder_id), ids.new_full((b, 1), self.stop_id)], 1)
        keys = torch.cat([keys, keys.new_ones(b, n + 1)], 1)
        token = None if proprio is None else proprio(self._proprio_input(obs))
        with self._input_embeddings(length, head.slots, token):
            hidden, _ = self.backbone(ids, bidirectional_mask(keys), self._pixel_values(obs), positions_from_mask(keys))
        phi = _masked_mean(hidden[:, :length], prompts.image_mask).float()
        emb = _masked_mean(hidden[:, :length], prompts.goal_mask).float()
        mu, log_b = head(hidden[:, length - 1:length - 1 + n])  # OFT: the positions before the placeholders
        if self.temperature != 1.0:
            log_b = log_b + math.log(self.temperature)
        return mu, log_b, phi, emb

    @staticmethod
    def _output(actions, mu, log_b, phi, emb) -> ChunkOutput:
        log_prob = laplace_log_prob(actions, mu, log_b).flatten(1).sum(-1)
        entropy = laplace_entropy(log_b).flatten(1).sum(-1)
        return ChunkOutput(actions, log_prob, torch.stack([mu, log_b], -1), entropy, phi, emb)

    def _act(self, obs, prompts, greedy, head, proprio) -> ChunkOutput:
        mu, log_b, phi, emb = self._forward(obs, prompts, head, proprio)
        actions = mu if greedy else laplace_sample(mu, log_b)
        return self._output(actions, mu, log_b, phi, emb)

    @torch.no_grad()
    def act(self, images, prompts: EncodedPrompts, greedy: bool = False) -> ChunkOutput:
        """Sample a chunk [B, K, D] (greedy: the mean) with its log-prob, in one forward.
        ``images``: ``observation(td)``."""
        return self._act(images, prompts, greedy, self.head, self.proprio)

    def evaluate(self, images, prompts: EncodedPrompts, tokens: torch.Tensor) -> ChunkOutput:
        """The training forward: log pi of the given (unclipped) chunks [B, K, D]."""
        mu, log_b, phi, emb = self._forward(images, prompts, self.head, self.proprio)
        return self._output(tokens.to(mu.dtype), mu, log_b, phi, emb)

    @staticmethod
    def kl_to_old_policy(old_params: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """L_KL = E[KL(pi_old || pi)]: closed-form Laplace KL summed over K x D, mean over samples.
        Inputs [B, K, D, 2] = (mu, log b)."""
        kl = laplace_kl(old_params[..., 0], old_params[..., 1], params[..., 0], params[..., 1])
        return kl.flatten(1).sum(-1).mean()

    def env_action(self, tokens: torch.Tensor) -> torch.Tensor:
        """Chunk [B, K, D] -> what the env executes: clipped to the bounds, de-normalised with
        OFT's formula 0.5 (a + 1) (q99 - q01 + 1e-8) + q01 on the masked dimensions."""
        a = torch.maximum(torch.minimum(tokens.float(), self.action_high), self.action_low)
        if self.norm is None:
            return a
        q01, q99, mask = (t.to(a.device) for t in self.norm)
        env = 0.5 * (a.double() + 1.0) * (q99 - q01 + 1e-8) + q01  # OpenVLA-OFT's convention (OpenVLA's has no 1e-8)
        return torch.where(mask, env, a.double()).float()

    # -- the old policy and adapters ---------------------------------------------------------
    def snapshot(self):
        """pi_old: with LoRA a second adapter on the same base weights plus frozen copies of the
        head and the proprio projector (kept in the policy); else a frozen copy of the policy."""
        if self.uses_lora:
            snapshot_adapter(self.backbone.model)
            self.old_head = frozen_copy(self.head)
            self.old_proprio = None if self.proprio is None else frozen_copy(self.proprio)
            return OFTAdapterPolicy(self)
        return frozen_copy(self)

    def ensure_adapters(self, names) -> None:
        ensure_adapters(self.backbone.model, names)

    def routed_adapter(self, instructions: list[str]) -> str | None:
        if self.adapter_routes:
            raise ValueError("PerTaskAdapters with OFTPolicy: not supported (the action head is shared "
                             "between adapters, so tasks would not be isolated)")
        return None

    def save_adapter(self, path: str) -> None:
        self.backbone.model.save_pretrained(path, selected_adapters=[TRAIN_ADAPTER])


def _bounds_q99(stats: dict, dim: int, where: str):
    """(q01, q99, mask) float64 tensors of one statistics entry (mask default: all true)."""
    q01, q99 = (torch.tensor(stats[k], dtype=torch.float64) for k in ("q01", "q99"))
    mask = torch.tensor(stats.get("mask", [True] * len(q01)), dtype=torch.bool)
    if len(q01) != dim:
        raise ValueError(f"{where}: {len(q01)}-D statistics for a {dim}-D input")
    return q01, q99, mask


class OFTAdapterPolicy:
    """The frozen old OFT policy under LoRA: adapter ``old``, ``old_head`` and ``old_proprio``.
    Not an nn.Module: its weights live (and are checkpointed) in the policy."""

    def __init__(self, policy: OFTPolicy, name: str = OLD_ADAPTER):
        self.policy, self.name = policy, name

    @torch.no_grad()
    def act(self, images, prompts, greedy: bool = False) -> ChunkOutput:
        with active_adapter(self.policy.backbone.model, self.name):
            return self.policy._act(images, prompts, greedy, self.policy.old_head, self.policy.old_proprio)

    @torch.no_grad()
    def evaluate(self, images, prompts, tokens) -> ChunkOutput:
        with active_adapter(self.policy.backbone.model, self.name):
            mu, log_b, phi, emb = self.policy._forward(images, prompts, self.policy.old_head, self.policy.old_proprio)
        return self.policy._output(tokens.to(mu.dtype), mu, log_b, phi, emb)
